"""Where does the memory of one bilevel step go? Per-pass peaks and saved-for-backward tensors.

    python -m benchmarks.profile_memory --size llama-m --methods plain masoba-fd bros-r16-fd bros-r16-ag

Each method runs in its own subprocess (fresh heap, ``MALLOC_MMAP_THRESHOLD_=65536``), trains
``--steps`` steps through the same Trainer set-up as :mod:`benchmarks.worker`, and on the last step
records, for every pass of the step:

- ``peak``: peak RSS (CPU) or allocated memory (CUDA) over the post-build baseline during the pass;
- ``start``: memory over the baseline when the pass starts (state held between passes);
- ``saved``: bytes of the tensors autograd saves for backward, by kind (each storage once):
  ``param`` (a parameter's own storage: no copy), ``weight-copy`` (a new tensor with a parameter's
  shape: a materialised θ + P a + … per weight), ``other`` (activations and the rest).

The passes are the estimators' primitives (monkeypatched wrappers, nothing in bros_hf is modified):
``first_order`` (one plain backward to the coordinates, and to λ for the cross term, at a possibly
perturbed point: the two finite-difference passes and the upper pass), ``autograd_lower_pass`` (the
double backward), and for ``plain`` the Trainer's ``training_step``. Writes ``OUTPUT_DIR/profile.json`` and
``OUTPUT_DIR/profile.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 1024.0 * 1024.0


class PassRecorder:
    def __init__(self, meter, params: list[torch.Tensor]):
        self.meter = meter
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.param_shapes = {tuple(p.shape) for p in params if p.dim() >= 2}
        self.records: list[dict[str, Any]] = []
        self.active = False
        self.depth = 0

    @contextlib.contextmanager
    def record(self, name: str):
        if not self.active or self.depth:
            yield
            return
        self.depth += 1
        seen: dict[int, tuple[str, int]] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                if key in self.param_storages:
                    kind = "param"
                elif t.dim() >= 2 and tuple(t.shape) in self.param_shapes:
                    kind = "weight-copy"
                else:
                    kind = "other"
                seen[key] = (kind, storage.nbytes())
            return t

        start = self.meter.current_mb() - self.meter.baseline
        self.meter.reset()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
        finally:
            self.depth -= 1
            saved: dict[str, float] = {"param": 0.0, "weight-copy": 0.0, "other": 0.0}
            for kind, nbytes in seen.values():
                saved[kind] += nbytes / MB
            self.records.append(
                {"pass": name, "start_mb": start, "peak_mb": self.meter.peak_mb(), "saved_mb": saved}
            )


def _wrap(module: Any, attr: str, recorder: PassRecorder, name: str) -> None:
    original = getattr(module, attr)

    def wrapped(*args, **kwargs):
        with recorder.record(name):
            return original(*args, **kwargs)

    setattr(module, attr, wrapped)


def quick_spec(
    method_name: str, steps: int, device: str, batch_size: int, activation_checkpointing: bool = False
) -> dict[str, Any]:
    """A :func:`benchmarks.worker.build_trainer` spec for one method with the quick profile's settings."""
    from benchmarks.run import METHODS, PROFILES

    method = METHODS[method_name]
    settings = PROFILES["quick"]
    return {
        "method": method.method,
        "rank": method.rank,
        "hessian_mode": method.hessian_mode,
        "steps": steps,
        "batch_size": batch_size,
        "lr": settings["lr"],
        "seed": 0,
        "device": device,
        "upper_lr": settings["upper_lr"],
        "activation_checkpointing": activation_checkpointing,
    }


def profile_one(
    size_name: str, method_name: str, steps: int, device: str, batch_size: int = 6, activation_checkpointing: bool = False
) -> dict[str, Any]:
    import bros_hf.core.estimators as estimators
    from benchmarks.data import build_data, collate
    from benchmarks.models import SIZES, build_model, count_parameters
    from benchmarks.run import METHODS
    from benchmarks.worker import MemoryMeter, build_trainer

    torch.set_num_threads(1)
    method = METHODS[method_name]
    size = SIZES[size_name]
    spec = quick_spec(method_name, steps, device, batch_size, activation_checkpointing)
    model = build_model(size, 0).to(device)
    train_ds, target_ds, _ = build_data(size, 64, 48, 6, seed=0)
    trainer = build_trainer(spec, model, train_ds, target_ds, "/tmp/bros-profile-out", [])
    meter = MemoryMeter(device)
    params = [p for p in model.parameters() if p.requires_grad]
    recorder = PassRecorder(meter, params)
    _wrap(estimators, "_first_order", recorder, "first_order")
    _wrap(estimators, "_lower_pass_autograd", recorder, "autograd_lower_pass")
    if method.method == "plain":
        original_step = trainer.training_step

        def training_step(*args, **kwargs):
            with recorder.record("training_step (forward+backward)"):
                return original_step(*args, **kwargs)

        trainer.training_step = training_step

    from transformers import TrainerCallback

    class LastStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            recorder.active = state.global_step + 1 == steps
            if recorder.active:
                recorder.records.clear()
                meter.reset()

        def on_step_end(self, args, state, control, **kwargs):
            if recorder.active:  # each pass resets the high-water mark: the step peak is the max over passes
                recorder.step_peak = max([r["peak_mb"] for r in recorder.records] + [meter.peak_mb()])
            recorder.active = False

    trainer.add_callback(LastStep())
    batch = {k: v.to(device) for k, v in collate([train_ds[i] for i in range(batch_size)]).items()}
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    del batch
    meter.take_baseline()
    trainer.train()
    n = count_parameters(model)
    return {
        "size": size_name,
        "method": method_name,
        "n_params": n,
        "weights_mb": sum(p.numel() * p.element_size() for p in params) / MB,
        "step_peak_mb": getattr(recorder, "step_peak", float("nan")),
        "passes": recorder.records,
        "memory_method": meter.method,
    }


def markdown(profiles: list[dict[str, Any]]) -> str:
    lines = ["# Memory of one bilevel step, pass by pass", ""]
    if profiles:
        lines.append(f"Memory: {profiles[0]['memory_method']}. Values in MB.")
        lines.append("")
    for p in profiles:
        lines.append(
            f"## {p['size']} / {p['method']}: {p['n_params'] / 1e6:.2f}M parameters, weights {p['weights_mb']:.1f} MB, "
            f"step peak {p['step_peak_mb']:.1f} MB"
        )
        lines.append("")
        lines.append(
            "| pass | start | peak | saved: param (no copy) | saved: weight-size copies | saved: activations/other |"
        )
        lines.append("|---|---|---|---|---|---|")
        for r in p["passes"]:
            s = r["saved_mb"]
            lines.append(
                f"| {r['pass']} | {r['start_mb']:.1f} | {r['peak_mb']:.1f} | {s['param']:.1f} | {s['weight-copy']:.1f} "
                f"| {s['other']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="llama-m")
    parser.add_argument(
        "--methods", nargs="+", default=["plain", "masoba-ag", "masoba-fd", "bros-r16-ag", "bros-r16-fd"]
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="Profile the last of this many steps (z ≠ 0 from step 2)."
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=6, help="Per-device batch (e.g. 3 for gpt2-124m at 512 tokens).")
    parser.add_argument("--activation_checkpointing", action="store_true", help="The Trainer's activation checkpointing.")
    parser.add_argument("--output_dir", default=os.path.join("outputs", "benchmarks", "profile"))
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        result = profile_one(
            args.size, args.single, args.steps, args.device, args.batch_size, args.activation_checkpointing
        )
        print("PROFILE_JSON " + json.dumps(result))
        return 0
    from benchmarks.run import REPO_ROOT, child_env

    os.makedirs(args.output_dir, exist_ok=True)
    profiles = []
    for method in args.methods:
        command = [
            sys.executable,
            "-m",
            "benchmarks.profile_memory",
            "--size",
            args.size,
            "--steps",
            str(args.steps),
        ]
        command += ["--device", args.device, "--batch_size", str(args.batch_size), "--single", method]
        command += ["--activation_checkpointing"] if args.activation_checkpointing else []
        proc = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("PROFILE_JSON ")]
        if proc.returncode or not line:
            print(f"{method}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        profiles.append(json.loads(line[0][len("PROFILE_JSON ") :]))
    with open(os.path.join(args.output_dir, "profile.json"), "w") as handle:
        json.dump(profiles, handle, indent=1)
    text = markdown(profiles)
    with open(os.path.join(args.output_dir, "profile.md"), "w") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
