"""Per-example losses ℓ_i(θ) from model outputs, the building block of g and f."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bros_hf.cross_entropy import token_cross_entropy

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> Tensor:
    """The logits of a model's outputs: a tensor, a dict or ModelOutput with ``logits``, a tuple starting with
    them, or an object with a ``logits`` attribute."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits


def token_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """−log softmax(logits_t)[y_t] at every position (label-smoothed: (1 − ε)·that + ε·mean_v −log p_v,
    as the Trainer's ``label_smoothing_factor``), 0 where y_t = −100; the shape of ``labels``."""
    flat_logits = logits.reshape(-1, logits.size(-1))
    return token_cross_entropy(flat_logits, labels.reshape(-1), IGNORE_INDEX, label_smoothing).view(labels.shape)


def sequence_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """ℓ_i = mean over valid positions t of −log softmax(logits_{i,t})[y_{i,t}], labels aligned with the
    logits (encoder-decoder models: T5, BART), positions labelled −100 ignored. A sequence with no
    valid position gets loss 0."""
    labels = labels.to(logits.device)
    return mean_over_targets(token_losses(logits, labels, label_smoothing), labels)


def mean_over_targets(per_token: Tensor, targets: Tensor) -> Tensor:
    """ℓ_i = mean of the token losses ``per_token`` [B, T] over the positions of row i whose target is not −100 (0 for a row
    without any)."""
    valid = (targets != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def causal_lm_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """ℓ_i = mean over valid positions t of −log p(y_{i,t+1} | y_{i,≤t}): :func:`sequence_losses` with the
    labels shifted by one (labels = input_ids, as transformers' causal LMs take them). The labels move, not the
    logits (the last position's target is −100), as transformers' own loss does: slicing the logits would copy
    them, a [B, T, vocab] buffer."""
    return sequence_losses(logits, shifted_labels(labels), label_smoothing)


def shifted_labels(labels: Tensor) -> Tensor:
    """A causal LM's targets: ``labels`` moved one position left (position t predicts token t + 1), −100 last."""
    return _shifted(labels, IGNORE_INDEX)


def _shifted(values: Tensor, fill: int) -> Tensor:
    """``values`` moved one position left along dim 1, ``fill`` at the last position (what position t predicts)."""
    return F.pad(values[:, 1:], (0, 1), value=fill)


def classification_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """ℓ_i = −log softmax(logits_i)[y_i] (single-label), or the squared error for one output."""
    labels = labels.to(logits.device)
    if logits.size(-1) == 1 and labels.is_floating_point():
        return (logits.squeeze(-1).float() - labels.float()) ** 2
    return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)


def per_example_losses(
    outputs: Any, labels: Tensor, *, shift_labels: bool = True, label_smoothing: float = 0.0
) -> Tensor:
    """Dispatch on shapes: logits [B, T, V] with labels [B, T] is a token-level loss, a causal LM's
    (``shift_labels=True``: predict token t+1 at position t) or an encoder-decoder's
    (``shift_labels=False``: labels already aligned with the decoder's logits); logits [B, C] with
    labels [B] is classification. ``label_smoothing`` is the Trainer's ``label_smoothing_factor`` ε.
    Returns a [B] tensor."""
    logits = logits_of(outputs)
    if logits.dim() == 3 and labels.dim() == 2:
        if shift_labels:
            return causal_lm_losses(logits, labels, label_smoothing)
        return sequence_losses(logits, labels, label_smoothing)
    if logits.dim() == 2 and labels.dim() == 1:
        return classification_losses(logits, labels, label_smoothing)
    raise ValueError(
        f"Cannot derive per-example losses from logits of shape {tuple(logits.shape)} and labels of shape "
        f"{tuple(labels.shape)}. Override BROSTrainer.per_example_loss(outputs, labels) for this model head."
    )


def _aligned(labels: Tensor, segments: Tensor, shift_labels: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(targets, their segment, is a valid target) at every position: with ``shift_labels`` position t predicts
    token t + 1 (none at the last position), a target only when both lie in the same segment (so the last token
    of one packed example never predicts the first of the next, whether or not the collator masked it)."""
    if not shift_labels:
        return labels, segments, (labels != IGNORE_INDEX) & (segments >= 0)
    targets, target_segments = _shifted(labels, IGNORE_INDEX), _shifted(segments, -1)
    valid = (targets != IGNORE_INDEX) & (target_segments >= 0) & (target_segments == segments)
    return targets, target_segments, valid


def packed_sequence_losses(
    outputs: Any,
    labels: Tensor,
    segments: Tensor,
    num_segments: int,
    *,
    shift_labels: bool = True,
    label_smoothing: float = 0.0,
) -> Tensor:
    """ℓ_s for every segment s of packed rows (several examples per row, padding-free batches): the mean
    token loss over the valid targets of segment s, as :func:`per_example_losses` gives for the same example
    padded in a row of its own. ``segments`` [R, T] holds each token's segment index (−1: padding), see
    :func:`packed_segments`. Returns a [num_segments] tensor."""
    logits = logits_of(outputs)
    if logits.dim() != 3 or labels.shape != segments.shape or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"Packed per-segment losses need token logits [R, T, V] and labels and position_ids [R, T]; got logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, segments {tuple(segments.shape)}."
        )
    targets, target_segments, valid = packed_targets(labels.to(logits.device), segments, shift_labels)
    return mean_over_segments(token_losses(logits, targets, label_smoothing), target_segments, valid, num_segments)


def packed_targets(labels: Tensor, segments: Tensor, shift_labels: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(targets, their segment, is a valid target) at every position of packed rows (see
    :func:`packed_sequence_losses`): the targets are −100 wherever they are not valid."""
    targets, target_segments, valid = _aligned(labels, segments.to(labels.device), shift_labels)
    return targets.masked_fill(~valid, IGNORE_INDEX), target_segments, valid


def mean_over_segments(per_token: Tensor, target_segments: Tensor, valid: Tensor, num_segments: int) -> Tensor:
    """ℓ_s = mean of the token losses ``per_token`` over the valid positions whose target belongs to segment s (0 for a segment
    without any), for s < ``num_segments``."""
    index = target_segments[valid]
    sums = per_token.new_zeros(num_segments).index_add(0, index, per_token[valid])
    counts = per_token.new_zeros(num_segments).index_add(
        0, index, torch.ones_like(index, dtype=sums.dtype)
    )
    return sums / counts.clamp(min=1.0)


def packed_segments(position_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, int]:
    """(segment index of every token, number of segments) of a batch whose rows may hold several examples:
    a segment starts at every position id 0, counted row by row in order; padding (``attention_mask`` 0) is
    −1. A batch of ordinary padded rows has one segment per row."""
    tokens = (
        torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    )
    starts = (position_ids == 0) & tokens
    segments = starts.reshape(-1).long().cumsum(0).view_as(position_ids) - 1
    return segments.masked_fill(~tokens, -1), int(starts.sum())


def target_counts(
    labels: Tensor, *, shift_labels: bool = True, segments: Tensor | None = None, num_segments: int = 0
) -> Tensor:
    """n_i, the number of target tokens of every example (row, or segment of packed rows): the weights that
    turn per-example mean losses into a per-token mean, Σ_i n_i ℓ_i / Σ_i n_i."""
    if segments is None:
        targets = labels[:, 1:] if shift_labels else labels
        return (targets != IGNORE_INDEX).sum(dim=1).float()
    _, target_segments, valid = _aligned(labels, segments.to(labels.device), shift_labels)
    index = target_segments[valid]
    return torch.zeros(num_segments, device=labels.device).index_add(
        0, index, torch.ones_like(index, dtype=torch.float)
    )


__all__ = [
    "causal_lm_losses",
    "classification_losses",
    "logits_of",
    "mean_over_segments",
    "mean_over_targets",
    "packed_segments",
    "packed_sequence_losses",
    "packed_targets",
    "per_example_losses",
    "sequence_losses",
    "shifted_labels",
    "target_counts",
    "token_losses",
]
