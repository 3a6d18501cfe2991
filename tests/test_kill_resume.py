"""Crash safety: a checkpoint folder exists under its final name only once it is complete.

A real run is SIGKILLed in the middle of a save, and an in-process run has a save fail halfway;
both must leave the previous checkpoint as the newest one, and resuming from it must reproduce
the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from bros_hf import BROSTrainer
from tests.ddp_train import STALL_SAVE_ENV
from tests.test_trainer import make_args, train
from tests.toy import TinyClassifier, three_domain_toy

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_train.py")
ARGS = [
    "--max_steps", "30", "--save_strategy", "steps", "--save_steps", "5", "--subspace_rank", "8",
    "--per_device_train_batch_size", "24", "--learning_rate", "3e-3", "--sketch_resample_interval", "4",
    "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--logging_steps", "5",
]  # fmt: skip
FINISHED_FILES = {"rng_state.pth", "trainer_state.json", "mixture_weights.json"}


class Run:
    """ddp_train.py in a subprocess, its output in a log file (a full pipe would block the run)."""

    def __init__(self, output_dir: Path, *extra: str, env: dict[str, str] | None = None):
        environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        command = [sys.executable, SCRIPT, "--output_dir", str(output_dir), *ARGS, *extra]
        self.log = output_dir.parent / f"{output_dir.name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def finish(self) -> None:
        assert self.process.wait(timeout=300) == 0, self.tail()

    def wait_for_any(self, paths: list[Path], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(path.exists() for path in paths):
            assert self.process.poll() is None, f"the run ended before {paths} appeared: {self.tail()}"
            assert time.monotonic() < deadline, f"none of {paths} appeared within {timeout} s"
            time.sleep(0.05)


def assert_same_final_state(resumed: Path, reference: Path) -> None:
    """λ, h, z, θ bit-identical, and the exported mixture identical."""
    got = torch.load(resumed / "final_state_rank0.pt", weights_only=True)
    want = torch.load(reference / "final_state_rank0.pt", weights_only=True)
    assert torch.equal(got["logits"], want["logits"]), (got["logits"], want["logits"])
    assert torch.equal(got["momentum"], want["momentum"])
    for group in ("z", "params"):
        for name in want[group]:
            assert torch.equal(got[group][name], want[group][name]), (group, name)
    exported = [json.loads((d / "mixture_weights.json").read_text()) for d in (resumed, reference)]
    assert exported[0] == exported[1]


def test_sigkill_during_a_save_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference = Run(reference_dir)
    crashed = Run(crashed_dir, env={STALL_SAVE_ENV: "15"})
    staging = crashed_dir / "tmp-checkpoint-15"
    # The save of step 15 is halfway through (the second path is where an in-place save writes).
    crashed.wait_for_any(
        [staging / "bros_state_rank0.pt", crashed_dir / "checkpoint-15" / "bros_state_rank0.pt"]
    )
    assert (crashed_dir / "checkpoint-10").is_dir() and crashed.process.poll() is None
    crashed.process.send_signal(signal.SIGKILL)
    assert crashed.process.wait(timeout=60) == -signal.SIGKILL
    reference.finish()

    assert not (crashed_dir / "checkpoint-15").exists(), "a half-written checkpoint has its final name"
    # The half-written folder holds model, optimizer and bilevel state, but not the RNG/trainer state.
    written = set(os.listdir(staging))
    assert {"model.safetensors", "optimizer.pt", "bros_state_rank0.pt"} <= written
    assert not FINISHED_FILES & written, written
    assert get_last_checkpoint(str(crashed_dir)) == str(crashed_dir / "checkpoint-10")
    # Had it been written in place (transformers' default), resuming would have picked it up.
    in_place = tmp_path / "in_place"
    shutil.copytree(crashed_dir, in_place)
    os.rename(in_place / "tmp-checkpoint-15", in_place / "checkpoint-15")
    assert get_last_checkpoint(str(in_place)) == str(in_place / "checkpoint-15")

    Run(crashed_dir, "--resume_from_checkpoint", "last").finish()
    assert_same_final_state(crashed_dir, reference_dir)
    assert sorted(os.listdir(crashed_dir)) == sorted(os.listdir(reference_dir)), (
        "no staging folder may remain"
    )
    for step in (15, 30):
        names = [sorted(os.listdir(d / f"checkpoint-{step}")) for d in (crashed_dir, reference_dir)]
        assert names[0] == names[1]


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy()


def final_state(trainer: BROSTrainer) -> dict[str, torch.Tensor]:
    state = {"logits": trainer.upper.logits, "momentum": trainer.upper.momentum}
    state.update({f"z.{n}": z for n, z in trainer.engine.z.items()})
    state.update({f"θ.{n}": p.detach() for n, p in trainer.engine.params.items()})
    return {k: v.clone() for k, v in state.items()}


def assert_equal_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_failed_save_is_never_resumed_from_and_resaving_a_step_replaces_it(tmp_path, toy, monkeypatch):
    common = dict(max_steps=30, save_strategy="steps", save_steps=10, sketch_resample_interval=4)
    want = final_state(train(make_args(tmp_path / "reference", **common), *toy))
    run_dir = tmp_path / "out"

    save_rng_state = BROSTrainer._save_rng_state

    def disk_full_at_step_20(self: BROSTrainer, output_dir: str) -> None:
        if self.state.global_step == 20:
            raise OSError("No space left on device (injected)")
        save_rng_state(self, output_dir)

    monkeypatch.setattr(BROSTrainer, "_save_rng_state", disk_full_at_step_20)
    with pytest.raises(OSError, match="injected"):
        train(make_args(tmp_path, **common), *toy)
    monkeypatch.undo()
    assert not (run_dir / "checkpoint-20").exists(), "a half-written checkpoint has its final name"
    assert "bros_state_rank0.pt" in os.listdir(run_dir / "tmp-checkpoint-20")
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-10")

    def resume(checkpoint: str | bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)  # a different global RNG state must not matter
        trainer = BROSTrainer(
            model=TinyClassifier(),
            args=make_args(tmp_path, **common),
            train_dataset=toy[0],
            upper_dataset=toy[1],
        )
        trainer.train(resume_from_checkpoint=checkpoint)
        return final_state(trainer)

    assert_equal_states(resume(True), want)
    folders = sorted(f for f in os.listdir(run_dir) if f.startswith(("checkpoint-", "tmp-")))
    assert folders == ["checkpoint-10", "checkpoint-20", "checkpoint-30"], "the stale staging folder must go"
    # Resuming from step 10 again re-saves steps 20 and 30 over complete folders of the same name.
    first_save = (run_dir / "checkpoint-20" / "trainer_state.json").stat().st_ino
    assert_equal_states(resume(str(run_dir / "checkpoint-10")), want)
    assert (run_dir / "checkpoint-20" / "trainer_state.json").stat().st_ino != first_save
    assert not [f for f in os.listdir(run_dir) if f.startswith("tmp-")]


def test_best_model_tracking_and_rotation_see_final_folder_names(tmp_path, toy):
    """The best checkpoint is recorded (in memory and in its own trainer_state.json) by its final name
    and survives rotation; rotation keeps save_total_limit folders."""
    args = make_args(
        tmp_path,
        max_steps=20,
        save_strategy="steps",
        save_steps=5,
        eval_strategy="steps",
        eval_steps=5,
        save_total_limit=2,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest target loss is the first one: best ≠ newest
        load_best_model_at_end=True,
    )
    trainer = train(args, *toy, eval_dataset=toy[1])
    run_dir = tmp_path / "out"
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert losses == sorted(losses, reverse=True), losses
    best = str(run_dir / "checkpoint-5")
    assert trainer.state.best_model_checkpoint == best
    folders = sorted(f for f in os.listdir(run_dir) if f.startswith(("checkpoint-", "tmp-")))
    assert folders == ["checkpoint-20", "checkpoint-5"]
    for folder in folders:  # recorded when each was saved, by the final name of the best folder
        recorded = json.loads((run_dir / folder / "trainer_state.json").read_text())
        assert recorded["best_model_checkpoint"] == best, folder
