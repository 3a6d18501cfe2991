"""A real two-process CPU DDP run (gloo) through `accelerate launch`, against a single process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_train.py")
COMMON = [
    "--max_steps", "25", "--subspace_rank", "8", "--learning_rate", "3e-3", "--save_strategy", "no",
    "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--logging_steps", "5",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_process_ddp_keeps_ranks_identical_and_matches_single_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    # Per-device batch 12 on 2 processes == global batch 24 on one process (upper batches likewise).
    run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), SCRIPT, "--output_dir", str(ddp_dir),
        "--per_device_train_batch_size", "12", *COMMON,
    ])
    run([sys.executable, SCRIPT, "--output_dir", str(single_dir), "--per_device_train_batch_size", "24", *COMMON])

    rank0 = torch.load(ddp_dir / "final_state_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_dir / "final_state_rank1.pt", weights_only=True)
    single = torch.load(single_dir / "final_state_rank0.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1

    # λ, h, z and θ bit-identical on both ranks: every update is computed from all-reduced quantities.
    assert torch.equal(rank0["logits"], rank1["logits"])
    assert torch.equal(rank0["momentum"], rank1["momentum"])
    for name in rank0["z"]:
        assert torch.equal(rank0["z"][name], rank1["z"][name]), name
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name

    # Same global batch, but the upper stream is sharded differently, so equality is statistical:
    # mixtures within 0.05 total variation after 25 steps.
    weights = [torch.softmax(state["logits"], 0) for state in (rank0, single)]
    total_variation = 0.5 * float((weights[0] - weights[1]).abs().sum())
    assert total_variation < 0.05, (weights, total_variation)
    assert int(torch.argmax(weights[0])) == int(torch.argmax(weights[1])) == 0  # domain A
