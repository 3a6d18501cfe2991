"""Using learned example weights in a second training: which examples to keep.

Sample mode learns w_i = σ(λ_i) per training example, starting from 0.5. An example whose weight the
upper level pushed below 0.5 is one whose loss, by the hypergradient, hurts the target loss; the
recipes flag it as noisy ("corrupted iff w_i < 0.5"). The second stage trains a fresh model with the
plain ``Trainer`` on the examples kept: {i : w_i ≥ threshold}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

DEFAULT_THRESHOLD = 0.5


def load_sample_weights(path: str) -> np.ndarray:
    """``sample_weights.json`` (as written by ``BROSTrainer``) → w as a float array in training-set order.

    Raises if the indices are not exactly 0..n-1, or if the run never updated λ (every weight is still
    its initial 0.5, so there is nothing to select on).
    """
    with open(path) as handle:
        payload = json.load(handle)
    if "weights" not in payload:
        raise ValueError(
            f"{path} has no 'weights' entry: is it a sample_weights.json written by BROSTrainer?"
        )
    if "domains" in payload:
        raise ValueError(f"{path} is a domain mixture (mixture_weights.json), not per-example weights.")
    by_index = {int(k): float(v) for k, v in payload["weights"].items()}
    n = len(by_index)
    if sorted(by_index) != list(range(n)):
        raise ValueError(f"{path}: the example indices are not 0..{n - 1}; the file is incomplete or edited.")
    if payload.get("upper_updates", 1) == 0:
        raise ValueError(
            f"{path}: the run made no upper-level update (upper_updates = 0), so every weight is still 0.5. Train "
            "for more steps than upper_warmup_steps."
        )
    return np.asarray([by_index[i] for i in range(n)], dtype=np.float64)


def kept_indices(weights: Sequence[float] | np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[int]:
    """Indices i with w_i ≥ threshold, in order. ``threshold`` must lie in (0, 1)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (weights are σ(λ) ∈ (0, 1)), got {threshold}.")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.isfinite(w).all():
        raise ValueError(f"weights must be a finite 1-D sequence, got shape {w.shape}.")
    return np.flatnonzero(w >= threshold).tolist()


def keep_examples(
    dataset: datasets.Dataset | torch.utils.data.Dataset,
    weights: Sequence[float] | np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
) -> datasets.Dataset | torch.utils.data.Subset:
    """The rows of ``dataset`` (the training set the weights were learned on, same order) with w_i ≥ threshold:
    ``dataset.select(...)`` for a ``datasets.Dataset``, a ``torch.utils.data.Subset`` for a torch map-style dataset.

    Refuses weights whose length differs from the dataset's (they belong to another dataset or order) and a
    selection that keeps nothing.
    """
    if len(weights) != len(dataset):
        raise ValueError(
            f"{len(weights)} weights for a dataset of {len(dataset)} rows: pass the training set the weights were "
            "learned on, in the same order (sample_weights.json is keyed by that order)."
        )
    keep = kept_indices(weights, threshold)
    if not keep:
        raise ValueError(f"No example has weight ≥ {threshold}; lower the threshold.")
    if hasattr(dataset, "select"):
        return dataset.select(keep)
    return torch.utils.data.Subset(dataset, keep)
