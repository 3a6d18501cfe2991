"""Export of the learned upper-level weights: plain functions on plain data, and the callback that
writes them at the end of training.

Files are written to a temporary name in the same directory, flushed to disk, and moved into place
with ``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

MIXTURE_FILE = "mixture_weights.json"
SAMPLE_WEIGHTS_FILE = "sample_weights.json"


def write_json_atomic(path: str, payload: Any) -> None:
    """``json.dump`` (indent 2; what JSON lacks as ``str``) to a temporary file, fsync, then
    ``os.replace`` it into ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def mixture_payload(
    domains: Sequence[str], weights: Mapping[str, float], final: Mapping[str, float], step: int, upper_updates: int
) -> dict[str, Any]:
    """The content of ``mixture_weights.json``: ``weights``, the learned mixture to use (the tail average,
    also under its old name ``average``); ``final``, the last iterate; the optimizer step; and how many
    upper-level (λ) updates the run made (0: the weights are the initial ones)."""
    return {
        "domains": list(domains),
        "weights": dict(weights),
        "average": dict(weights),
        "final": dict(final),
        "step": step,
        "upper_updates": upper_updates,
    }


def sample_weights_payload(
    weights: Sequence[float], final: Sequence[float], step: int, upper_updates: int
) -> dict[str, Any]:
    """The content of ``sample_weights.json``: ``weights``, {training-set index (as str): learned weight}, the
    tail average of σ(λ_i) to use; ``final``, the same for the last iterate; the optimizer step and the number of
    upper-level updates (0: every weight is still the initial 0.5)."""
    return {
        "step": step,
        "upper_updates": upper_updates,
        "weights": {str(i): w for i, w in enumerate(weights)},
        "final": {str(i): w for i, w in enumerate(final)},
    }


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: skipping the PNG plot (pip install matplotlib).", stacklevel=3
        )
        return None
    return plt


def _save_figure(plt, figure, path: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".png")
    os.close(fd)
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)
    return path


def plot_mixture_history(
    history: Sequence[Sequence[float]], domains: Sequence[str], path: str, title: str
) -> str | None:
    """Mixture weight of each domain against the optimizer step, as a PNG at ``path``."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for d, name in enumerate(domains):
        axis.plot(range(1, len(history) + 1), [w[d] for w in history], label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("mixture weight")
    axis.set_title(title)
    axis.legend()
    return _save_figure(plt, figure, path)


def plot_sample_weights(weights: Sequence[float], path: str, title: str) -> str | None:
    """Histogram of the example weights σ(λ_i), as a PNG at ``path``."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(list(weights), bins=50)
    axis.set_xlabel("example weight σ(λ_i)")
    axis.set_ylabel("examples")
    axis.set_title(title)
    return _save_figure(plt, figure, path)


class WeightsExportCallback(TrainerCallback):
    """Calls ``export(output_dir)`` at the end of training (the trainer hands in its export function,
    which decides which process writes).

    Checkpoints get the same files from the trainer's checkpoint writer instead, before the
    checkpoint folder is renamed into place (an ``on_save`` export would land in an already
    published folder).
    """

    def __init__(self, export: Callable[[str], None]):
        self.export = export

    def on_train_end(self, args, state, control, **kwargs):
        self.export(args.output_dir)
