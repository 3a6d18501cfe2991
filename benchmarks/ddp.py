"""Two-process DDP: per-rank peak memory and bytes all-reduced per optimizer step, plain vs MA-SOBA vs BROS.

    python -m benchmarks.ddp --output_dir outputs/ddp                 # llama-m, 6 steps, CPU gloo
    python -m benchmarks.ddp --output_dir outputs/ddp --size llama-l

Every configuration runs as 1 process and as 2 processes (``accelerate launch --multi_gpu --num_processes 2``,
gloo on CPU; the same per-device batch, so a rank's activations are those of the single process), each rank
measuring itself:

- **Memory:** the peak resident-set growth of :class:`benchmarks.worker.MemoryMeter` over its baseline (after
  the model, data and trainer are built), maximum over the optimizer steps.
- **Bytes all-reduced per optimizer step:** counted at ``torch.distributed.all_reduce``: the bilevel trainers'
  own (bucketed) all-reduces, and the plain Trainer's DDP buckets, routed there by DDP's Python all-reduce
  hook (the same operation as its built-in one). Mean over the steps; logging is off so that no
  metric gathering is counted.
- ``bros-ddp-wrapped`` is BROS with the model wrapped in ``DistributedDataParallel`` as accelerate would (the
  trainer's own preparation keeps it out): the memory its unused gradient buckets cost.

Printed with the bound ``r/n + full-space share`` for BROS's bytes relative to plain DDP: r/n the ratio of
subspace coordinates to entries over the sketched tensors, the share the fraction of entries in tensors whose
lower update is full-space (the embeddings by default). Writes ``DIR/ddp.json`` and ``DIR/ddp.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.data import build_data, collate
from benchmarks.models import SIZES, build_model, count_parameters
from benchmarks.worker import MemoryMeter, build_trainer

METHODS = {
    "plain": dict(method="plain", hessian_mode=None),
    "masoba-fd": dict(method="masoba", hessian_mode="finite_difference"),
    "bros-r16-fd": dict(method="bros", hessian_mode="finite_difference", rank=16),
    "bros-ddp-wrapped": dict(method="bros", hessian_mode="finite_difference", rank=16, wrap_ddp=True),
}


class ByteCounter:
    """Bytes handed to all-reduce, by optimizer step (Python-level all_reduce and DDP bucket hooks)."""

    def __init__(self) -> None:
        self.per_step: list[int] = [0]
        self._all_reduce = dist.all_reduce

    def install(self) -> None:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any):
            self.per_step[-1] += tensor.numel() * tensor.element_size()
            return self._all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted

    @staticmethod
    def route_ddp_through_python(model: torch.nn.parallel.DistributedDataParallel) -> None:
        """DDP's own all-reduce runs in C++; its Python all-reduce hook (the same operation) goes through
        ``torch.distributed.all_reduce``, where :meth:`install` counts it."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model.register_comm_hook(dist.group.WORLD, allreduce_hook)

    def next_step(self) -> None:
        self.per_step.append(0)


def sketch_shares(trainer: Any) -> dict[str, float]:
    """(Σ coordinates / Σ entries over sketched tensors, entries in full-space-lower tensors / all entries)."""
    engine = trainer.engine
    sketched = coordinates = full = total = 0
    for name, param in engine.params.items():
        total += param.numel()
        if engine.sketch_u.matrices[name] is None:
            full += param.numel()
        else:
            sketched += param.numel()
            coordinates += int(torch.Size(engine.sketch_u.coordinate_shape(name, param)).numel())
    return {"r_over_n": coordinates / max(sketched, 1), "full_space_share": full / max(total, 1)}


def run_worker(spec: dict[str, Any], output_dir: str) -> None:
    """One rank of one configuration: train, measure, write ``rank{R}.json``."""
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    size = SIZES[spec["size"]]
    torch.manual_seed(spec["seed"])
    model = build_model(size, spec["seed"])
    train_ds, target_ds, _ = build_data(size, spec["n_per_domain"], spec["n_target"], 8, seed=spec["seed"])
    meter, counter = MemoryMeter("cpu"), ByteCounter()
    peaks: list[float] = []

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            wrapped = trainer.model_wrapped
            if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and spec["method"] == "plain":
                counter.route_ddp_through_python(wrapped)

        def on_step_begin(self, args, state, control, **kwargs):
            meter.reset()

        def on_step_end(self, args, state, control, **kwargs):
            peaks.append(meter.peak_mb())
            counter.next_step()

    run_dir = tempfile.mkdtemp(prefix="ddp-bench-")
    trainer = build_trainer({**spec, "device": "cpu"}, model, train_ds, target_ds, run_dir, [Measure()])
    trainer.args.logging_steps = spec["steps"] + 1
    if spec.get("wrap_ddp"):  # accelerate's own preparation, which wraps the model in DDP
        trainer.accelerator.prepare_model = type(trainer.accelerator).prepare_model.__get__(trainer.accelerator)
    counter.install()
    batch = collate([train_ds[i] for i in range(spec["batch_size"])])
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    baseline = meter.take_baseline()
    trainer.train()
    steps = counter.per_step[:-1][1:] or counter.per_step[:-1]  # drop the first step (set-up broadcasts)
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "name": spec["name"],
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "rank": rank,
        "n_params": count_parameters(model),
        "baseline_mb": baseline,
        "peak_mb": max(peaks),
        "bytes_per_step": sum(steps) / len(steps),
        "bytes_by_step": counter.per_step[:-1],
        "wrapped_in_ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
    }
    if spec["method"] != "plain":
        result.update(sketch_shares(trainer))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    if dist.is_initialized():
        # Leaving the process group to interpreter shutdown aborted a rank now and then (torch 2.13, gloo:
        # "terminate called without an active exception" after its results were written).
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(spec: dict[str, Any], processes: int, output_dir: str) -> list[dict[str, Any]]:
    """Run one configuration on ``processes`` ranks; returns every rank's result."""
    os.makedirs(output_dir, exist_ok=True)
    spec_path = os.path.join(output_dir, "spec.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    worker = ["-m", "benchmarks.ddp", "--worker", spec_path, output_dir]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", *worker[1:],
        ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(f"{spec['name']} on {processes} process(es) failed:\n{completed.stderr[-3000:]}")
    return [json.load(open(os.path.join(output_dir, f"rank{r}.json"))) for r in range(processes)]


def measure(size: str, steps: int, batch_size: int, output_dir: str, methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in methods:
        for processes in (1, 2):
            spec = {
                "name": name, "size": size, "steps": steps, "batch_size": batch_size, "lr": 1e-3,
                "seed": 0, "n_per_domain": 64, "n_target": 32, "use_cpu": True, **METHODS[name],
            }  # fmt: skip
            ranks = launch(spec, processes, os.path.join(output_dir, f"{name}-{processes}"))
            rows.append({"method": name, "processes": processes, "ranks": ranks})
            print(f"{name} ×{processes}: peak {[round(r['peak_mb']) for r in ranks]} MB, "
                  f"{ranks[0]['bytes_per_step'] / 1e6:.2f} MB all-reduced per step", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], size: str) -> str:
    plain_bytes = next((r["ranks"][0]["bytes_per_step"] for r in rows if r["method"] == "plain" and r["processes"] == 2), None)
    single = {r["method"]: r["ranks"][0]["peak_mb"] for r in rows if r["processes"] == 1}
    lines = [
        f"Two-process CPU DDP (gloo), {size}: per-rank peak memory and bytes all-reduced per optimizer step.",
        "",
        "| method | peak MB, 1 process | peak MB per rank, 2 processes | 2 − 1 process | MB all-reduced / step | "
        "× plain DDP | bound r/n + full-space share |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["processes"] != 2:
            continue
        rank0, name = row["ranks"][0], row["method"]
        peak = max(r["peak_mb"] for r in row["ranks"])
        bound = f"{rank0['r_over_n'] + rank0['full_space_share']:.3f}" if "r_over_n" in rank0 else ""
        lines.append(
            f"| {name} | {single[name]:.0f} | {peak:.0f} | {peak - single[name]:+.0f} | "
            f"{rank0['bytes_per_step'] / 1e6:.2f} | "
            + (f"{rank0['bytes_per_step'] / plain_bytes:.3f}" if plain_bytes else "–")
            + f" | {bound} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default="outputs/ddp")
    parser.add_argument("--size", default="llama-m", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=6, help="per-device batch (a multiple of the 3 domains)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker[0]) as handle:
            run_worker(json.load(handle), args.worker[1])
        return
    rows = measure(args.size, args.steps, args.batch_size, args.output_dir, args.methods)
    table = markdown(rows, args.size)
    print(table)
    with open(os.path.join(args.output_dir, "ddp.json"), "w") as handle:
        json.dump({"size": args.size, "steps": args.steps, "batch_size": args.batch_size, "rows": rows}, handle, indent=1)
    with open(os.path.join(args.output_dir, "ddp.md"), "w") as handle:
        handle.write(table)


if __name__ == "__main__":
    main()
