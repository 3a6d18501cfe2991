"""Example weights under label noise: does the model get better, in the run and in a second training?

    python -m benchmarks.sample_weights --output_dir outputs/sample_weights                 # pair-flip 30 %, ~3 min
    python -m benchmarks.sample_weights --output_dir DIR --noise_kind uniform --noise_rate 0.4 --seeds 0 1

scikit-learn's digits (8×8, 997 noisy training / 300 clean upper / 500 test examples, ``recipes/digits.py``), a
64-64-10 tanh MLP, AdamW at 3e-3 with linear decay, batch 50, ``--steps`` optimizer steps for every training.
For each seed it trains, from the same initial weights:

- ``plain``: the plain ``transformers.Trainer`` on the noisy labels;
- ``oracle``: the plain Trainer on the uncorrupted examples only;
- ``bros`` / ``masoba``: ``BROSTrainer(upper_level="sample")`` with every bilevel knob at its package default
  (the model it trains is the in-run result), then ``<method>_second_stage``: the plain Trainer on the examples
  whose learned weight is ≥ 0.5 (``bros_hf.selection.keep_examples``), and ``<method>_refit``: the same
  BROSTrainer on a fresh model with every weight starting at its learned value (``initial_sample_weights``).

Reported per run: test accuracy and gap closed = (acc − acc_plain) / (acc_oracle − acc_plain); for the
bilevel runs also AUROC of the learned weights (corrupted vs clean) and the mean weight of clean and corrupted
examples. Output: ``sample_weights.json`` and ``sample_weights.md`` in ``--output_dir``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

import datasets
import numpy as np
import torch
import transformers

from benchmarks.mixture_tasks import MLPClassifier
from bros_hf import BROSConfig, BROSTrainer
from bros_hf.export import write_json_atomic
from bros_hf.selection import keep_examples

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
import digits  # noqa: E402  (recipes/digits.py: the noisy digits split and detection metrics)

METHODS = ("bros", "masoba")


def as_dataset(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"features": x, "labels": y}).with_format("torch")


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))["logits"]
    return float((logits.argmax(-1) == torch.from_numpy(y)).float().mean())


def training_arguments(output_dir: str, steps: int, seed: int, **bilevel: Any) -> BROSConfig:
    """The same lower-level settings for every training (a BROSConfig is a TrainingArguments)."""
    return BROSConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=50, learning_rate=3e-3,
        optim="adamw_torch", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_steps=steps, seed=seed, upper_level="sample", **bilevel,
    )  # fmt: skip


def fresh_model(seed: int) -> MLPClassifier:
    torch.manual_seed(seed)
    return MLPClassifier(64, 64, 10)


def train_plain(train: datasets.Dataset, data: digits.NoisyDigits, args: BROSConfig) -> dict[str, Any]:
    model = fresh_model(args.seed)
    transformers.Trainer(model=model, args=args, train_dataset=train).train()
    return {"test_accuracy": accuracy(model, data.x_test, data.y_test), "num_train": len(train)}


def train_bilevel(
    train: datasets.Dataset, data: digits.NoisyDigits, args: BROSConfig
) -> tuple[dict[str, Any], np.ndarray]:
    """BROSTrainer in sample mode on ``train`` (the noisy labels), target = the clean validation split."""
    model = fresh_model(args.seed)
    upper = as_dataset(data.x_val, data.y_val)
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=upper)
    start = time.perf_counter()
    trainer.train()
    weights = trainer.sample_weights().numpy()
    return {
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "num_train": len(train),
        "auroc": digits.detection_metrics(weights, data.is_corrupted)["auroc"],
        "mean_weight_clean": float(weights[~data.is_corrupted].mean()),
        "mean_weight_corrupted": float(weights[data.is_corrupted].mean()),
        "wall_time_s": time.perf_counter() - start,
    }, weights


def run_seed(
    noise_kind: str, noise_rate: float, steps: int, seed: int, workdir: str
) -> dict[str, dict[str, Any]]:
    data = digits.load_noisy_digits(noise_rate, noise_kind, seed=seed)
    noisy = as_dataset(data.x_train, data.y_train)

    def args(name: str, **bilevel: Any) -> BROSConfig:
        return training_arguments(os.path.join(workdir, f"{name}-{seed}"), steps, seed, **bilevel)

    runs = {
        "plain": train_plain(noisy, data, args("plain")),
        "oracle": train_plain(
            noisy.select(np.flatnonzero(~data.is_corrupted).tolist()), data, args("oracle")
        ),
    }
    for method in METHODS:
        first = args(method, bilevel_method=method)
        runs[method], weights = train_bilevel(noisy, data, first)
        runs[f"{method}_second_stage"] = train_plain(keep_examples(noisy, weights), data, args(f"{method}-2"))
        learned = os.path.join(first.output_dir, "sample_weights.json")
        runs[f"{method}_refit"], _ = train_bilevel(
            noisy, data, args(f"{method}-refit", bilevel_method=method, initial_sample_weights=learned)
        )
    plain, oracle = runs["plain"]["test_accuracy"], runs["oracle"]["test_accuracy"]
    for run in runs.values():
        run["gap_closed"] = digits.gap_closed(run["test_accuracy"], plain, oracle)
    return runs


def _mean(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
    """The mean of ``key`` over the rows that have it, formatted; empty when none has it."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return fmt.format(float(np.mean(values))) if values else ""


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"`{payload['command']}` (torch {payload['torch']}, {payload['wall_time_s']:.0f} s); digits, "
        f"{payload['noise_rate']:.0%} {payload['noise_kind']} noise, MLP 64-64-10, {payload['steps']} steps; "
        "mean over seeds " + ", ".join(map(str, payload["seeds"])) + ".",
        "",
        "| run | test accuracy | gap closed | AUROC | mean weight clean / corrupted |",
        "|---|---|---|---|---|",
    ]
    names = ("plain", "bros", "bros_second_stage", "bros_refit", "masoba", "masoba_second_stage", "masoba_refit", "oracle")
    for name in names:
        rows = [seed_runs[name] for seed_runs in payload["runs"]]
        cells = [
            _mean(rows, "test_accuracy", "{:.3f}"),
            _mean(rows, "gap_closed", "{:.2f}"),
            _mean(rows, "auroc", "{:.3f}"),
        ]
        if "mean_weight_clean" in rows[0]:
            cells.append(
                f"{_mean(rows, 'mean_weight_clean', '{:.2f}')} / {_mean(rows, 'mean_weight_corrupted', '{:.2f}')}"
            )
        else:
            cells.append("")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--noise_kind", choices=("uniform", "pair"), default="pair")
    parser.add_argument("--noise_rate", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny model: 1).")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    workdir = os.path.join(options.output_dir, "runs")
    runs = [
        run_seed(options.noise_kind, options.noise_rate, options.steps, s, workdir) for s in options.seeds
    ]
    payload = {
        "command": "python -m benchmarks.sample_weights "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "noise_kind": options.noise_kind,
        "noise_rate": options.noise_rate,
        "steps": options.steps,
        "seeds": options.seeds,
        "runs": runs,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json_atomic(os.path.join(options.output_dir, "sample_weights.json"), payload)
    table = markdown(payload)
    with open(os.path.join(options.output_dir, "sample_weights.md"), "w") as handle:
        handle.write(table)
    print(table)
    return payload


if __name__ == "__main__":
    main()
