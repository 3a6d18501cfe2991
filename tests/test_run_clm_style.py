"""A run_clm-style script becomes a BROS script with the class swap, one packing call and an upper set."""

from __future__ import annotations

import difflib
import json
import random
import runpy
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

SCRIPTS = Path(__file__).parent / "scripts"
WORDS = "river stone light garden window paper morning letter silver forest story table market winter".split()


def document(domain: str, rng: random.Random) -> str:
    if domain == "arith":  # learnable: the sum follows from the two numbers
        return " ".join(f"{a} plus {b} is {a + b}." for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(6)))
    if domain == "letters":
        return " ".join("".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(12))
    return " ".join(rng.choice(WORDS) for _ in range(20))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    from local_corpus import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("run_clm")
    rng = random.Random(0)
    domains = ["arith", "letters", "words"]

    def rows(n: int, names: list[str]) -> list[dict]:
        return [{"text": document(d, rng), "domain": d} for _ in range(n) for d in names]

    train, validation, target = rows(150, domains), rows(20, domains), rows(60, ["arith"])
    tokenizer = train_bpe_tokenizer([row["text"] for row in train], vocab_size=300, save_dir=root / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.save_pretrained(root / "config")
    return {
        "--train_file": write_jsonl(root / "train.jsonl", train),
        "--validation_file": write_jsonl(root / "validation.jsonl", validation),
        "--target_file": write_jsonl(root / "target.jsonl", target),
        "--config_name": str(root / "config"),
        "--tokenizer_name": str(root / "tokenizer"),
        "root": str(root),
    }


def run_script(name: str, arguments: dict[str, str], monkeypatch) -> None:
    argv = [name] + [part for key, value in arguments.items() if key.startswith("--") for part in (key, value)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPTS / name), run_name="__main__")


def test_the_bros_script_changes_at_most_ten_lines():
    plain = (SCRIPTS / "clm_plain.py").read_text().splitlines()
    bros = (SCRIPTS / "clm_bros.py").read_text().splitlines()
    added = [line for line in difflib.ndiff(plain, bros) if line.startswith("+ ")]
    assert len(added) <= 10, "\n".join(added)


def test_the_plain_script_runs(workspace, monkeypatch, one_thread):
    output = Path(workspace["root"]) / "plain"
    arguments = {k: v for k, v in workspace.items() if k != "--target_file"}
    run_script("clm_plain.py", {**arguments, "--output_dir": str(output), "--max_steps": "5"}, monkeypatch)
    assert "eval_loss" in json.loads((output / "eval_results.json").read_text())


def test_the_bros_script_learns_the_target_domain(workspace, monkeypatch, one_thread):
    output = Path(workspace["root"]) / "bros"
    run_script("clm_bros.py", {**workspace, "--output_dir": str(output), "--max_steps": "90"}, monkeypatch)
    weights = json.loads((output / "mixture_weights.json").read_text())["weights"]
    assert weights["arith"] > 0.5 and weights["arith"] == max(weights.values()), weights
    assert "eval_loss" in json.loads((output / "eval_results.json").read_text())
