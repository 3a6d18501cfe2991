"""Soak: thousands of bilevel steps of the 3-domain toy through BROSTrainer (slow; run with -m slow).

Checks that nothing drifts out of range or leaks over a long run: λ, h, z and θ stay finite and
bounded, and neither the number of live tensors nor the resident memory grows after warm-up.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
import warnings

import pytest
import torch
from transformers import TrainerCallback

from bros_hf import BROSTrainer
from bros_hf.core.estimators import global_norm
from tests.test_trainer import LogCapture, make_args
from tests.toy import TinyClassifier, three_domain_toy

STEPS = 3000
EVERY = 250
WARM_UP = 500
# Legitimate growth: the mixture history (~0.15 kB per step, ~0.4 MB over the run), the log history,
# and allocator noise: inside pytest, one ~3.7 MB step appears near step 2500 (a 7.5 MB dict resize
# in the interpreter, seen with tracemalloc; not in a plain script). Keeping each step's lower-level
# results alive instead (a leaked graph) grows resident memory by far more than this.
RSS_TOLERANCE_MB = 8.0
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc)


def fix_mmap_threshold() -> None:
    """Stop glibc from raising its mmap threshold after each large free.

    Otherwise a large temporary buffer, once freed, makes later buffers of that size come from the
    heap, which glibc rarely returns: resident memory would step up without any leak.
    """
    with open("/proc/self/maps") as maps:
        if "libc.so.6" in maps.read():
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def resident_mb() -> float:
    """VmRSS of this process, in MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class Probe(TrainerCallback):
    """Every EVERY steps: resident memory, live tensors and the size of the bilevel state."""

    def __init__(self):
        self.trainer: BROSTrainer | None = None
        self.readings: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % EVERY:
            return
        upper, engine = self.trainer.upper, self.trainer.engine
        rss = resident_mb()
        # Counting walks every Python object, which itself moves resident memory: only twice.
        count = live_tensors() if state.global_step in (WARM_UP, args.max_steps) else -1
        self.readings.append(
            {
                "step": state.global_step,
                "rss_mb": rss,
                "tensors": count,
                "lambda_max": float(upper.logits.abs().max()),
                "h_norm": float(upper.momentum.norm()),
                "z_norm": float(global_norm(engine.z)),
                "theta_norm": float(global_norm(engine.params)),
            }
        )


@pytest.mark.slow
def test_long_run_stays_finite_bounded_and_does_not_leak(tmp_path):
    fix_mmap_threshold()
    torch.manual_seed(0)
    train_ds, target_ds = three_domain_toy()
    probe, logs = Probe(), LogCapture()
    args = make_args(tmp_path, max_steps=STEPS, logging_steps=EVERY, sketch_resample_interval=4)
    trainer = BROSTrainer(
        model=TinyClassifier(),
        args=args,
        train_dataset=train_ds,
        upper_dataset=target_ds,
        callbacks=[probe, logs],
    )
    probe.trainer = trainer
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    print(f"\n{STEPS} steps in {elapsed:.1f} s ({1000 * elapsed / STEPS:.1f} ms/step)")
    for reading in probe.readings:
        print({k: round(v, 4) for k, v in reading.items()})

    assert [r["step"] for r in probe.readings] == list(range(EVERY, STEPS + 1, EVERY))
    for reading in probe.readings:
        assert all(math.isfinite(v) for v in reading.values()), reading
        # λ is re-centred and moves like log(steps) once the mixture has converged (measured max |λ| 0.62 → 5.72);
        # h, the moving average of the weight gradient G, fluctuates without drifting (measured 0.78-2.08; the
        # former bound 1 already failed at step 500 on commit 0f95a5b, with the same reading 1.089); z grows
        # slowly towards its norm bound 5 (measured 1.53 → 4.95).
        assert reading["lambda_max"] < 15 and reading["h_norm"] < 5, reading
        assert reading["z_norm"] < 50 and reading["theta_norm"] < 50, reading
    for entry in logs.logs:
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float)), entry
    assert sum(entry.get("bilevel/skipped_steps", 0.0) for entry in logs.logs) == 0
    assert trainer.mixture_weights()["A"] > 0.95

    after_warm_up = [r for r in probe.readings if r["step"] >= WARM_UP]
    assert after_warm_up[0]["tensors"] == after_warm_up[-1]["tensors"] > 0, "live tensors must not accumulate"
    baseline = after_warm_up[0]["rss_mb"]
    growth = max(r["rss_mb"] for r in after_warm_up) - baseline
    assert growth <= RSS_TOLERANCE_MB, (growth, [r["rss_mb"] for r in after_warm_up])
