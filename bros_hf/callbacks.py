"""Export of the learned upper-level weights: JSON at every save and at the end, plus a PNG.

Files are written to a temporary name in the same directory and moved into place with
``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from bros_hf.trainer import BROSTrainer


def write_json_atomic(path: str, payload: Any) -> None:
    """json.dump into ``path`` via a temporary file and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_plot(trainer: BROSTrainer, output_dir: str) -> str | None:
    """Mixture trajectory (domain mode) or histogram of example weights (sample mode) as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: skipping the PNG plot (pip install matplotlib).", stacklevel=2
        )
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    if trainer.args.upper_level == "domain":
        history = trainer.mixture_history
        for d, name in enumerate(trainer.domains):
            axis.plot(range(1, len(history) + 1), [w[d] for w in history], label=name)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("mixture weight")
        axis.set_title(f"Learned domain mixture ({trainer.args.bilevel_method})")
        axis.legend()
        name = "mixture_weights.png"
    else:
        axis.hist(trainer.sample_weights().numpy(), bins=50)
        axis.set_xlabel("example weight σ(λ_i)")
        axis.set_ylabel("examples")
        axis.set_title(f"Learned example weights ({trainer.args.bilevel_method})")
        name = "sample_weights.png"
    path = os.path.join(output_dir, name)
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".tmp-", suffix=".png")
    os.close(fd)
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)
    return path


class BilevelExportCallback(TrainerCallback):
    """Writes the learned weights (JSON + PNG) into ``output_dir`` at the end of training.

    Checkpoints get them from ``BROSTrainer._save_checkpoint`` instead, before the checkpoint folder
    is renamed into place (an ``on_save`` export would land in an already published folder).
    """

    def __init__(self, trainer: BROSTrainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero() and self.trainer.engine is not None:
            self.trainer.export_weights(args.output_dir)
            save_plot(self.trainer, args.output_dir)
