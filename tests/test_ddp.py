"""Real two-process CPU DDP runs (gloo) through `accelerate launch`, against a single process.

Two launches in all (about 15 s of start-up each): an uninterrupted run saving every 5 steps, and
a run resumed from its checkpoint-10 in which rank 1's z is nudged by one ulp before the save of
step 25.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bros_hf.checkpointing import rank_mismatches, tensor_digest
from tests.ddp_train import PERTURB_Z_ENV, SEED_PER_RANK_ENV

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_train.py")
COMMON = [
    "--max_steps", "25", "--subspace_rank", "8", "--learning_rate", "3e-3", "--report_to", "none",
    "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--logging_steps", "5",
]  # fmt: skip
SAVES = ["--save_strategy", "steps", "--save_steps", "5"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


def ddp_command(output_dir: Path, *extra: str) -> list[str]:
    """Two CPU processes; `--cpu --num_processes 2` would silently start one."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), SCRIPT, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "12", *COMMON, *extra,
    ]  # fmt: skip


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def load_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    return torch.load(checkpoint / f"bros_state_rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """The uninterrupted two-process run, checkpoints every 5 steps."""
    output_dir = tmp_path_factory.mktemp("ddp") / "out"
    # Each rank initialises its own θ: the trainer must start both from rank 0's.
    assert_ok(run(ddp_command(output_dir, *SAVES), env={SEED_PER_RANK_ENV: "1"}))
    return output_dir


def test_two_process_ddp_keeps_ranks_identical_and_matches_single_process(ddp_run, tmp_path):
    # Per-device batch 12 on 2 processes == global batch 24 on one process (upper batches likewise).
    single_dir = tmp_path / "single"
    single_args = ["--per_device_train_batch_size", "24", "--save_strategy", "no", *COMMON]
    assert_ok(run([sys.executable, SCRIPT, "--output_dir", str(single_dir), *single_args]))

    rank0 = torch.load(ddp_run / "final_state_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / "final_state_rank1.pt", weights_only=True)
    single = torch.load(single_dir / "final_state_rank0.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    # No DistributedDataParallel wrapper (its gradient buckets would be a full gradient per process, unused).
    assert not rank0["wrapped_in_ddp"] and not rank1["wrapped_in_ddp"]

    # λ, h, z and θ bit-identical on both ranks: every update is computed from all-reduced quantities.
    assert_identical(rank0, rank1)

    # Same global batch, but the upper stream is sharded differently, so equality is statistical:
    # mixtures within 0.05 total variation after 25 steps.
    weights = [torch.softmax(state["logits"], 0) for state in (rank0, single)]
    total_variation = 0.5 * float((weights[0] - weights[1]).abs().sum())
    assert total_variation < 0.05, (weights, total_variation)
    assert int(torch.argmax(weights[0])) == int(torch.argmax(weights[1])) == 0  # domain A


def test_every_ddp_checkpoint_holds_the_bilevel_state_once(ddp_run):
    """Both ranks hold the same state (checked bit for bit before every save), so it is written once."""
    checkpoints = sorted(p.name for p in ddp_run.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == [f"checkpoint-{step}" for step in (10, 15, 20, 25, 5)]
    for name in checkpoints:
        assert not (ddp_run / name / "bros_state_rank1.pt").exists()
        state = load_state(ddp_run / name, 0)
        assert float(state["engine"]["upper"]["logits"].abs().max()) > 0, "λ must have moved"


def test_ddp_resume_reproduces_checkpoints_and_a_diverged_rank_blocks_the_save(ddp_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_run / "checkpoint-10", resumed / "checkpoint-10")
    result = run(ddp_command(resumed, *SAVES, "--resume_from_checkpoint", "last"), env={PERTURB_Z_ENV: "25"})

    # Resumed from step 10 on two processes, steps 15 and 20 are saved exactly as in the
    # uninterrupted run: bilevel state, model weights and optimizer state.
    for step in (15, 20):
        ours, theirs = resumed / f"checkpoint-{step}", ddp_run / f"checkpoint-{step}"
        assert_identical(load_state(ours, 0), load_state(theirs, 0), f"{step}/bilevel state")
        assert_identical(load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors"))
        optimizer = [torch.load(d / "optimizer.pt", weights_only=True) for d in (ours, theirs)]
        assert_identical(optimizer[0], optimizer[1], f"{step}/optimizer")

    # After step 25 rank 1's z differs in one ulp: the save must fail on every rank, name z and the
    # ranks, and leave no checkpoint (nor staging folder) for that step.
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Cross-rank consistency check failed at step 25" in output, output[-3000:]
    assert "z (engine.z) differs across ranks: net.0.weight (ranks [0] vs [1])." in output
    assert "λ (upper.logits) differs" not in output and "θ (trainable parameters) differs" not in output
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]


def test_rank_mismatches_names_quantities_tensors_and_rank_groups():
    z = torch.arange(6.0).reshape(2, 3)
    nudged = z.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(1.0))
    assert tensor_digest(z) == tensor_digest(z.clone())
    assert tensor_digest(z) != tensor_digest(nudged)
    assert tensor_digest(z) != tensor_digest(z.reshape(3, 2)), "the shape is part of the fingerprint"
    assert tensor_digest(torch.zeros(2)) != tensor_digest(-torch.zeros(2)), "bits, not values"

    def fingerprint(tensor: torch.Tensor) -> dict[str, dict[str, str]]:
        return {"λ": {"logits": tensor_digest(torch.ones(3))}, "z": {"a": tensor_digest(tensor), "b": "same"}}

    agreeing = [fingerprint(z), fingerprint(z.clone()), fingerprint(z.clone())]
    assert rank_mismatches(agreeing) == []
    diverged = [fingerprint(z), fingerprint(nudged), fingerprint(z.clone())]
    assert rank_mismatches(diverged) == ["z differs across ranks: a (ranks [0, 2] vs [1])."]


@pytest.mark.parametrize(
    "variant", [["--z_dtype", "bfloat16"], ["--optim", "adafactor"]], ids=["bfloat16_z", "adafactor"]
)
def test_variants_stay_identical_across_ranks_and_save(tmp_path, variant):
    """z_dtype='bfloat16': the stochastic rounding draws from the engine's generator, seeded alike on every rank, so
    z stays bit-identical across processes. optim='adafactor': its factored statistics come from the all-reduced
    coordinate gradients, so θ does. Both pass the saves' cross-rank check."""
    output_dir = tmp_path / "out"
    assert_ok(run(ddp_command(output_dir, "--max_steps", "10", *variant, *SAVES)))
    rank0 = torch.load(output_dir / "final_state_rank0.pt", weights_only=True)
    rank1 = torch.load(output_dir / "final_state_rank1.pt", weights_only=True)
    if "--z_dtype" in variant:
        assert all(z.dtype == torch.bfloat16 for z in rank0["z"].values())
    else:
        optimizer = torch.load(output_dir / "checkpoint-10" / "optimizer.pt", weights_only=True)
        assert any("exp_avg_sq_row" in state for state in optimizer["state"].values()), "not Adafactor's state"
    assert_identical(rank0, rank1)
    assert (output_dir / "checkpoint-10" / "bros_state_rank0.pt").exists()
