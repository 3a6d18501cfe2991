"""Train the 3-domain toy with BROSTrainer; runs under plain Python and under `accelerate launch`.

Each process writes its final λ, h, z and θ to OUTPUT_DIR/final_state_rank{R}.pt for comparison.
``--resume_from_checkpoint last`` resumes from the newest ``checkpoint-N`` in OUTPUT_DIR.

Fault injection for the crash and consistency tests, by environment variable:

- ``BROS_TEST_STALL_SAVE_FROM_STEP=N``: saves from step N on stall after the model, optimizer,
  scheduler and bilevel state are written, before the RNG states and trainer_state.json, so
  that a test can SIGKILL the process in the middle of a save.
- ``BROS_TEST_PERTURB_Z_AT_STEP=N``: after step N, rank 1 moves one entry of z by one ulp, a
  silent divergence between ranks that the save at that step must refuse.
- ``BROS_TEST_SEED_PER_RANK=1``: every rank initialises the model from its own seed (seed + rank), as a
  script that forgot to seed would; the trainer must start all ranks from rank 0's θ.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from transformers import HfArgumentParser, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bros_hf import BROSConfig, BROSTrainer  # noqa: E402
from tests.toy import TinyClassifier, three_domain_toy  # noqa: E402

STALL_SAVE_ENV = "BROS_TEST_STALL_SAVE_FROM_STEP"
PERTURB_Z_ENV = "BROS_TEST_PERTURB_Z_AT_STEP"
SEED_PER_RANK_ENV = "BROS_TEST_SEED_PER_RANK"


class PerturbZOnRankOne(TrainerCallback):
    """At one step, nudge the first entry of z by one ulp on rank 1 only."""

    def __init__(self, trainer: BROSTrainer, step: int):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == 1:
            flat = next(iter(self.trainer.engine.z.values())).view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), device=flat.device))


def stall_saves_from(trainer: BROSTrainer, step: int) -> None:
    """Make every save from ``step`` on hang (for an hour) after the bilevel state is written."""
    save_rng_state = trainer._save_rng_state

    def stalled(output_dir: str) -> None:
        if trainer.state.global_step >= step:
            time.sleep(3600)
        save_rng_state(output_dir)

    trainer._save_rng_state = stalled


def main() -> None:
    (args,) = HfArgumentParser(BROSConfig).parse_args_into_dataclasses()
    train_ds, target_ds = three_domain_toy(n_per_domain=128, n_target=128)
    torch.manual_seed(args.seed + (args.process_index if os.environ.get(SEED_PER_RANK_ENV) else 0))
    trainer = BROSTrainer(model=TinyClassifier(), args=args, train_dataset=train_ds, upper_dataset=target_ds)
    if STALL_SAVE_ENV in os.environ:
        stall_saves_from(trainer, int(os.environ[STALL_SAVE_ENV]))
    if PERTURB_Z_ENV in os.environ:
        trainer.add_callback(PerturbZOnRankOne(trainer, int(os.environ[PERTURB_Z_ENV])))
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    state = {
        "logits": trainer.upper.logits.cpu(),
        "momentum": trainer.upper.momentum.cpu(),
        "z": {n: z.cpu() for n, z in trainer.engine.z.items()},
        "params": {n: p.detach().cpu() for n, p in trainer.engine.params.items()},
        "world_size": args.world_size,
        "wrapped_in_ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
    }
    torch.save(state, os.path.join(args.output_dir, f"final_state_rank{args.process_index}.pt"))


if __name__ == "__main__":
    main()
