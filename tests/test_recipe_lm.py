"""recipes/lm_data_mixture.py: helpers in-process, and end-to-end runs in a subprocess (tiny configs).

The end-to-end runs use the offline local corpus (no hub) with a tiny Llama, a few optimizer steps
and a corpus cache shared by the tests of this module; each takes a few seconds to a few tens of
seconds on a 2-core CPU. The default-size run (minutes) is marked ``slow``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from benchmarks.gpu_check import LM_TINY

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lm_data_mixture.py"
ACCELERATE_DIR = ROOT / "recipes" / "accelerate"
DOMAINS = ["code", "docs", "legal", "prose"]

TINY = ["--max_steps", "3", *LM_TINY]  # the tiny configuration, shared with benchmarks/gpu_check.py


recipe = importlib.import_module("lm_data_mixture")  # recipes/ is on sys.path (tests/conftest.py)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # tiny matrices: one thread is as fast and immune to CPU contention
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def run_recipe(*args: str, launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + [str(RECIPE), *args]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bros_hf_cache")


def _check_mixture_file(out: Path, domains=DOMAINS) -> dict:
    payload = json.loads((out / "mixture_weights.json").read_text())
    assert payload["domains"] == domains
    for key in ("final", "average"):
        assert set(payload[key]) == set(domains)
        assert math.isclose(sum(payload[key].values()), 1.0, abs_tol=1e-5)
        assert all(w > 0 for w in payload[key].values())
    assert (out / "mixture_weights.png").stat().st_size > 0
    return payload


def _check_perplexities(section: dict, names) -> None:
    for name in names:
        ppl = section[name]["perplexity"]
        assert math.isfinite(ppl) and ppl > 1.0, (name, ppl)


# ------------------------------------------------------------------------------------------------------
# In-process: argument handling and data helpers
# ------------------------------------------------------------------------------------------------------


def test_recipe_defaults_fill_only_missing_options(tmp_path):
    model_args, data_args, args, given = recipe.parse_arguments(
        ["--output_dir", str(tmp_path), "--learning_rate", "0.01", "--upper_learning_rate=2.5"]
    )
    assert args.learning_rate == 0.01 and args.upper_learning_rate == 2.5
    assert args.max_steps == recipe.RECIPE_DEFAULTS["max_steps"]
    assert args.save_strategy == "no" and args.report_to == []
    assert args.mixture_floor == 0.0 and args.hessian_mode == "auto"  # package defaults (no RECIPE_REASONS)
    assert {"learning_rate", "upper_learning_rate", "output_dir"} <= given
    assert model_args.model_type == "llama" and model_args.lora_r == 0
    assert data_args.target_domains == ["docs"] and data_args.apply_mixture is None


def test_recipe_config_file(tmp_path):
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "max_steps": 7, "target_domains": ["prose"]}))
    _, data_args, args, given = recipe.parse_arguments([str(config)])
    assert args.max_steps == 7 and data_args.target_domains == ["prose"]
    assert args.logging_steps == recipe.RECIPE_DEFAULTS["logging_steps"]


def test_train_files_one_file_per_domain_and_target_files(tmp_path):
    texts = {d: [f"{d} document number {i}. " * 20 for i in range(30)] for d in ("alpha", "beta")}
    for domain, docs in texts.items():
        with open(tmp_path / f"{domain}.jsonl", "w") as handle:
            for doc in docs:
                handle.write(json.dumps({"text": doc}) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    with open(mixed, "w") as handle:
        for i in range(12):
            handle.write(json.dumps({"content": f"gamma text {i} " * 10, "source": "gamma"}) + "\n")
    target = tmp_path / "target.txt"
    target.write_text("\n\n".join(f"target paragraph {i} " * 10 for i in range(20)))

    _, data_args, args, _ = recipe.parse_arguments(
        ["--output_dir", str(tmp_path / "o"), "--train_files", str(tmp_path / "alpha.jsonl"),
         str(tmp_path / "beta.jsonl"), "--target_domains", "beta", "--max_docs_per_domain", "25"]
    )
    raw = recipe.load_raw_data(data_args, args, None)
    assert set(raw) == {"train", "target", "eval"}
    for split in raw.values():
        assert set(split["domain"]) == {"alpha", "beta"}
    per_domain = {d: sum(raw[s]["domain"].count(d) for s in raw) for d in ("alpha", "beta")}
    assert per_domain == {"alpha": 25, "beta": 25}
    all_texts = [t for s in raw.values() for t in s["text"]]
    assert len(all_texts) == len(set(all_texts)) == 50

    # A file with its own domain column (renamed via --domain_column / --text_column), and target files.
    _, data_args, args, _ = recipe.parse_arguments(
        ["--output_dir", str(tmp_path / "o"), "--train_files", str(mixed), "--text_column", "content",
         "--domain_column", "source", "--target_files", str(target)]
    )
    raw = recipe.load_raw_data(data_args, args, None)
    assert set(raw["train"]["domain"]) == {"gamma"}
    assert set(raw) == {"train", "eval", "target", "target_eval"}
    assert "domain" not in raw["target"].column_names
    assert len(raw["target"]) + len(raw["target_eval"]) == 20


def test_mixture_dataset_follows_probabilities(tmp_path):
    per_domain = {
        d: datasets.Dataset.from_dict({"input_ids": [[i]] * 200, "domain": [d] * 200})
        for i, d in enumerate(["a", "b", "c"])
    }
    mixed, probabilities = recipe.mixture_dataset(per_domain, {"a": 0.6, "b": 0.3, "c": 0.1}, seed=0)
    assert probabilities == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    assert "domain" not in mixed.column_names
    first = [row[0] for row in mixed["input_ids"][:1000]]
    share = [first.count(i) / len(first) for i in range(3)]
    assert share == pytest.approx([0.6, 0.3, 0.1], abs=0.05)
    # all_exhausted: every example of every domain appears at least once.
    assert {row[0] for row in mixed["input_ids"]} == {0, 1, 2}
    # Zero weights drop the domain instead of looping forever.
    mixed, probabilities = recipe.mixture_dataset(per_domain, {"a": 0.5, "b": 0.5, "c": 0.0}, seed=0)
    assert set(probabilities) == {"a", "b"}
    with pytest.raises(ValueError, match="lacks"):
        recipe.mixture_dataset(per_domain, {"z": 1.0}, seed=0)


def test_read_mixture(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"domains": ["a", "b"], "final": {"a": 0.9, "b": 0.1}, "average": {"a": 0.6, "b": 0.4}}))
    assert recipe.read_mixture(str(path), "final") == {"a": 0.9, "b": 0.1}
    assert recipe.read_mixture(str(path), "average") == {"a": 0.6, "b": 0.4}
    path.write_text(json.dumps({"a": 1, "b": 3}))
    assert recipe.read_mixture(str(path), "average") == {"a": 1.0, "b": 3.0}


# ------------------------------------------------------------------------------------------------------
# End to end (subprocess)
# ------------------------------------------------------------------------------------------------------


def test_recipe_tiny_end_to_end(tmp_path, cache_dir):
    out = tmp_path / "out"
    result = run_recipe("--output_dir", str(out), "--cache_dir", str(cache_dir), *TINY)
    payload = _check_mixture_file(out)
    assert payload["step"] == 3
    report = json.loads((out / "report.json").read_text())
    assert report["domains"] == DOMAINS and report["target"] == "docs"
    assert report["world_size"] == 1 and report["max_steps"] == 3
    assert report["per_device_train_batch_size"] == 4
    assert report["mixture"]["final"] == pytest.approx(payload["final"])
    _check_perplexities(report["eval_before"], DOMAINS)
    _check_perplexities(report["eval_after"], DOMAINS)
    assert "target ppl" not in result.stdout and "BROS data mixture" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # The caches a second run reuses.
    assert list(cache_dir.glob("local_corpus-*")) and list((cache_dir / "tokenizers").iterdir())
    assert len(list((cache_dir / "blocks").iterdir())) == 3


def test_recipe_lora(tmp_path, cache_dir):
    out = tmp_path / "out"
    run_recipe("--output_dir", str(out), "--cache_dir", str(cache_dir), *TINY, "--lora_r", "4", "--lora_alpha", "8")
    _check_mixture_file(out)
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["trainable_parameters"] < report["parameters"] / 5
    _check_perplexities(report["eval_after"], DOMAINS)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_recipe_apply_mixture(tmp_path, cache_dir):
    out = tmp_path / "out"
    result = run_recipe(
        "--output_dir", str(out), "--cache_dir", str(cache_dir), *TINY,
        "--apply_mixture", "auto", "--apply_mixture_steps", "2", "--target_domains", "docs", "prose",
    )
    report = json.loads((out / "report.json").read_text())
    applied = report["apply_mixture"]
    assert applied["target"] == "target" and applied["steps"] == 2
    assert applied["learned"]["mixture"] == pytest.approx(report["mixture"]["average"])
    assert applied["uniform"]["mixture"] == pytest.approx({d: 0.25 for d in DOMAINS})
    for label in ("learned", "uniform"):
        _check_perplexities(applied[label]["eval"], [*DOMAINS, "target"])
        saved = out / "apply_mixture" / label  # each model trained on a mixture is kept, with its evaluation
        assert applied[label]["model_dir"] == str(saved)
        assert (saved / "model.safetensors").exists() and (saved / "config.json").exists()
        assert json.loads((saved / "eval_results.json").read_text())["eval"] == applied[label]["eval"]
    assert applied["target_perplexity_ratio"] == pytest.approx(
        applied["learned"]["target_perplexity"] / applied["uniform"]["target_perplexity"]
    )
    assert "target ppl: learned" in result.stdout

    # Apply a saved mixture file without a new bilevel run.
    mixture = tmp_path / "mixture.json"
    mixture.write_text(json.dumps({"final": {"code": 0.1, "docs": 0.7, "legal": 0.1, "prose": 0.1}}))
    out2 = tmp_path / "out2"
    run_recipe(
        "--output_dir", str(out2), "--cache_dir", str(cache_dir), *TINY, "--max_steps", "0",
        "--apply_mixture", str(mixture), "--apply_mixture_weights", "final", "--apply_mixture_steps", "2",
    )
    report = json.loads((out2 / "report.json").read_text())
    assert "mixture" not in report and not (out2 / "mixture_weights.json").exists()
    assert report["apply_mixture"]["learned"]["mixture"] == pytest.approx(
        {"code": 0.1, "docs": 0.7, "legal": 0.1, "prose": 0.1}
    )


def _accelerate_launcher(config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_DIR / config)]


def test_accelerate_cpu_single(tmp_path, cache_dir):
    out = tmp_path / "out"
    run_recipe("--output_dir", str(out), "--cache_dir", str(cache_dir), *TINY, launcher=_accelerate_launcher("cpu_single.yaml"))
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 1
    _check_mixture_file(out)


def test_accelerate_cpu_ddp_two_processes(tmp_path, cache_dir):
    out = tmp_path / "out"
    run_recipe(
        "--output_dir", str(out), "--cache_dir", str(cache_dir), *TINY,
        launcher=_accelerate_launcher("cpu_ddp_2proc.yaml"),
    )
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    _check_mixture_file(out)


@pytest.mark.slow
def test_default_run_moves_mixture_toward_target(tmp_path):
    """The README command (default sizes and steps, minutes on 2 CPU cores): docs, the target, must take most of the
    mixture. Measured 2026-12-02: tail average 0.791, final 0.997 (0.838 / 0.999 in an earlier environment); before the auxiliary step limit (z at its norm
    bound from step ~40) 0.535 and 0.766, which these bounds reject."""
    out = tmp_path / "out"
    run_recipe("--output_dir", str(out), "--disable_tqdm", "True", timeout=1800)
    payload = _check_mixture_file(out)
    assert payload["final"]["docs"] >= 0.9, payload
    assert payload["average"]["docs"] >= 0.7, payload
    report = json.loads((out / "report.json").read_text())
    assert report["eval_after"]["docs"]["perplexity"] < report["eval_before"]["docs"]["perplexity"]
