"""Where does the time of one optimizer step go? plain Trainer against BROSTrainer, per model size.

    python -m benchmarks.step_profile --sizes llama-xs llama-s llama-m vit-tiny --steps 30

Each (size, method) trains ``--steps`` steps in a process of its own, one after another (``--in_process``: all
in this one; a method run after another in the same process inherits its heap, which moved a step by up to 8 % at
GPT-2 124M), with one thread, the harness's model, data and Trainer set-up
(:func:`benchmarks.worker.build_trainer`) and light timers around the parts of a step (process CPU time, no
cProfile: its per-call cost would distort small models, whose steps are Python-bound):

- ``forward``: the model's forward and the per-example losses (BROS: ``BROSTrainer._losses``, every pass;
  plain: ``Trainer.compute_loss``), including, for BROS, ``lowrank terms fwd``: the low-rank nodes added after
  layers, and ``shifted layers fwd``: the linear layers that run as one node at W + c w Bᵀ (their own product
  included);
- ``backward``: the backward passes (BROS: ``torch.autograd.grad`` in the estimators; plain:
  ``Accelerator.backward``), including ``lowrank terms bwd`` and ``shifted layers bwd``;
- ``sketches``: drawing P, Q (and U when due); ``updates``: z, h and λ from the terms and the lower gradient
  handed to the optimizer (``BilevelEngine.apply``); ``optimizer``: the optimizer step, including θ ← θ + U a
  for BROS (``fold``);
- ``other``: the rest of the step (the Trainer's loop, data, upper batch, accumulating the terms).

The ``floor`` method is the work BROS cannot avoid: a step of :data:`FLOOR_PASSES` forward and backward passes of
the plain model on the training batch with no weight gradient (the backward goes to the input embeddings, or to
the pixels, only), as BROS's two finite-difference passes and its upper pass do, without their low-rank terms,
the full-space tensors' gradients, the bilevel updates and the optimizer. ``× floor`` is a step's time over the
floor's: how much of a BROS step is overhead; ``× plain`` of the floor row is the least a BROS step can cost
against the plain Trainer at that size.

Columns are milliseconds per step, means over the measured steps after ``--warmup``; ``step min`` and ``step
median`` are the whole step's CPU time (the minimum is the least disturbed by other jobs on a shared machine).
Writes ``OUTPUT_DIR/step_profile.json`` and ``OUTPUT_DIR/step_profile.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

FLOOR_PASSES = 3
"""Forward and backward passes per BROS step: θ + δd and θ − δd on the training batch, θ on the upper batch."""

PARTS = (
    "forward",
    "lowrank terms fwd",
    "shifted layers fwd",
    "backward",
    "lowrank terms bwd",
    "shifted layers bwd",
    "sketches",
    "updates",
    "optimizer",
    "fold",
)


class StepTimer:
    """CPU time of named parts of the current step; the outermost timer of a part counts (no double counting)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)
        self.active = False

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.active or self.depth[name]:
            self.depth[name] += 1
            try:
                yield
            finally:
                self.depth[name] -= 1
            return
        self.depth[name] += 1
        start = time.process_time()
        try:
            yield
        finally:
            self.totals[name] += time.process_time() - start
            self.depth[name] -= 1

    def wrap(self, owner: Any, attribute: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attribute`` (a function of a class, a module or an instance) as ``name``;
        returns the function that undoes it."""
        had, previous, original = attribute in vars(owner), vars(owner).get(attribute), getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, previous) if had else delattr(owner, attribute)


def _instrument(timer: StepTimer, trainer: Any, method: str) -> list[Callable[[], None]]:
    """Put the timers of :data:`PARTS` on the trainer and the library functions it calls."""
    from bros_hf.core.engine import BilevelEngine
    from bros_hf.core.lowrank import _LowRankTerms, _ShiftedLayer

    if method == "plain":
        return [timer.wrap(trainer, "compute_loss", "forward"), timer.wrap(trainer.accelerator, "backward", "backward")]
    undo = [
        timer.wrap(trainer, "_losses", "forward"),
        timer.wrap(torch.autograd, "grad", "backward"),  # the estimators' backward passes (the Trainer calls none)
        timer.wrap(BilevelEngine, "_resample_if_due", "sketches"),
        timer.wrap(BilevelEngine, "apply", "updates"),
        timer.wrap(trainer, "_fold_coordinates", "fold"),
    ]
    nodes = ((_LowRankTerms, "lowrank terms"), (_ShiftedLayer, "shifted layers"))
    for node, label in nodes:
        for attribute, suffix in (("forward", "fwd"), ("backward", "bwd")):
            original = vars(node)[attribute]  # a staticmethod: wrap its function, keep it static
            function = original.__func__

            def timed(*args: Any, _function: Callable = function, _name: str = f"{label} {suffix}", **kwargs: Any):
                with timer.part(_name):
                    return _function(*args, **kwargs)

            setattr(node, attribute, staticmethod(timed))
            undo.append(lambda _node=node, _attribute=attribute, _original=original: setattr(_node, _attribute, _original))
    return undo


def _without_weight_gradients(trainer: Any, timer: StepTimer) -> Callable[..., torch.Tensor]:
    """A ``training_step`` for the plain Trainer that runs the ``floor``: :data:`FLOOR_PASSES` forward and backward
    passes whose backward reaches only a leaf made of the model's inputs (token embeddings, or pixels), so autograd
    computes no weight-gradient product."""

    def training_step(model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        inputs = trainer._prepare_inputs(inputs)
        for _ in range(FLOOR_PASSES):
            with timer.part("forward"):
                model_inputs = dict(inputs)
                if "pixel_values" in model_inputs:
                    leaf = model_inputs["pixel_values"].detach().clone().requires_grad_(True)
                    model_inputs["pixel_values"] = leaf
                elif "input_ids" in model_inputs:
                    ids = model_inputs.pop("input_ids")
                    leaf = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    model_inputs["inputs_embeds"] = leaf
                else:
                    raise ValueError(
                        f"The floor needs input_ids or pixel_values in the batch to make its input leaf; this one has "
                        f"{sorted(model_inputs)}. Profile such a model with the plain and BROS methods only."
                    )
                loss = model(**model_inputs).loss
            with timer.part("backward"):
                torch.autograd.grad(loss, leaf)
        return loss.detach()

    return training_step


def profile_one(size_name: str, method_name: str, steps: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """Train ``steps`` steps of one configuration with the timers on; per-step means after ``warmup``."""
    from transformers import TrainerCallback

    from benchmarks.data import build_data
    from benchmarks.models import SIZES, build_model, count_parameters
    from benchmarks.profile_memory import quick_spec
    from benchmarks.run import METHODS
    from benchmarks.worker import build_trainer

    torch.set_num_threads(1)
    floor = method_name == "floor"
    method = METHODS["plain" if floor else method_name]
    size = SIZES[size_name]
    spec = quick_spec(method.name, steps, "cpu", batch_size)
    torch.manual_seed(0)
    model = build_model(size, 0)
    train_ds, target_ds, _ = build_data(size, 128, 96, 6, seed=0)
    timer = StepTimer()
    step_times: list[float] = []
    per_step: list[dict[str, float]] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.totals.clear()
            timer.active = True
            self.start = time.process_time()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_start = time.process_time()

        def on_optimizer_step(self, args, state, control, **kwargs):
            timer.totals["optimizer"] += time.process_time() - self.optimizer_start

        def on_step_end(self, args, state, control, **kwargs):
            timer.active = False
            if state.global_step > warmup:
                step_times.append(time.process_time() - self.start)
                per_step.append(dict(timer.totals))

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(spec, model, train_ds, target_ds, output_dir, [Steps()])
        trainer.args.logging_steps = steps  # metrics read once, as in a run that logs every few hundred steps
        if floor:
            trainer.training_step = _without_weight_gradients(trainer, timer)
            undo = []
        else:
            undo = _instrument(timer, trainer, method.method)
        try:
            trainer.train()
        finally:
            for restore in reversed(undo):
                restore()
    if not per_step:
        raise SystemExit(f"{size_name}/{method_name}: no step after the {warmup} warm-up steps; raise --steps.")
    mean = {part: 1000 * sum(p.get(part, 0.0) for p in per_step) / len(per_step) for part in PARTS}
    step_mean = 1000 * statistics.fmean(step_times)
    named = mean["forward"] + mean["backward"] + mean["sketches"] + mean["updates"] + mean["optimizer"]
    return {
        "size": size_name,
        "method": method_name,
        "n_params": count_parameters(model),
        "batch_size": batch_size,
        "measured_steps": len(step_times),
        "pid": os.getpid(),
        "step_min_ms": 1000 * min(step_times),
        "step_median_ms": 1000 * statistics.median(step_times),
        "step_mean_ms": step_mean,
        "parts_ms": mean,
        "other_ms": step_mean - named,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| size | params | method | step min | step median | × plain (min) | × floor (min) | forward "
        "| of which low-rank | of which shifted layers | backward | of which low-rank | of which shifted layers "
        "| sketches | updates | optimizer (fold) | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    minima = {reference: {x["size"]: x["step_min_ms"] for x in results if x["method"] == reference}
              for reference in ("plain", "floor")}

    def ratio(r: dict[str, Any], reference: str) -> str:
        base = minima[reference]
        return f"{r['step_min_ms'] / base[r['size']]:.2f}" if r["size"] in base else "—"

    for r in results:
        p = r["parts_ms"]
        lines.append(
            f"| {r['size']} | {r['n_params'] / 1e6:.2f}M | {r['method']} | {r['step_min_ms']:.1f} | "
            f"{r['step_median_ms']:.1f} | {ratio(r, 'plain')} | {ratio(r, 'floor')} | {p['forward']:.1f} | "
            f"{p['lowrank terms fwd']:.1f} | "
            f"{p['shifted layers fwd']:.1f} | {p['backward']:.1f} | {p['lowrank terms bwd']:.1f} | "
            f"{p['shifted layers bwd']:.1f} | {p['sketches']:.1f} | {p['updates']:.1f} | "
            f"{p['optimizer']:.1f} ({p['fold']:.1f}) | {r['other_ms']:.1f} |"
        )
    return "\n".join(lines)


def profile_in_subprocess(size_name: str, method_name: str, steps: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """:func:`profile_one` in a fresh Python process (this module with ``--in_process``), so that no earlier run's
    heap, caches or threads carry over into the measurement."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, "-m", "benchmarks.step_profile", "--in_process", "--sizes", size_name,
            "--methods", method_name, "--steps", str(steps), "--warmup", str(warmup),
            "--batch_size", str(batch_size), "--output_dir", output_dir,
        ]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where ``benchmarks`` imports from
        completed = subprocess.run(command, capture_output=True, text=True, cwd=root)
        if completed.returncode != 0:
            raise SystemExit(
                f"{size_name}/{method_name} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
            )
        with open(os.path.join(output_dir, "step_profile.json")) as handle:
            (result,) = json.load(handle)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["llama-xs", "llama-s", "llama-m", "vit-tiny"])
    parser.add_argument("--methods", nargs="+", default=["plain", "floor", "bros-r16-fd"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=6)
    parser.add_argument("--output_dir", default=os.path.join("outputs", "benchmarks", "step_profile"))
    parser.add_argument("--in_process", action="store_true", help="run every (size, method) in this process")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    profile = profile_one if args.in_process else profile_in_subprocess
    results = []
    for size in args.sizes:
        for method in args.methods:
            results.append(profile(size, method, args.steps, args.warmup, args.batch_size))
            print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(args.output_dir, "step_profile.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    table = markdown(results)
    with open(os.path.join(args.output_dir, "step_profile.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
