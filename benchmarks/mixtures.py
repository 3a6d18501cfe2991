"""Learned data mixtures against a known best mixture w*: BROS, MA-SOBA, DoReMi-style, DoGE-style, uniform.

    python -m benchmarks.mixtures --output_dir outputs/mixtures           # default: 2 seeds (1 thread, ~13 min)
    python -m benchmarks.mixtures --output_dir outputs/mixtures --quick   # fewer steps, one seed (~3 min)
    python -m benchmarks.mixtures --output_dir DIR --tasks rules3 --seeds 0 1 2 --steps 500

For every task (``benchmarks.mixture_tasks``: ``rules3``, ``rules4`` with an exact w*; ``lm2`` with w* =
the target's composition) and method, it reports the learned mixture w, TV(w, w*) = ½ ‖w − w*‖₁, the
target loss of a FRESH model trained with the plain ``transformers.Trainer`` on data sampled with w
(mean per-example loss on held-out target examples), and the wall time of the mixture-learning run.

Methods, all on the task's model, batch size, AdamW learning rate and number of steps T:

- ``uniform``: w = 1/K, nothing learned;
- ``bros`` / ``masoba``: ``BROSTrainer`` with ``BROSConfig(bilevel_method=..., upper_level="domain")`` and
  the package defaults for every bilevel knob; w = ``trainer.mixture_weights()`` (tail average);
- ``doremi``: DoReMi-style Group DRO on excess loss over a uniform-mixture reference (2T steps in all);
- ``doge``: DoGE-style exponentiated gradient on the inner product of each domain's gradient with
  the target gradient, normalised by its RMS over domains (K + 1 backward passes per step); see ``benchmarks.mixture_baselines``;
- ``w*`` (reference row): the fresh model trained on w* itself, no learning.

Fresh model: the same initial weights (seed) for every method; T × batch training examples, domain d
contributing round(w_d T batch) of them (largest remainders), each drawn uniformly with replacement
from domain d, shuffled by the Trainer; T steps at the task's learning rate (linear decay). Every
method runs in this process with ``torch.set_num_threads(--threads)`` (1 by default).

Output in ``--output_dir``: ``mixtures.json`` (settings, versions, command, every run, the per-task
summary and the tasks where BROS's fresh-model target loss is above the best baseline's),
``mixtures.md`` (the table) and ``mixtures.png`` (mixtures and fresh-model losses per task).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
import torch
import transformers
from torch.utils.data import Subset
from transformers import PrinterCallback, Trainer, TrainingArguments

from benchmarks.data import DictDataset, collate
from benchmarks.mixture_baselines import BalancedBatches, UniformBatches, doge, doremi, losses_of
from benchmarks.mixture_tasks import TASKS, MixtureTask, build_task, total_variation
from bros_hf import BROSConfig, BROSTrainer

matplotlib.use("Agg")

METHODS = ("uniform", "bros", "masoba", "doremi", "doge", "w*")
BASELINES = ("uniform", "doremi", "doge")
EVAL_BATCH = 256


# ---------------------------------------------------------------------------------------------- methods
def lower_settings(task: MixtureTask, seed: int) -> dict[str, Any]:
    """The TrainingArguments every training of ``task`` shares (mixture learning and the fresh model)."""
    return dict(
        max_steps=task.steps,
        per_device_train_batch_size=task.batch_size,
        learning_rate=task.learning_rate,
        logging_steps=task.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def run_bilevel(task: MixtureTask, method: str, seed: int, workdir: str) -> tuple[np.ndarray, dict[str, Any]]:
    """BROSTrainer (``method`` = "bros" or "masoba") with the package's bilevel defaults."""
    args = BROSConfig(
        output_dir=os.path.join(workdir, f"{task.name}-{method}-{seed}"),
        bilevel_method=method,
        upper_level="domain",
        domains=list(task.domains),
        **lower_settings(task, seed),
    )
    trainer = BROSTrainer(
        model=task.make_model(seed),
        args=args,
        train_dataset=task.train,
        upper_dataset=task.target,
        data_collator=collate,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    final = [trainer.final_mixture_weights()[d] for d in task.domains]
    return np.array([trainer.mixture_weights()[d] for d in task.domains]), {"final_mixture": final}


def balanced_batches(task: MixtureTask, seed: int) -> BalancedBatches:
    return BalancedBatches(task.train.columns, task.domain_ids(), len(task.domains), task.batch_size, seed)


def run_doremi(task: MixtureTask, seed: int, workdir: str) -> tuple[np.ndarray, dict[str, Any]]:
    weights = doremi(
        lambda: task.make_model(seed),
        lambda: balanced_batches(task, seed),
        len(task.domains),
        task.learning_rate,
        task.steps,
    )
    return weights, {}


def run_doge(task: MixtureTask, seed: int, workdir: str) -> tuple[np.ndarray, dict[str, Any]]:
    target = UniformBatches(task.target.columns, task.batch_size, seed + 1)
    weights = doge(
        task.make_model(seed),
        balanced_batches(task, seed),
        target,
        len(task.domains),
        task.learning_rate,
        task.steps,
    )
    return weights, {}


def fixed(weights: Callable[[MixtureTask], np.ndarray]) -> Callable[..., tuple[np.ndarray, dict[str, Any]]]:
    """A method that learns nothing: its mixture is ``weights(task)``."""
    return lambda task, seed, workdir: (weights(task), {})


RUNNERS: dict[str, Callable[..., tuple[np.ndarray, dict[str, Any]]]] = {
    "uniform": fixed(lambda task: np.full(len(task.domains), 1.0 / len(task.domains))),
    "bros": lambda task, seed, workdir: run_bilevel(task, "bros", seed, workdir),
    "masoba": lambda task, seed, workdir: run_bilevel(task, "masoba", seed, workdir),
    "doremi": run_doremi,
    "doge": run_doge,
    "w*": fixed(lambda task: task.w_star),
}


# ---------------------------------------------------------------------------------------------- fresh model
def stratified_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """n_d = ⌊w_d N⌋ plus one for the largest remainders, so Σ n_d = N (w normalised first)."""
    share = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    share = share / share.sum() * total
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts))[: total - counts.sum()]] += 1
    return counts


def mixture_sample(task: MixtureTask, weights: np.ndarray, seed: int) -> Subset:
    """steps × batch training examples, n_d of domain d drawn uniformly with replacement."""
    counts = stratified_counts(weights, task.steps * task.batch_size)
    generator = torch.Generator().manual_seed(seed)
    domain_ids = task.domain_ids()
    picks = []
    for d, n in enumerate(counts):
        members = torch.nonzero(domain_ids == d).flatten()
        picks.append(members[torch.randint(len(members), (int(n),), generator=generator)])
    return Subset(task.train, torch.cat(picks).tolist())


@torch.no_grad()
def target_loss(model: torch.nn.Module, dataset: DictDataset) -> float:
    """Mean per-example loss of ``model`` over ``dataset``."""
    model.eval()
    total = 0.0
    for start in range(0, len(dataset), EVAL_BATCH):
        batch = {k: v[start : start + EVAL_BATCH] for k, v in dataset.columns.items()}
        total += float(losses_of(model, batch).sum())
    return total / len(dataset)


def fresh_target_loss(task: MixtureTask, weights: np.ndarray, seed: int, workdir: str) -> float:
    """Target-eval loss of a fresh model trained by the plain Trainer on the ``weights`` mixture."""
    args = TrainingArguments(output_dir=os.path.join(workdir, "fresh"), **lower_settings(task, seed))
    model = task.make_model(seed)
    trainer = Trainer(
        model=model, args=args, train_dataset=mixture_sample(task, weights, seed), data_collator=collate
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return target_loss(model, task.target_eval)


def run_method(task: MixtureTask, method: str, seed: int, workdir: str) -> dict[str, Any]:
    """Learn the mixture (timed), then train and evaluate the fresh model on it."""
    start = time.perf_counter()
    weights, extra = RUNNERS[method](task, seed, workdir)
    wall = time.perf_counter() - start
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    row = {
        "task": task.name,
        "method": method,
        "seed": seed,
        "mixture": dict(zip(task.domains, weights.round(4).tolist(), strict=True)),
        "tv": total_variation(weights, task.w_star),
        "target_loss": fresh_target_loss(task, weights, seed, workdir),
        "wall_time_s": wall,
        **extra,
    }
    print(
        f"[mixtures] {task.name} {method} seed {seed}: w={weights.round(3).tolist()} TV={row['tv']:.3f} "
        f"target loss={row['target_loss']:.4f} ({wall:.1f} s)",
        flush=True,
    )
    return row


# ---------------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def summarize(runs: list[dict[str, Any]], tasks: dict[str, MixtureTask]) -> list[dict[str, Any]]:
    """Per (task, method): mean mixture, mean ± std (over seeds) of TV, fresh target loss and wall time."""
    rows = []
    for name, task in tasks.items():
        for method in METHODS:
            group = [r for r in runs if r["task"] == name and r["method"] == method]
            if not group:
                continue
            mixture = np.mean([[r["mixture"][d] for d in task.domains] for r in group], axis=0)
            tv, tv_std = mean_std([r["tv"] for r in group])
            loss, loss_std = mean_std([r["target_loss"] for r in group])
            wall, _ = mean_std([r["wall_time_s"] for r in group])
            rows.append(
                {
                    "task": name,
                    "method": method,
                    "seeds": len(group),
                    "mixture": dict(zip(task.domains, mixture.round(4).tolist(), strict=True)),
                    "tv": tv,
                    "tv_std": tv_std,
                    "target_loss": loss,
                    "target_loss_std": loss_std,
                    "wall_time_s": wall,
                }
            )
    return rows


def bros_above_best_baseline(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks where BROS's mean fresh-model target loss is above the best of uniform / DoReMi / DoGE."""
    found = []
    for task in dict.fromkeys(r["task"] for r in summary):
        rows = {r["method"]: r for r in summary if r["task"] == task}
        baselines = {m: rows[m]["target_loss"] for m in BASELINES if m in rows}
        if "bros" not in rows or not baselines:
            continue
        best = min(baselines, key=baselines.get)
        if rows["bros"]["target_loss"] > baselines[best]:
            found.append(
                {
                    "task": task,
                    "bros_target_loss": rows["bros"]["target_loss"],
                    "best_baseline": best,
                    "best_baseline_target_loss": baselines[best],
                    "difference": rows["bros"]["target_loss"] - baselines[best],
                }
            )
    return found


def format_cell(mean: float, std: float, seeds: int, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def markdown(payload: dict[str, Any]) -> str:
    """The table (one row per task and method) with w*, the settings and the BROS-vs-baselines findings."""
    lines = [
        f"# Learned mixtures vs w* ({'quick' if payload['quick'] else 'default'} mode)",
        "",
        f"`{payload['command']}` — torch {payload['versions']['torch']}, transformers "
        f"{payload['versions']['transformers']}, {payload['threads']} thread(s), seeds {payload['seeds']}, "
        f"total {payload['wall_time_s']:.0f} s. Values: mean ± std over seeds; all methods of one seed share the "
        "fresh model's initial weights, so compare them seed by seed (`runs` in mixtures.json).",
        "",
        "| task | method | learned mixture | TV to w* | fresh-model target loss | wall time s |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["summary"]:
        mixture = "(" + ", ".join(f"{w:.3f}" for w in r["mixture"].values()) + ")"
        wall = "—" if r["method"] in ("uniform", "w*") else f"{r['wall_time_s']:.1f}"
        method = "w* (reference)" if r["method"] == "w*" else r["method"]
        lines.append(
            f"| {r['task']} | {method} | {mixture} | {format_cell(r['tv'], r['tv_std'], r['seeds'], 3)} | "
            f"{format_cell(r['target_loss'], r['target_loss_std'], r['seeds'], 4)} | {wall} |"
        )
    lines += ["", "Tasks (domains in the order of the mixtures):", ""]
    for name, info in payload["tasks"].items():
        lines.append(
            f"- `{name}`: {info['description']}; domains {info['domains']}; w* = {info['w_star']} "
            f"({info['w_star_kind']}); {info['steps']} steps, batch {info['batch_size']}, lr {info['learning_rate']}."
        )
    lines += ["", "BROS's fresh-model target loss above the best of uniform / DoReMi-style / DoGE-style:", ""]
    findings = payload["bros_above_best_baseline"]
    lines += [
        f"- `{f['task']}`: bros {f['bros_target_loss']:.4f} vs {f['best_baseline']} "
        f"{f['best_baseline_target_loss']:.4f} (+{f['difference']:.4f})"
        for f in findings
    ] or ["- none"]
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: str) -> None:
    """Per task: stacked bars of the mixtures (w* first) and the fresh-model target losses."""
    import matplotlib.pyplot as plt

    tasks = list(payload["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.2 * len(tasks)), squeeze=False)
    for row, name in zip(axes, tasks, strict=True):
        rows = [r for r in payload["summary"] if r["task"] == name]
        rows = sorted(rows, key=lambda r: r["method"] != "w*")
        labels = [r["method"] for r in rows]
        left = np.zeros(len(rows))
        for d in payload["tasks"][name]["domains"]:
            widths = np.array([r["mixture"][d] for r in rows])
            row[0].barh(labels, widths, left=left, label=d)
            left += widths
        row[0].set_title(f"{name}: mixture")
        row[0].invert_yaxis()
        row[0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        losses = [r["target_loss"] for r in rows]
        row[1].barh(labels, losses, xerr=[r["target_loss_std"] for r in rows], color="tab:gray")
        row[1].set_xlim(min(losses) * 0.97, max(losses) * 1.02)
        row[1].set_title(f"{name}: fresh-model target loss")
        row[1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(payload: dict[str, Any], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "mixtures.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    with open(os.path.join(output_dir, "mixtures.md"), "w") as handle:
        handle.write(markdown(payload))
    plot(payload, os.path.join(output_dir, "mixtures.png"))


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, help="Default: 0 1 (--quick: 0).")
    parser.add_argument(
        "--quick", action="store_true", help="Fewer steps and one seed (≤ ~5 min on 1 thread)."
    )
    parser.add_argument("--steps", type=int, help="Override every task's number of optimizer steps.")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1).")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    return args


def task_info(task: MixtureTask) -> dict[str, Any]:
    return {
        "domains": task.domains,
        "w_star": task.w_star.round(4).tolist(),
        "w_star_kind": task.w_star_kind,
        "steps": task.steps,
        "batch_size": task.batch_size,
        "learning_rate": task.learning_rate,
        "fresh_model_steps": task.steps,
        "description": task.description,
        "train_examples": len(task.train),
        "target_examples": len(task.target),
        "target_eval_examples": len(task.target_eval),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    tasks = {name: build_task(name, args.quick, args.steps) for name in args.tasks}
    runs = []
    with tempfile.TemporaryDirectory(prefix="mixtures-") as workdir:
        for task in tasks.values():
            for seed in args.seeds:
                runs += [run_method(task, method, seed, workdir) for method in args.methods]
    summary = summarize(runs, tasks)
    payload = {
        "command": shlex.join(["python", "-m", "benchmarks.mixtures", *argv]),
        "quick": args.quick,
        "seeds": args.seeds,
        "methods": args.methods,
        "threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "tasks": {name: task_info(task) for name, task in tasks.items()},
        "runs": runs,
        "summary": summary,
        "bros_above_best_baseline": bros_above_best_baseline(summary),
        "wall_time_s": time.perf_counter() - started,
    }
    write_outputs(payload, args.output_dir)
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
