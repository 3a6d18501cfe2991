"""Benchmarks: BROS vs full-space MA-SOBA vs the plain Trainer, memory, time and quality side by side.

    python -m benchmarks.run --quick                      # CPU, a few minutes (used by the slow test)
    python -m benchmarks.run                              # CPU, all sizes up to GPT-2 124M and Llama 160M
    python -m benchmarks.run --sizes gpt2-124m llama-160m # CPU, only the 100M+ sizes (batch 3 x 512, 4 steps)
    python -m benchmarks.run --device cuda                # GPU sizes (160M-1B Llama, GPT-2 124M, ViT-B)
    python -m benchmarks.run --device cuda --bf16         # the same in bf16 mixed precision (TrainingArguments.bf16)
    python -m benchmarks.run --sizes llama-l --methods plain masoba-fd bros-r16-fd --steps 6
    python -m benchmarks.run --sizes gpt2-124m --batch_size 3 --steps 4 --optim adafactor  # every method, Adafactor

Every configuration (model size × method) runs in its own subprocess (``benchmarks.worker``) with
``MALLOC_MMAP_THRESHOLD_=65536`` so peak memory starts from a fresh heap; results land in
``OUTPUT_DIR/runs/NAME.json`` (logs in ``OUTPUT_DIR/logs``), and the aggregate in
``OUTPUT_DIR/results.json``, ``OUTPUT_DIR/results.md`` and PNG plots (see :mod:`benchmarks.report`).
Every worker also times one full Trainer checkpoint save after its last step (``save_time_s``,
``checkpoint_mb``; see :mod:`benchmarks.worker`).

Methods (same model init, data, batch, lower optimizer (AdamW unless ``--optim``), learning rate and seed):
``plain`` (``transformers.Trainer``), ``masoba-{ag,fd}`` (BROSTrainer, bilevel_method="masoba"),
``bros-r{4,16,64}-{ag,fd}`` (BROSTrainer, subspace_rank r; embeddings take full-space lower updates,
the package default), ``bros-r16-{ag,fd}-sketchall`` (every matrix in the subspace,
``lower_full_space_modules=["none"]``), ``bros-r16-{ag,fd}-T1`` (U redrawn every step); ``ag``/``fd`` =
hessian_mode autograd / finite_difference. Data: a synthetic 3-domain task (``benchmarks.data``) in domain mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, REPO_ROOT)
MODES = {"ag": "autograd", "fd": "finite_difference"}
RANKS = (4, 16, 64)


@dataclass(frozen=True)
class Method:
    name: str
    method: str  # plain | masoba | bros
    rank: int | None = None
    hessian_mode: str | None = None
    resample_interval: int | None = None  # None: --resample_interval, else the package default
    lower_full_space_modules: tuple[str, ...] | None = None  # None: the package default (embeddings)


def all_methods(ranks=RANKS, modes=("ag", "fd")) -> list[Method]:
    methods = [Method("plain", "plain")]
    methods += [Method(f"masoba-{m}", "masoba", None, MODES[m]) for m in modes]
    methods += [Method(f"bros-r{r}-{m}", "bros", r, MODES[m]) for r in ranks for m in modes]
    # The analysed method (lower subspace redrawn every step) next to the default interval.
    methods += [Method(f"bros-r16-{m}-T1", "bros", 16, MODES[m], resample_interval=1) for m in modes]
    # Every matrix in the subspace, embeddings included (the paper's setting; least memory).
    methods += [
        Method(f"bros-r16-{m}-sketchall", "bros", 16, MODES[m], lower_full_space_modules=("none",))
        for m in modes
    ]
    return methods


METHODS = {m.name: m for m in all_methods()}

# Profiles: per size, the methods run there ("all" or a list of names), the number of optimizer steps and,
# optionally, settings of that size (SIZE_SETTINGS) that replace the profile's.
# Small sizes run long enough for the quality columns (target loss, learned mixture) to mean something;
# large sizes run a few steps for memory and time. Quality is compared between methods of the same size.
QUICK_LARGEST = [
    "plain",
    "masoba-ag",
    "masoba-fd",
    "bros-r4-fd",
    "bros-r16-ag",
    "bros-r16-fd",
    "bros-r16-fd-sketchall",
    "bros-r64-fd",
]
QUICK_SMALL = ["plain", "masoba-fd", "bros-r16-fd"]
QUICK_QUALITY = [*QUICK_LARGEST, "bros-r16-fd-T1"]
# Settings a grid entry may set for its size (third element of the entry); command-line values win.
SIZE_SETTINGS = ("batch_size", "eval_every", "n_per_domain", "n_target", "n_eval", "timing_warmup")
# The 100M+ causal LMs of the CPU plan: memory, time, bytes/param and checkpoint save of a few steps at
# batch 3 x 512 tokens. Four steps move neither loss nor mixture, so the held-out sample is one batch pair
# and no curve is taken (each forward pass at this size costs seconds of one core).
CPU_LARGE_METHODS = ["plain", "masoba-fd", "bros-r16-fd"]
CPU_LARGE: dict[str, int] = {
    "batch_size": 3,
    "eval_every": 0,
    "n_per_domain": 32,
    "n_target": 24,
    "n_eval": 6,
    "timing_warmup": 1,
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "device": "cpu",
        "grid": {
            "llama-xs": (QUICK_QUALITY, 160),
            "llama-s": (QUICK_SMALL, 6),
            "llama-m": (QUICK_LARGEST, 6),
            "vit-tiny": (QUICK_SMALL, 10),
        },
        "batch_size": 6,
        "eval_every": 4,
        "n_per_domain": 128,
        "n_target": 96,
        "n_eval": 24,
        "timing_warmup": 2,
        "lr": 3e-3,
        "upper_lr": None,
        "threads": 1,
    },
    "cpu": {
        "device": "cpu",
        "grid": {
            "llama-xs": ("all", 60),
            "llama-s": ("all", 20),
            "llama-m": ("all", 10),
            "llama-l": ("all", 6),
            "gpt2-m": ("all", 10),
            "vit-tiny": ("all", 20),
            "vit-s": ("all", 8),
            "gpt2-124m": (CPU_LARGE_METHODS, 4, CPU_LARGE),
            "llama-160m": (CPU_LARGE_METHODS, 4, CPU_LARGE),
        },
        "batch_size": 6,
        "eval_every": 4,
        "n_per_domain": 256,
        "n_target": 192,
        "n_eval": 48,
        "timing_warmup": 2,
        "lr": 3e-3,
        "upper_lr": None,
        "threads": 1,
    },
    "cuda": {
        "device": "cuda",
        "grid": {
            "llama-160m": ("all", 60),
            "llama-410m": ("all", 30),
            "llama-1b": ("all", 20),
            "gpt2-124m": ("all", 60),
            "vit-base": ("all", 60),
        },
        "batch_size": 12,
        "eval_every": 5,
        "n_per_domain": 512,
        "n_target": 384,
        "n_eval": 96,
        "timing_warmup": 5,
        "lr": 1e-3,
        "upper_lr": None,
        "threads": None,
    },
}


def child_env(mmap_threshold: bool = True) -> dict[str, str]:
    """Environment of a worker; ``mmap_threshold``: memory runs (large buffers returned to the OS on free)."""
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def make_spec(
    size: str, method: Method, settings: dict[str, Any], output_dir: str, steps: int
) -> dict[str, Any]:
    # Checkpointed runs get their own names: a report never mixes them with runs of the same size and method.
    name = f"{size}__{method.name}" + ("__ac" if settings.get("activation_checkpointing") else "")
    if settings.get("loss_chunk_size") and method.method != "plain":
        name += f"__lc{settings['loss_chunk_size']}"
    if settings.get("z_dtype") and method.method != "plain":
        name += f"__z{settings['z_dtype']}"
    if settings.get("optim", "adamw_torch") != "adamw_torch":
        name += f"__{settings['optim']}"
    return {
        "name": name,
        "size": size,
        "method": method.method,
        "method_name": method.name,
        "rank": method.rank,
        "hessian_mode": method.hessian_mode,
        "device": settings["device"],
        "steps": steps,
        "batch_size": settings["batch_size"],
        "lr": settings["lr"],
        "seed": settings["seed"],
        "eval_every": settings["eval_every"],
        "timing_warmup": settings["timing_warmup"],
        "n_per_domain": settings["n_per_domain"],
        "n_target": settings["n_target"],
        "n_eval": settings["n_eval"],
        "aux_lr": settings.get("aux_lr"),
        "upper_lr": settings.get("upper_lr"),
        "ma_weight": settings.get("ma_weight"),
        "resample_interval": method.resample_interval or settings.get("resample_interval"),
        "lower_full_space_modules": list(method.lower_full_space_modules or []) or None,
        "threads": settings.get("threads"),
        "bf16": bool(settings.get("bf16", False)),
        "activation_checkpointing": bool(settings.get("activation_checkpointing", False)),
        "loss_chunk_size": settings.get("loss_chunk_size") if method.method != "plain" else None,
        "z_dtype": settings.get("z_dtype") if method.method != "plain" else None,
        "optim": settings.get("optim", "adamw_torch"),
        "run_dir": os.path.join(output_dir, "trainer_output", name),
    }


def run_child(
    spec: dict[str, Any], output_dir: str, timeout: float | None = None, mmap_threshold: bool = True
) -> dict[str, Any]:
    """Run one configuration in a fresh ``python -m benchmarks.worker`` process; return its result dict.

    A crash, a timeout or an out-of-memory kill yields ``{"status": "error", ...}`` with the log tail."""
    name = spec["name"]
    for sub in ("specs", "runs", "logs"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    spec_path = os.path.join(output_dir, "specs", f"{name}.json")
    out_path = os.path.join(output_dir, "runs", f"{name}.json")
    log_path = os.path.join(output_dir, "logs", f"{name}.log")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle, indent=1)
    if os.path.exists(out_path):
        os.remove(out_path)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.worker", spec_path, out_path],
                cwd=REPO_ROOT,
                env=child_env(mmap_threshold),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    elapsed = time.perf_counter() - started
    if os.path.exists(out_path):
        with open(out_path) as handle:
            result = json.load(handle)
    else:
        with open(log_path) as handle:
            tail = handle.read()[-2000:]
        result = {
            "status": "error",
            "name": name,
            "spec": spec,
            "error": f"worker exited with {returncode}",
            "log_tail": tail,
        }
    result["process_wall_s"] = elapsed
    result["returncode"] = returncode
    result["log"] = os.path.relpath(log_path, output_dir)
    return result


def approx_lm_parameters(size: str) -> int:
    """Parameter count of a causal-LM size from its shape (weight matrices and embeddings; biases and norms
    left out), to find the largest without building it. Llama: 4·h² attention + 3·h·intermediate MLP per
    layer, untied input and output embeddings; GPT-2: 12·h² per layer, tied token and position embeddings."""
    from benchmarks.models import SIZES, intermediate_size

    s = SIZES[size]
    if s.family == "llama":
        per_layer = 4 * s.hidden * s.hidden + 3 * s.hidden * intermediate_size(s.hidden)
        return s.layers * per_layer + 2 * s.vocab * s.hidden
    return 12 * s.hidden * s.hidden * s.layers + (s.vocab + max(s.seq_len, 128)) * s.hidden


def timed_separately(result: dict[str, Any], spec: dict[str, Any], output_dir: str, timeout: float | None):
    """Replace a CPU memory run's step and checkpoint-save times by those of a second run without
    MALLOC_MMAP_THRESHOLD_.

    The threshold makes every buffer over 64 KiB a fresh mmap (page faults on first touch, munmap on
    free): right for peak memory, but it slowed steps 1.2-2x (llama-m: plain 1.75x, bros-r16-fd
    1.81x, masoba-fd 2.05x; llama-l: plain 1.21x, bros-r16-fd 1.57x), unevenly, so time ratios are
    read from a run with glibc's default allocator settings. The memory run's times stay as
    ``memory_run_*``.
    """
    timed = run_child(dict(spec, name=spec["name"] + "__timing", eval_every=0), output_dir, timeout, False)
    if result.get("status") != "ok" or timed.get("status") != "ok":
        return result
    for key in ("step_time_s", "step_cpu_s", "save_time_s"):
        result[f"memory_run_{key}"] = result[key]
        result[key] = timed[key]
    result["timing_method"] = "separate process with glibc's default allocator settings"
    with open(os.path.join(output_dir, "runs", f"{spec['name']}.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    return result


def build_plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    profile_name = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    settings = dict(PROFILES[profile_name])
    settings["profile"] = profile_name
    settings["device"] = "cpu" if args.quick else args.device
    given = {
        key: getattr(args, key)
        for key in (*SIZE_SETTINGS, "lr", "aux_lr", "upper_lr", "ma_weight", "threads")
        if getattr(args, key) is not None
    }
    settings.update(given)
    settings.update(
        seed=args.seed,
        resample_interval=args.resample_interval,
        bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing,
        loss_chunk_size=args.loss_chunk_size,
        z_dtype=args.z_dtype,
        optim=args.optim,
    )
    grid: dict[str, Any] = dict(settings["grid"])
    if args.sizes:
        grid = {s: grid.get(s, ("all", 10)) for s in args.sizes}
    from benchmarks.models import SIZES

    unknown = [s for s in grid if s not in SIZES]
    if unknown:
        raise SystemExit(f"Unknown sizes {unknown}; choose from {sorted(SIZES)}.")
    specs = []
    resolved = {}
    for size, (names, steps, *extra) in grid.items():
        size_settings = {**settings, **(extra[0] if extra else {}), **given}
        if size_settings["batch_size"] % 3:
            raise SystemExit("--batch_size must be a multiple of 3 (balanced batches over the 3 domains).")
        chosen = list(METHODS) if names == "all" else list(names)
        if args.methods:
            chosen = list(args.methods)
        steps = args.steps or steps
        resolved[size] = {"methods": chosen, "steps": steps, **{k: size_settings[k] for k in SIZE_SETTINGS}}
        for name in chosen:
            if name not in METHODS:
                raise SystemExit(f"Unknown method {name!r}; choose from {list(METHODS)}.")
            specs.append(make_spec(size, METHODS[name], size_settings, args.output_dir, steps))
    settings["grid"] = resolved
    lm_sizes = [size for size in grid if SIZES[size].is_lm]
    if settings["device"] == "cpu" and lm_sizes:
        # The time targets are read at the largest causal LM: time it, and the largest of every other causal-LM
        # family (GPT-2 124M next to Llama 160M), again without the mmap threshold.
        families = {SIZES[size].family for size in lm_sizes}
        timed = [
            max((size for size in lm_sizes if SIZES[size].family == family), key=approx_lm_parameters)
            for family in sorted(families)
        ]
        for spec in specs:
            spec["timing_pass"] = spec["size"] in timed
        settings["timing_size"] = max(lm_sizes, key=approx_lm_parameters)
        settings["timing_sizes"] = timed
    return settings, specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Small CPU grid that finishes in a few minutes.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (full mode; --quick always uses cpu).")
    parser.add_argument("--output_dir", default=os.path.join("outputs", "benchmarks"))
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision (TrainingArguments.bf16=True) for every method; weights stay fp32.",
    )
    parser.add_argument(
        "--sizes", nargs="+", help="Model sizes (benchmarks.models.SIZES); default: the profile's."
    )
    parser.add_argument(
        "--methods", nargs="+", help=f"Methods at every size; default: the profile's. Known: {list(METHODS)}"
    )
    parser.add_argument(
        "--steps", type=int, help="Optimizer steps per configuration (default: per size, see PROFILES)."
    )
    parser.add_argument(
        "--batch_size", type=int, help="Per-device batch size (multiple of 3), all sizes; default: per size."
    )
    parser.add_argument("--lr", type=float, help="Lower-level learning rate (the lower optimizer, all methods).")
    parser.add_argument(
        "--eval_every", type=int, help="Target-loss curve: evaluate every N steps (0: only at the end)."
    )
    parser.add_argument("--n_per_domain", type=int)
    parser.add_argument("--n_target", type=int)
    parser.add_argument("--n_eval", type=int)
    parser.add_argument("--timing_warmup", type=int, help="Steps excluded from the median step time.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--aux_lr", type=float, help="BROSConfig.aux_learning_rate (default: the package default)."
    )
    parser.add_argument(
        "--upper_lr",
        type=float,
        help="BROSConfig.upper_learning_rate (profiles: the package default).",
    )
    parser.add_argument("--ma_weight", type=float, help="BROSConfig.moving_average_weight.")
    parser.add_argument(
        "--resample_interval",
        type=int,
        default=None,
        help="BROSConfig.sketch_resample_interval (default: the package default).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads in each worker (CPU profiles: 1, stable under other load).",
    )
    parser.add_argument(
        "--activation_checkpointing",
        action="store_true",
        help="Every method with the Trainer's activation checkpointing (non-reentrant): activations shrink to "
        "the layers' inputs, so the state each method holds dominates the peak.",
    )
    parser.add_argument(
        "--loss_chunk_size",
        type=int,
        help="The bilevel methods compute their per-example losses in chunks of this many tokens (BROSConfig."
        "loss_chunk_size: the whole [batch, tokens, vocab] logits are never held); the plain Trainer keeps its own "
        "loss, as a user of it would.",
    )
    parser.add_argument(
        "--z_dtype",
        choices=["float32", "bfloat16"],
        help="The bilevel methods store z in this dtype (BROSConfig.z_dtype; default float32).",
    )
    parser.add_argument(
        "--optim",
        choices=["adamw_torch", "adafactor"],
        default="adamw_torch",
        help="TrainingArguments.optim for every method (the lower optimizer). adafactor: transformers' Adafactor, "
        "whose factored second moment holds m + n floats for an [m, n] tensor, no first moment.",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds per configuration.")
    parser.add_argument(
        "--report_only", action="store_true", help="Re-render the report from OUTPUT_DIR/runs."
    )
    parser.add_argument("--no_plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks import report

    os.makedirs(args.output_dir, exist_ok=True)
    settings, specs = build_plan(args)
    results = []
    if args.report_only:
        results = report.load_runs(args.output_dir, [s["name"] for s in specs])
    else:
        started = time.perf_counter()
        for i, spec in enumerate(specs, 1):
            result = run_child(spec, args.output_dir, timeout=args.timeout)
            if spec.get("timing_pass"):
                result = timed_separately(result, spec, args.output_dir, args.timeout)
            results.append(result)
            summary = report.one_line(result)
            print(f"[{i}/{len(specs)} {time.perf_counter() - started:6.0f}s] {summary}", flush=True)
    paths = report.write_report(results, settings, args.output_dir, plots=not args.no_plots)
    print(open(paths["markdown"]).read())
    failed = [r["name"] for r in results if r.get("status") != "ok"]
    if failed:
        print(f"FAILED configurations: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
