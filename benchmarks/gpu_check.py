"""One-GPU check (about 5-8 min on an H200): GPU tests, bf16 recipe runs, benchmark sizes in bf16.

    python -m benchmarks.gpu_check --output_dir outputs/gpu_check

Parts, each with its own time limit (the defaults fit in ``--budget_s`` = 450 s):

1. ``tests``: ``python -m pytest -q -p no:cacheprovider -m gpu`` (``tests/test_gpu.py``: tiny Llama
   BROSTrainer steps in bf16 on CUDA, hooks vs materialised perturbation in fp32 on CUDA). Fails if a
   test fails, if none ran, or if any was skipped (with CUDA present none should be).
2. ``recipes``: ``recipes/lm_data_mixture.py`` and ``recipes/vit_sample_reweighting.py`` with their
   tests' tiny-configuration flags, ``--bf16 True --max_steps 5``, each in a subprocess: exit status,
   wall time, and whether ``report.json`` was written.
3. ``benchmarks``: :mod:`benchmarks.run`'s plan and workers (``--device cuda --bf16``; one fresh
   process per configuration) for ``--sizes`` × ``--methods``: peak memory from
   ``torch.cuda.max_memory_allocated`` (reset at every step; each method in its own process) over the
   baseline and absolute, median step time, ratios to ``plain``. The harness's own report lands in
   ``OUTPUT_DIR/bench``.

Writes ``OUTPUT_DIR/gpu_check.json`` (every result, torch/transformers/CUDA versions, device name) and
``OUTPUT_DIR/gpu_check.md`` after every part, so an interrupted run still leaves what it measured. Exit
code: 0 all parts passed, 1 some part failed, 2 no CUDA device (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # `python benchmarks/gpu_check.py`
    sys.path.insert(0, REPO_ROOT)

NO_CUDA_EXIT_CODE = 2
NO_CUDA_MESSAGE = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU."
)

# The recipes' tiny configurations, less --max_steps; tests/test_recipe_lm.py and tests/test_recipe_vit.py
# run the same ones.
LM_TINY = [
    "--hidden_size", "32",
    "--num_layers", "1",
    "--num_heads", "2",
    "--intermediate_size", "64",
    "--vocab_size", "300",
    "--block_size", "64",
    "--max_docs_per_domain", "20",
    "--chunk_chars", "1000",
    "--per_device_train_batch_size", "4",
    "--subspace_rank", "4",
    "--logging_steps", "1",
    "--disable_tqdm", "True",
]  # fmt: skip
VIT_TINY = [
    "--hidden_size", "16",
    "--num_hidden_layers", "1",
    "--num_attention_heads", "2",
    "--intermediate_size", "32",
    "--max_train_samples", "120",
    "--max_test_samples", "60",
    "--val_size", "40",
    "--per_device_train_batch_size", "16",
    "--upper_warmup_steps", "2",
    "--logging_steps", "3",
    "--disable_tqdm", "True",
    "--num_threads", "1",
]  # fmt: skip
RECIPE_STEPS = 5
RECIPES = {
    "lm_data_mixture": ("recipes/lm_data_mixture.py", LM_TINY),
    "vit_sample_reweighting": ("recipes/vit_sample_reweighting.py", VIT_TINY),
}
DEFAULT_SIZES = ["llama-l", "gpt2-124m"]
DEFAULT_METHODS = ["plain", "masoba-fd", "masoba-ag", "bros-r16-fd", "bros-r16-ag"]
MIN_CONFIG_S = 20.0  # a benchmark configuration is not started with less time left than this
MIN_PART_S = 10.0  # nor a test or recipe run
RESERVE_PER_RECIPE_S = 45.0  # time kept back for each later recipe run
RESERVE_BENCHMARKS_S = 120.0  # and for the benchmarks


# ---------------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment() -> dict[str, Any]:
    """Versions and the device: torch, CUDA, transformers, python, GPU name and memory, git commit."""
    import platform

    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
            env["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def child_env() -> dict[str, str]:
    """Environment of the subprocesses: offline hub, quiet tokenizers, this repository on PYTHONPATH."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_logged(command: list[str], log_path: str, timeout: float) -> dict[str, Any]:
    """Run ``command`` from the repository root, output to ``log_path``; status ok / failed / timeout."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if timeout < MIN_PART_S:
        return {"status": "skipped", "returncode": None, "wall_s": 0.0, "timeout_s": round(timeout, 1),
                "command": command, "log": None, "reason": "time budget spent"}  # fmt: skip
    started = time.perf_counter()
    with open(log_path, "w") as handle:
        try:
            proc = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env=child_env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=max(timeout, 1.0),
            )
            returncode: int | None = proc.returncode
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            returncode, status = None, "timeout"
    wall = time.perf_counter() - started
    with open(log_path, errors="replace") as handle:
        tail = handle.read()[-3000:]
    return {
        "status": status,
        "returncode": returncode,
        "wall_s": round(wall, 2),
        "timeout_s": round(timeout, 1),
        "command": command,
        "log": log_path,
        "log_tail": tail if status != "ok" else tail[-600:],
    }


class Budget:
    """Wall-clock budget of the whole check; each part asks for min(its own limit, what is left)."""

    def __init__(self, seconds: float):
        self.total = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def grant(self, limit: float) -> float:
        return max(0.0, min(limit, self.left()))


# ---------------------------------------------------------------------------------- parts
def junit_counts(path: str) -> dict[str, int]:
    """Counts of a pytest JUnit XML report: tests, passed, failures, errors, skipped."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def part_tests(output_dir: str, timeout: float) -> dict[str, Any]:
    """Part 1: the GPU-marked tests in a pytest subprocess (JUnit XML for the counts)."""
    xml_path = os.path.join(output_dir, "gpu_tests.xml")
    if os.path.exists(xml_path):
        os.remove(xml_path)
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
        f"--junitxml={xml_path}",
    ]  # fmt: skip
    result = run_logged(command, os.path.join(output_dir, "logs", "gpu_tests.log"), timeout)
    if os.path.exists(xml_path):
        result["counts"] = counts = junit_counts(xml_path)
        if result["status"] == "ok" and (counts["skipped"] or counts["passed"] == 0):
            result["status"] = "failed"
            result["reason"] = "GPU tests were skipped or none ran although CUDA is available"
    elif result["status"] == "ok":
        result["status"] = "failed"
        result["reason"] = "pytest wrote no JUnit report"
    return result


def recipe_command(name: str, output_dir: str) -> list[str]:
    """Command line of one recipe run: its tests' tiny flags, ``--bf16 True --max_steps 5``."""
    path, flags = RECIPES[name]
    command = [sys.executable, os.path.join(REPO_ROOT, path), "--output_dir", os.path.join(output_dir, name)]
    if name == "lm_data_mixture":
        command += ["--cache_dir", os.path.join(output_dir, "cache")]
    return command + list(flags) + ["--bf16", "True", "--max_steps", str(RECIPE_STEPS)]


def part_recipe(name: str, output_dir: str, timeout: float) -> dict[str, Any]:
    """Part 2, one recipe: exit status, wall time, and its report.json."""
    recipes_dir = os.path.join(output_dir, "recipes")
    result = run_logged(
        recipe_command(name, recipes_dir), os.path.join(output_dir, "logs", f"{name}.log"), timeout
    )
    result["name"] = name
    report = os.path.join(recipes_dir, name, "report.json")
    result["report"] = report if os.path.exists(report) else None
    if result["status"] == "ok" and result["report"] is None:
        result["status"] = "failed"
        result["reason"] = "exit status 0 but no report.json"
    return result


def bench_row(result: dict[str, Any], ratios: dict[str, Any] | None) -> dict[str, Any]:
    """One benchmark configuration, the columns of the summary (peaks in MB, times in s)."""
    spec = result.get("spec") or {}
    ok = result.get("status") == "ok"
    row: dict[str, Any] = {
        "name": result.get("name"),
        "size": result.get("size", spec.get("size")),
        "method": spec.get("method_name") or str(result.get("name", "")).split("__", 1)[-1],
        "status": result.get("status"),
        "error": None if ok else result.get("error"),
        "process_wall_s": result.get("process_wall_s"),
    }
    if ok:
        row.update(
            n_params=result["n_params"],
            steps=len(result["step_times_s"]),
            peak_mb=result["peak_mb"],
            peak_mb_absolute=result["peak_mb"] + result["baseline_mb"],
            baseline_mb=result["baseline_mb"],
            step_time_s=result["step_time_s"],
            bytes_per_param=result["state_bytes_per_param_total"],
            final_target_loss=result["final_target_loss"],
        )
        if ratios:
            row.update(mem_vs_plain=ratios.get("mem_vs_plain"), time_vs_plain=ratios.get("time_vs_plain"))
    return row


def part_benchmarks(
    output_dir: str,
    sizes: list[str],
    methods: list[str],
    steps: int,
    budget: Budget,
    config_timeout: float,
    reserve: float,
) -> dict[str, Any]:
    """Part 3: :func:`benchmarks.run.build_plan` + :func:`benchmarks.run.run_child` (one worker process
    per configuration) in bf16 on CUDA, until ``budget`` has only ``reserve`` seconds left."""
    from benchmarks import report
    from benchmarks.run import build_plan, parse_args, run_child

    bench_dir = os.path.join(output_dir, "bench")
    argv = [
        "--device", "cuda", "--bf16", "--output_dir", bench_dir, "--sizes", *sizes, "--methods", *methods,
        "--steps", str(steps), "--timing_warmup", "2", "--eval_every", "0",
        "--n_per_domain", "96", "--n_target", "48", "--n_eval", "24",
    ]  # fmt: skip
    settings, specs = build_plan(parse_args(argv))
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for i, spec in enumerate(specs, 1):
        timeout = budget.grant(config_timeout) - reserve
        if timeout < MIN_CONFIG_S:
            results.append(
                {"status": "skipped", "name": spec["name"], "spec": spec, "error": "time budget spent"}
            )
            log(f"  [{i}/{len(specs)}] {spec['name']}: skipped (time budget spent)")
            continue
        result = run_child(spec, bench_dir, timeout=timeout)
        results.append(result)
        log(f"  [{i}/{len(specs)} {time.perf_counter() - started:5.0f}s] {report.one_line(result)}")
    ratios = {(row["size"], row["method"]): row for row in report.compare(results)}
    rows = []
    for result in results:
        spec = result.get("spec") or {}
        rows.append(bench_row(result, ratios.get((spec.get("size"), spec.get("method_name")))))
    try:
        report.write_report(results, settings, bench_dir, plots=False)
    except Exception as error:  # the summary below still has every number
        log(f"  benchmarks.report failed: {type(error).__name__}: {error}")
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    return {
        "status": "failed" if failed or not rows else "ok",
        "wall_s": round(time.perf_counter() - started, 2),
        "failed": failed,
        "settings": settings,
        "rows": rows,
        "harness_report": os.path.join(bench_dir, "results.md"),
        "results": results,
    }


# ---------------------------------------------------------------------------------- report
def failures(results: dict[str, Any]) -> list[str]:
    """Names of the parts (or recipe / benchmark configurations) that did not pass."""
    parts = results.get("parts", {})
    out = []
    if "tests" in parts and parts["tests"].get("status") != "ok":
        out.append("tests")
    for recipe in parts.get("recipes", []):
        if recipe.get("status") != "ok":
            out.append(f"recipe {recipe.get('name')}")
    bench = parts.get("benchmarks")
    if bench is not None and bench.get("status") != "ok":
        out += [f"benchmark {name}" for name in bench.get("failed") or []] or ["benchmarks"]
    if results.get("error"):
        out.append(f"gpu_check itself ({results['error']})")
    return out


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """``gpu_check.md``: environment, one line per part, the benchmark table."""
    env = results.get("environment", {})
    parts = results.get("parts", {})
    failed = failures(results)
    lines = [
        "# GPU check",
        "",
        f"- Device: {env.get('device_name', '—')} ({_fmt(env.get('device_memory_gib'))} GiB, "
        f"capability {env.get('capability', '—')}); torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"transformers {env.get('transformers')}, python {env.get('python')}; commit "
        f"{env.get('git_commit', '—')}{' (dirty)' if env.get('git_dirty') else ''}.",
        f"- Result: **{'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}** "
        f"({_fmt(results.get('wall_s'), '.0f')} s of a {_fmt(results.get('budget_s'), '.0f')} s budget).",
        "",
        "| part | status | wall s | detail |",
        "|---|---|---|---|",
    ]
    tests = parts.get("tests")
    if tests is not None:
        counts = tests.get("counts") or {}
        detail = ", ".join(
            f"{counts[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if counts.get(k)
        )
        lines.append(
            f"| GPU tests (`pytest -m gpu`) | {tests['status']} | {_fmt(tests.get('wall_s'), '.1f')} | "
            f"{detail or tests.get('reason') or '—'} |"
        )
    for recipe in parts.get("recipes", []):
        detail = recipe.get("reason") or f"exit {recipe.get('returncode')}"
        lines.append(
            f"| recipe {recipe['name']} (bf16, {RECIPE_STEPS} steps) | {recipe['status']} | "
            f"{_fmt(recipe.get('wall_s'), '.1f')} | {detail} |"
        )
    bench = parts.get("benchmarks")
    if bench is not None:
        detail = f"{len(bench.get('rows', []))} configurations" + (
            f", failed: {', '.join(bench['failed'])}" if bench.get("failed") else ""
        )
        lines.append(
            f"| benchmarks (bf16) | {bench['status']} | {_fmt(bench.get('wall_s'), '.1f')} | {detail} |"
        )
        lines += [
            "",
            "## Benchmarks (bf16 mixed precision, one worker process per configuration)",
            "",
            "Peak: `torch.cuda.max_memory_allocated()` per optimizer step (reset at every step start, fresh "
            "process per method), max over steps, over the baseline allocated after model, data and trainer were "
            "built (`abs` adds the baseline). Step time: median wall clock of one optimizer step after the "
            "warm-up steps.",
            "",
            "| size | method | status | peak MB | peak MB abs | ×plain mem | step s | ×plain time | B/param |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in bench.get("rows", []):
            lines.append(
                f"| {row.get('size')} | {row.get('method')} | {row.get('status')} | {_fmt(row.get('peak_mb'), '.1f')} | "
                f"{_fmt(row.get('peak_mb_absolute'), '.1f')} | {_fmt(row.get('mem_vs_plain'), '.2f')} | "
                f"{_fmt(row.get('step_time_s'), '.4f')} | {_fmt(row.get('time_vs_plain'), '.2f')} | "
                f"{_fmt(row.get('bytes_per_param'), '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], output_dir: str) -> tuple[str, str]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``output_dir`` (atomically); return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    results = dict(results, failures=failures(results))
    paths = (os.path.join(output_dir, "gpu_check.json"), os.path.join(output_dir, "gpu_check.md"))
    for path, text in zip(
        paths, (json.dumps(results, indent=1, default=str), render_markdown(results)), strict=True
    ):
        with open(path + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)
    return paths


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default=os.path.join("outputs", "gpu_check"))
    parser.add_argument("--budget_s", type=float, default=450.0, help="Wall-clock budget of the whole check.")
    parser.add_argument("--tests_timeout", type=float, default=150.0, help="Seconds for the GPU tests.")
    parser.add_argument("--recipe_timeout", type=float, default=100.0, help="Seconds per recipe run.")
    parser.add_argument(
        "--config_timeout", type=float, default=90.0, help="Seconds per benchmark configuration."
    )
    parser.add_argument(
        "--sizes", nargs="+", default=DEFAULT_SIZES, help="benchmarks.models.SIZES to measure."
    )
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="benchmarks.run.METHODS.")
    parser.add_argument("--bench_steps", type=int, default=6, help="Optimizer steps per configuration.")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=["tests", "recipes", "benchmarks"], help="Parts not to run."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return NO_CUDA_EXIT_CODE
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {"environment": environment(), "budget_s": args.budget_s, "parts": {}}
    log(f"{results['environment'].get('device_name')}; budget {args.budget_s:.0f} s; output {output_dir}")

    def save() -> None:
        results["wall_s"] = round(budget.total - budget.left(), 1)
        write_report(results, output_dir)

    # Time kept back for the parts after each one, so that a slow part cannot starve the rest.
    recipe_reserve = 0.0 if "recipes" in args.skip else RESERVE_PER_RECIPE_S * len(RECIPES)
    bench_reserve = 0.0 if "benchmarks" in args.skip else RESERVE_BENCHMARKS_S
    try:
        if "tests" not in args.skip:
            timeout = min(budget.grant(args.tests_timeout), budget.left() - recipe_reserve - bench_reserve)
            log(f"part 1/3: pytest -m gpu (timeout {timeout:.0f} s)")
            results["parts"]["tests"] = part_tests(output_dir, timeout)
            tests = results["parts"]["tests"]
            log(
                f"  {tests['status']} in {tests['wall_s']:.1f} s {tests.get('counts') or tests.get('reason', '')}"
            )
            save()
        if "recipes" not in args.skip:
            results["parts"]["recipes"] = []
            for i, name in enumerate(RECIPES):
                left_for_rest = (len(RECIPES) - i - 1) * RESERVE_PER_RECIPE_S + bench_reserve
                timeout = min(budget.grant(args.recipe_timeout), budget.left() - left_for_rest)
                log(f"part 2/3: recipe {name}, bf16, {RECIPE_STEPS} steps (timeout {timeout:.0f} s)")
                recipe = part_recipe(name, output_dir, timeout)
                results["parts"]["recipes"].append(recipe)
                log(f"  {recipe['status']} (exit {recipe['returncode']}) in {recipe['wall_s']:.1f} s")
                save()
        if "benchmarks" not in args.skip:
            log(f"part 3/3: benchmarks {args.sizes} x {args.methods}, bf16, {args.bench_steps} steps")
            results["parts"]["benchmarks"] = part_benchmarks(
                output_dir,
                args.sizes,
                args.methods,
                args.bench_steps,
                budget,
                args.config_timeout,
                reserve=5.0,
            )
            save()
    except Exception as error:  # record what broke; the parts done so far are kept
        import traceback

        results["error"] = f"{type(error).__name__}: {error}"
        results["traceback"] = traceback.format_exc()
        log(f"error: {results['error']}")
    save()
    failed = failures(results)
    json_path, md_path = os.path.join(output_dir, "gpu_check.json"), os.path.join(output_dir, "gpu_check.md")
    with open(md_path) as handle:
        print(handle.read())
    log(f"wrote {json_path} and {md_path}")
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    log("all parts passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
