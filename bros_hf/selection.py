"""Using learned example weights in a second training: which examples to keep.

Sample mode learns w_i = σ(λ_i) per training example, starting from 0.5. An example whose weight the
upper level pushed below 0.5 is one whose loss, by the hypergradient, hurts the target loss; the
recipes flag it as noisy ("corrupted iff w_i < 0.5"). The second stage trains a fresh model with the
plain ``Trainer`` on the examples kept: {i : w_i ≥ threshold}. Which threshold is best depends on how well the
weights rank and on how much the model memorises the corrupted examples a threshold lets through, so
:func:`choose_threshold` picks it by a score on clean held-out data (the upper set), as one picks any other
hyperparameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

DEFAULT_THRESHOLD = 0.5
# Candidates of choose_threshold: on the ViT recipe's three noise draws the clean validation set picked 0.65 twice
# and 0.8 once; 0.2 and 0.35 kept too many corrupted examples every time.
DEFAULT_THRESHOLDS = (0.5, 0.65, 0.8)


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


@dataclass(frozen=True)
class ThresholdChoice:
    """The result of :func:`choose_threshold`: the chosen threshold, and every candidate's score and kept count
    (candidates that keep no example are absent)."""

    threshold: float
    scores: dict[float, float]
    kept: dict[float, int]


def choose_threshold(
    weights: Sequence[float] | np.ndarray,
    score: Callable[[list[int]], float],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> ThresholdChoice:
    """The threshold whose kept examples score best: ``score(kept_indices)`` trains a model on those training
    examples and returns a number to maximise on clean held-out data (e.g. accuracy on the upper set, never on the
    test set). Ties go to the lower threshold (more data); a candidate that keeps nothing is skipped. Costs one
    training per candidate."""
    if not thresholds:
        raise ValueError("thresholds is empty: pass at least one candidate in (0, 1).")
    scores: dict[float, float] = {}
    kept: dict[float, int] = {}
    for threshold in sorted(set(thresholds)):
        keep = kept_indices(weights, threshold)
        if keep:
            value = float(score(keep))
            if not np.isfinite(value):
                raise ValueError(f"score returned {value} for threshold {threshold}; it must be a finite number.")
            scores[threshold], kept[threshold] = value, len(keep)
    if not scores:
        raise ValueError(f"No example has weight ≥ {min(thresholds)}; lower the thresholds.")
    best = max(scores, key=lambda t: (scores[t], -t))
    return ThresholdChoice(threshold=best, scores=scores, kept=kept)
