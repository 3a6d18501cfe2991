"""benchmarks/gpu_check.py on a CPU machine: the no-CUDA exit, the report files from a fake result, the
recipe flags (those of the recipe tests), and the harness's --bf16 plumbing. Fast (a few seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check
from benchmarks.run import build_plan, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_exits_2_with_one_line(tmp_path):
    """No CUDA device (hidden with CUDA_VISIBLE_DEVICES=""): exit code 2, one line on stderr, no traceback,
    nothing written."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--output_dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == gpu_check.NO_CUDA_EXIT_CODE == 2, proc.stderr
    assert proc.stderr.strip() == gpu_check.NO_CUDA_MESSAGE and "\n" not in proc.stderr.strip()
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def _bench_result(size: str, method: str, peak: float, step: float, status: str = "ok") -> dict:
    spec = {"size": size, "method_name": method, "steps": 6, "method": method.split("-")[0]}
    name = f"{size}__{method}"
    if status != "ok":
        return {"status": status, "name": name, "spec": spec, "error": "worker exited with 1"}
    return {
        "status": "ok", "name": name, "spec": spec, "size": size, "family": "llama", "method": spec["method"],
        "hessian_mode": None if method == "plain" else "finite_difference", "n_params": 1000, "device": "cuda",
        "peak_mb": peak, "peak_mb_steady": peak, "baseline_mb": 100.0, "step_time_s": step, "step_cpu_s": step,
        "step_times_s": [step] * 6, "state_bytes_per_param_total": 12.0, "final_target_loss": 3.0,
        "initial_target_loss": 4.0,
    }  # fmt: skip


def fake_results(bench_failed: bool = False) -> dict:
    results = [
        _bench_result("llama-l", "plain", 200.0, 0.010),
        _bench_result("llama-l", "bros-r16-fd", 150.0, 0.025),
    ]
    if bench_failed:
        results.append(_bench_result("llama-l", "masoba-ag", 0.0, 0.0, status="error"))
    rows = [gpu_check.bench_row(r, None) for r in results]
    rows[1].update(mem_vs_plain=0.75, time_vs_plain=2.5)
    return {
        "environment": {
            "device_name": "NVIDIA H200",
            "torch": "2.9.0",
            "transformers": "5.0.0",
            "cuda": "12.8",
        },
        "budget_s": 450.0,
        "wall_s": 321.0,
        "parts": {
            "tests": {"status": "ok", "wall_s": 30.0, "counts": {"tests": 5, "passed": 5, "skipped": 0}},
            "recipes": [
                {"name": "lm_data_mixture", "status": "ok", "returncode": 0, "wall_s": 40.0},
                {"name": "vit_sample_reweighting", "status": "ok", "returncode": 0, "wall_s": 30.0},
            ],
            "benchmarks": {
                "status": "failed" if bench_failed else "ok",
                "wall_s": 200.0,
                "failed": ["llama-l__masoba-ag"] if bench_failed else [],
                "rows": rows,
                "results": results,
            },
        },
    }


def test_report_files_from_a_fake_result(tmp_path):
    json_path, md_path = gpu_check.write_report(fake_results(), str(tmp_path))
    payload = json.loads(Path(json_path).read_text())
    assert payload["failures"] == [] and payload["environment"]["device_name"] == "NVIDIA H200"
    assert [row["method"] for row in payload["parts"]["benchmarks"]["rows"]] == ["plain", "bros-r16-fd"]
    assert payload["parts"]["benchmarks"]["rows"][1]["peak_mb_absolute"] == 250.0
    markdown = Path(md_path).read_text()
    assert "NVIDIA H200" in markdown and "all parts passed" in markdown
    assert "| GPU tests (`pytest -m gpu`) | ok | 30.0 | 5 passed |" in markdown
    assert "| recipe lm_data_mixture (bf16, 5 steps) | ok | 40.0 | exit 0 |" in markdown
    assert "| llama-l | bros-r16-fd | ok | 150.0 | 250.0 | 0.75 | 0.0250 | 2.50 | 12.0 |" in markdown
    assert not list(tmp_path.glob("*.tmp"))


def test_report_names_what_failed(tmp_path):
    results = fake_results(bench_failed=True)
    results["parts"]["recipes"][1].update(status="timeout", returncode=None)
    assert gpu_check.failures(results) == ["recipe vit_sample_reweighting", "benchmark llama-l__masoba-ag"]
    _, md_path = gpu_check.write_report(results, str(tmp_path))
    markdown = Path(md_path).read_text()
    assert "FAILED: recipe vit_sample_reweighting, benchmark llama-l__masoba-ag" in markdown
    assert "| llama-l | masoba-ag | error | — |" in markdown


def test_recipe_command(tmp_path):
    command = gpu_check.recipe_command("lm_data_mixture", str(tmp_path))
    assert command[-4:] == ["--bf16", "True", "--max_steps", "5"] and "--cache_dir" in command
    assert command[1].endswith(os.path.join("recipes", "lm_data_mixture.py"))


def test_harness_bf16_flag_reaches_every_spec(tmp_path):
    argv = ["--device", "cuda", "--sizes", "llama-l", "--methods", "plain", "bros-r16-fd", "--steps", "3"]
    settings, specs = build_plan(parse_args([*argv, "--output_dir", str(tmp_path), "--bf16"]))
    assert settings["bf16"] is True and settings["device"] == "cuda"
    assert [s["bf16"] for s in specs] == [True, True] and all(s["device"] == "cuda" for s in specs)
    _, specs = build_plan(parse_args([*argv, "--output_dir", str(tmp_path)]))
    assert [s["bf16"] for s in specs] == [False, False]
