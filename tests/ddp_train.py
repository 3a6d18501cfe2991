"""Train the 3-domain toy with BROSTrainer; runs under plain Python and under `accelerate launch`.

Each process writes its final λ, h and z to OUTPUT_DIR/final_state_rank{R}.pt for comparison.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bros_hf import BROSConfig, BROSTrainer  # noqa: E402
from tests.toy import TinyClassifier, three_domain_toy  # noqa: E402


def main() -> None:
    (args,) = HfArgumentParser(BROSConfig).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    train_ds, target_ds = three_domain_toy(n_per_domain=128, n_target=128)
    trainer = BROSTrainer(model=TinyClassifier(), args=args, train_dataset=train_ds, upper_dataset=target_ds)
    trainer.train()
    state = {
        "logits": trainer.upper.logits.cpu(),
        "momentum": trainer.upper.momentum.cpu(),
        "z": {n: z.cpu() for n, z in trainer.engine.z.items()},
        "params": {n: p.detach().cpu() for n, p in trainer.engine.params.items()},
        "world_size": args.world_size,
    }
    torch.save(state, os.path.join(args.output_dir, f"final_state_rank{args.process_index}.pt"))


if __name__ == "__main__":
    main()
