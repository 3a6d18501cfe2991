"""Run ONE benchmark configuration in this process and write its measurements as JSON.

    python -m benchmarks.worker SPEC.json OUT.json

:mod:`benchmarks.run` starts one such process per configuration, so that every peak-memory
number starts from a fresh heap. Memory method (stated in every result):

- CUDA: ``torch.cuda.max_memory_allocated()`` during each optimizer step, minus the memory
  allocated at the baseline (reset with ``torch.cuda.reset_peak_memory_stats`` at every step start).
- CPU: peak resident set growth. The parent sets ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc
  returns freed large buffers to the OS (RSS then tracks live tensors). The baseline is the RSS after
  the model, data and trainer are built and one throw-away forward/backward warmed up the kernels
  (its gradients are freed). At every step start ``5`` is written to ``/proc/self/clear_refs``
  (resets VmHWM to the current RSS); at the step end VmHWM − baseline is that step's peak.

Step time: wall clock (and process CPU time) between ``on_step_begin`` and ``on_step_end`` of the
Trainer's callbacks: one whole optimizer step including the bilevel passes; the median is taken
over the steps after ``timing_warmup``.

State per trainable parameter: bytes of the tensors the method keeps between steps, read right
after ``optimizer.step()`` (gradients still present): weights, gradients, optimizer state, z,
r-dim coordinates (and their gradients), sketches, accumulated bilevel buffers, upper variables.
Storages are deduplicated (a view or an alias is counted once).

Checkpoint save: after the last step, one ``trainer._save_checkpoint`` (what the Trainer runs at every
``save_steps``: model weights, optimizer and scheduler state, RNG state, trainer state; for
BROSTrainer also its bilevel state file and the learned mixture as JSON and PNG, after the cross-rank
fingerprint check, which is a no-op on one process) into a fresh temporary folder. ``save_time_s`` is
its wall clock (files written to the page cache, no fsync, as in training), ``checkpoint_mb`` the
bytes of every file written, ``save_peak_mb`` the memory growth during the save (same meter as the
steps, over the memory just before it).
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

from benchmarks.data import DOMAINS, TARGET_DOMAIN, build_data, collate
from benchmarks.models import SIZES, build_model, count_parameters

MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """Per-step peak memory over a baseline (CUDA allocator or CPU resident set, see module doc)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.baseline = 0.0
        self.can_reset = True
        if self.cuda:
            self.method = (
                "CUDA: torch.cuda.max_memory_allocated() per optimizer step minus the allocated memory at a "
                "baseline taken after the model, data and trainer were built and one warm-up forward/backward"
            )
        else:
            threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
            self.method = (
                "CPU: peak RSS growth (VmHWM from /proc/self/status, reset at every step start by writing 5 to "
                "/proc/self/clear_refs) over the RSS baseline taken after the model, data and trainer were built "
                f"and one warm-up forward/backward; MALLOC_MMAP_THRESHOLD_={threshold}"
            )

    def current_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / MB
        return (_status_kb("VmRSS") or 0) / 1024.0

    def take_baseline(self) -> float:
        gc.collect()
        self.baseline = self.current_mb()
        self.reset()
        return self.baseline

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.can_reset = False  # peak then covers everything since the process started

    def high_water_mb(self) -> float:
        """Peak memory since the last :meth:`reset` (absolute, not over the baseline)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MB
        return (_status_kb("VmHWM") or 0) / 1024.0

    def peak_mb(self) -> float:
        """Peak memory since the last :meth:`reset`, over the baseline."""
        return self.high_water_mb() - self.baseline


# ---------------------------------------------------------------------------------- checkpoint save
def measure_checkpoint_save(trainer: Any, meter: MemoryMeter) -> dict[str, Any]:
    """Time one full ``trainer._save_checkpoint`` into a temporary folder; its size on disk, per file.

    ``args.output_dir`` points at the temporary folder for the save only (the checkpoint lands in its
    ``checkpoint-N``), then is restored; the folder is deleted afterwards."""
    model = trainer.model
    gc.collect()
    meter.reset()
    before = meter.current_mb()
    run_dir = trainer.args.output_dir
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as directory:
        trainer.args.output_dir = directory
        try:
            started = time.perf_counter()
            trainer._save_checkpoint(model, trial=None)
            wall = time.perf_counter() - started
        finally:
            trainer.args.output_dir = run_dir
        peak = meter.high_water_mb() - before
        files = {
            os.path.relpath(os.path.join(root, name), directory): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(directory)
            for name in names
        }
    return {
        "save_time_s": wall,
        "save_peak_mb": peak,
        "checkpoint_mb": sum(files.values()) / MB,
        "checkpoint_files": dict(sorted(files.items())),
    }


# ---------------------------------------------------------------------------------- state
def state_bytes(trainer: Any, method: str) -> dict[str, int]:
    """Bytes held between steps, by category, each storage counted once (first category wins)."""
    seen: set[int] = set()
    out: dict[str, int] = {}

    def add(category: str, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return
        seen.add(key)
        out[category] = out.get(category, 0) + storage.nbytes()

    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        add("weights", p)
    for p in params:
        add("gradients", p.grad)
    coordinates = getattr(trainer, "_coordinates", {}) or {}
    for c in coordinates.values():
        add("gradients", c.grad)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                add("optimizer_state", value)
    engine = getattr(trainer, "engine", None)
    if engine is not None:
        for z in engine.z.values():
            add("z", z)
        for c in coordinates.values():
            add("coordinates", c)
        for sketch in (engine.sketch_p, engine.sketch_q, engine.sketch_u):
            for matrix in sketch.matrices.values():
                add("sketches", matrix)
        accumulated = getattr(trainer, "_accumulated", None)  # Terms of the step in progress, if any
        for group in (accumulated.groups() if accumulated is not None else {}).values():
            for value in group.values():
                add("bilevel_buffers", value)
        upper = trainer.upper
        for value in (upper.logits, upper.momentum, upper.second_moment, upper.tail_sum, upper.previous_tail_sum):
            add("upper", value)
    return out


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def target_loss(model: torch.nn.Module, dataset: Any, batch_size: int, device: str) -> float:
    """Mean per-example loss on ``dataset`` (the fixed evaluation sample of the target domain)."""
    from bros_hf.losses import per_example_losses

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        losses = per_example_losses(model(**batch), labels)
        total += float(losses.sum())
        count += losses.numel()
    model.train(was_training)
    return total / max(count, 1)


def make_callback(bench: dict[str, Any]):
    from transformers import TrainerCallback

    class BenchCallback(TrainerCallback):
        """Timestamps and memory peaks of every optimizer step; state snapshot; target-loss curve."""

        def on_step_begin(self, args, state, control, **kwargs):
            meter: MemoryMeter = bench["meter"]
            meter.reset()
            if meter.cuda:
                torch.cuda.synchronize()
            bench["_t0"] = time.perf_counter()
            bench["_c0"] = time.process_time()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == bench["snapshot_step"]:
                bench["state_bytes"] = state_bytes(bench["trainer"], bench["spec"]["method"])

        def on_step_end(self, args, state, control, **kwargs):
            meter: MemoryMeter = bench["meter"]
            if meter.cuda:
                torch.cuda.synchronize()
            bench["step_wall"].append(time.perf_counter() - bench["_t0"])
            bench["step_cpu"].append(time.process_time() - bench["_c0"])
            bench["step_peak_mb"].append(meter.peak_mb())
            step = state.global_step
            every = bench["spec"]["eval_every"]
            if every and (step % every == 0 or step == args.max_steps):
                trainer = bench["trainer"]
                loss = target_loss(
                    trainer.model, bench["eval_ds"], bench["spec"]["batch_size"], bench["device"]
                )
                bench["target_curve"].append([step, loss])

    return BenchCallback()


# ---------------------------------------------------------------------------------- one run
def build_trainer(spec: dict[str, Any], model, train_ds, target_ds, output_dir: str, callbacks: list):
    from transformers import Trainer, TrainingArguments

    from bros_hf import BROSConfig, BROSTrainer

    common = dict(
        output_dir=output_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        optim=spec.get("optim", "adamw_torch"),
        weight_decay=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not spec["device"].startswith("cuda"),
        bf16=bool(spec.get("bf16", False)),
        activation_checkpointing=bool(spec.get("activation_checkpointing", False)),
        activation_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    if spec["method"] == "plain":
        args = TrainingArguments(**common)
        return Trainer(
            model=model, args=args, train_dataset=train_ds, data_collator=collate, callbacks=callbacks
        )
    bilevel = dict(
        bilevel_method=spec["method"],
        upper_level="domain",
        domains=list(DOMAINS),
        subspace_rank=spec.get("rank") or 16,
        hessian_mode=spec["hessian_mode"],
    )
    if spec.get("resample_interval") is not None:
        bilevel["sketch_resample_interval"] = spec["resample_interval"]
    if spec.get("lower_full_space_modules") is not None:
        bilevel["lower_full_space_modules"] = spec["lower_full_space_modules"]
    for key, field in (
        ("aux_lr", "aux_learning_rate"),
        ("upper_lr", "upper_learning_rate"),
        ("ma_weight", "moving_average_weight"),
        ("aux_step_scaling", "aux_step_scaling"),
        ("loss_chunk_size", "loss_chunk_size"),
        ("z_dtype", "z_dtype"),
    ):
        if spec.get(key) is not None:
            bilevel[field] = spec[key]
    args = BROSConfig(**common, **bilevel)
    return BROSTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        upper_dataset=target_ds,
        data_collator=collate,
        callbacks=callbacks,
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    device = spec["device"]
    size = SIZES[spec["size"]]
    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = build_model(size, spec["seed"]).to(device)
    train_ds, target_ds, eval_ds = build_data(
        size, spec["n_per_domain"], spec["n_target"], spec["n_eval"], seed=spec["seed"]
    )
    meter = MemoryMeter(device)
    bench: dict[str, Any] = {
        "spec": spec,
        "meter": meter,
        "device": device,
        "eval_ds": eval_ds,
        "step_wall": [],
        "step_cpu": [],
        "step_peak_mb": [],
        "target_curve": [],
        "snapshot_step": min(2, spec["steps"]),
        "state_bytes": {},
    }
    output_dir = spec.get("run_dir") or tempfile.mkdtemp(prefix="bench-")
    trainer = build_trainer(spec, model, train_ds, target_ds, output_dir, [make_callback(bench)])
    bench["trainer"] = trainer
    initial_target = target_loss(model, eval_ds, spec["batch_size"], device)

    # Warm-up: one throw-away forward/backward (kernels, thread pools, allocator pools), then free grads.
    batch = {k: v.to(device) for k, v in collate([train_ds[i] for i in range(spec["batch_size"])]).items()}
    model.train()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    del batch
    baseline = meter.take_baseline()

    trainer.train()
    final_target = target_loss(model, eval_ds, spec["batch_size"], device)
    checkpoint = measure_checkpoint_save(trainer, meter)

    skip = min(spec.get("timing_warmup", 2), max(len(bench["step_wall"]) - 1, 0))
    walls, cpus = bench["step_wall"][skip:], bench["step_cpu"][skip:]
    peaks = bench["step_peak_mb"]
    n_params = count_parameters(model)
    sb = bench["state_bytes"]
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    result: dict[str, Any] = {
        "status": "ok",
        "spec": spec,
        "name": spec["name"],
        "size": spec["size"],
        "family": size.family,
        "method": spec["method"],
        "rank": spec.get("rank"),
        "hessian_mode": spec.get("hessian_mode"),
        "n_params": n_params,
        "device": device,
        "memory_method": meter.method,
        "baseline_mb": baseline,
        "peak_mb": max(peaks) if peaks else float("nan"),
        "peak_mb_steady": statistics.median(peaks[1:])
        if len(peaks) > 1
        else (peaks[0] if peaks else float("nan")),
        "step_peak_mb": peaks,
        "step_time_s": statistics.median(walls) if walls else float("nan"),
        "step_cpu_s": statistics.median(cpus) if cpus else float("nan"),
        "step_times_s": bench["step_wall"],
        "step_cpu_times_s": bench["step_cpu"],
        "timing_warmup": skip,
        "state_bytes": sb,
        "state_bytes_per_param": {k: v / n_params for k, v in sb.items()},
        "state_bytes_per_param_total": sum(sb.values()) / n_params if sb else float("nan"),
        **checkpoint,
        "seq_len": size.seq_len if size.is_lm else None,
        "initial_target_loss": initial_target,
        "final_target_loss": final_target,
        "target_curve": bench["target_curve"],
        "train_loss_curve": [[h["step"], h["loss"]] for h in history],
        "upper_loss_curve": [
            [h["step"], h["bilevel/upper_loss"]]
            for h in trainer.state.log_history
            if "bilevel/upper_loss" in h
        ],
        "target_domain": TARGET_DOMAIN,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if spec["method"] != "plain":
        result["mixture_final"] = trainer.final_mixture_weights()
        result["mixture_average"] = trainer.mixture_weights()
        result["mixture_history"] = trainer.mixture_history
    result["wall_total_s"] = time.perf_counter() - started
    for key in ("peak_mb", "step_time_s", "final_target_loss", "save_time_s"):
        if not math.isfinite(result[key]):
            result["status"] = "non-finite"
    return result


def _write_json(path: str, payload: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        spec = json.load(handle)
    try:
        result = run(spec)
        code = 0
    except Exception as error:  # record the failure; the parent keeps going with other configs
        traceback.print_exc()
        result = {
            "status": "error",
            "spec": spec,
            "name": spec.get("name"),
            "error": f"{type(error).__name__}: {error}",
        }
        code = 1
    _write_json(argv[1], result)
    return code


if __name__ == "__main__":
    sys.exit(main())
