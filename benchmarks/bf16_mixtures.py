"""Which second-order mode learns the better mixture in bf16? Finite differences against double backward.

    python -m benchmarks.bf16_mixtures --output_dir outputs/bf16_mixtures              # lm2 and rules3, seeds 0 1
    python -m benchmarks.bf16_mixtures --output_dir DIR --tasks lm2 --seeds 0

BROSTrainer with the package defaults and ``bf16=True`` (autocast; on CPU here), on the known-answer mixture
tasks of :mod:`benchmarks.mixture_tasks`, once per mode: ``autograd`` (double backward, exact in the same
precision), ``finite_difference`` at the bf16 default step (``DEFAULT_FD_EPS_HALF_PRECISION``) and at the fp32
default (``DEFAULT_FD_EPS``), and an fp32 reference run (finite differences at the fp32 default). Reports the total variation of the learned mixture to the known optimum w* (lower
is better) and the run time; writes ``DIR/bf16_mixtures.json``. This is where ``hessian_mode="auto"`` takes
finite differences in bf16 too, with the larger step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
from transformers import PrinterCallback

from benchmarks.data import collate
from benchmarks.mixture_tasks import build_task, total_variation
from benchmarks.mixtures import lower_settings
from bros_hf import BROSConfig, BROSTrainer
from bros_hf.core.estimators import DEFAULT_FD_EPS, DEFAULT_FD_EPS_HALF_PRECISION

MODES: dict[str, dict[str, Any]] = {
    "autograd": dict(hessian_mode="autograd"),
    "fd (bf16 default step)": dict(hessian_mode="finite_difference", finite_difference_eps=DEFAULT_FD_EPS_HALF_PRECISION),
    "fd (fp32 default step)": dict(hessian_mode="finite_difference", finite_difference_eps=DEFAULT_FD_EPS),
    "fp32 fd (reference)": dict(bf16=False, hessian_mode="finite_difference", finite_difference_eps=DEFAULT_FD_EPS),
}


def learn_mixture(task_name: str, mode: str, seed: int, workdir: str, quick: bool = False) -> dict[str, Any]:
    task = build_task(task_name, quick=quick)
    started = time.perf_counter()
    args = BROSConfig(
        output_dir=os.path.join(workdir, f"{task_name}-{seed}"),
        upper_level="domain",
        domains=list(task.domains),
        **lower_settings(task, seed),
        **{"bf16": True, **MODES[mode]},
    )
    trainer = BROSTrainer(model=task.make_model(seed), args=args, train_dataset=task.train,
                          upper_dataset=task.target, data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    weights = np.array([trainer.mixture_weights()[d] for d in task.domains])
    return {"task": task_name, "mode": mode, "seed": seed, "weights": weights.round(4).tolist(),
            "tv": total_variation(weights, task.w_star), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/bf16_mixtures")
    parser.add_argument("--tasks", nargs="+", default=["lm2", "rules3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--quick", action="store_true", help="the tasks' short runs (a smoke test, not a result)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            for mode in args.modes:
                rows.append(learn_mixture(task, mode, seed, os.path.join(args.output_dir, "runs"), args.quick))
                print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.output_dir, "bf16_mixtures.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    print("| task | mode | TV to w* per seed | seconds |\n|---|---|---|---|")
    for task in args.tasks:
        for mode in args.modes:
            mine = [r for r in rows if r["task"] == task and r["mode"] == mode]
            tvs = " / ".join(f"{r['tv']:.3f}" for r in mine)
            print(f"| {task} | {mode} | {tvs} | {np.mean([r['seconds'] for r in mine]):.0f} |")
    return rows


if __name__ == "__main__":
    main()
