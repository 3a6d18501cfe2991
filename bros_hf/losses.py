"""Per-example losses ℓ_i(θ) from model outputs, the building block of g and f."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _logits_of(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits


def sequence_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ_i = mean over valid positions t of −log softmax(logits_{i,t})[y_{i,t}], labels aligned with the
    logits (encoder-decoder models: T5, BART), positions labelled −100 ignored. A sequence with no
    valid position gets loss 0."""
    labels = labels.to(logits.device)
    token_losses = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    valid = (labels != IGNORE_INDEX).to(token_losses.dtype)
    return (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def causal_lm_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ_i = mean over valid positions t of −log p(y_{i,t+1} | y_{i,≤t}): :func:`sequence_losses` with the
    labels shifted by one (labels = input_ids, as transformers' causal LMs take them)."""
    return sequence_losses(logits[:, :-1, :], labels[:, 1:])


def classification_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ_i = −log softmax(logits_i)[y_i] (single-label), or the squared error for one output."""
    labels = labels.to(logits.device)
    if logits.size(-1) == 1 and labels.is_floating_point():
        return (logits.squeeze(-1).float() - labels.float()) ** 2
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")


def per_example_losses(outputs: Any, labels: Tensor, *, shift_labels: bool = True) -> Tensor:
    """Dispatch on shapes: logits [B, T, V] with labels [B, T] is a token-level loss, a causal LM's
    (``shift_labels=True``: predict token t+1 at position t) or an encoder-decoder's
    (``shift_labels=False``: labels already aligned with the decoder's logits); logits [B, C] with
    labels [B] is classification. Returns a [B] tensor."""
    logits = _logits_of(outputs)
    if logits.dim() == 3 and labels.dim() == 2:
        return causal_lm_losses(logits, labels) if shift_labels else sequence_losses(logits, labels)
    if logits.dim() == 2 and labels.dim() == 1:
        return classification_losses(logits, labels)
    raise ValueError(
        f"Cannot derive per-example losses from logits of shape {tuple(logits.shape)} and labels of shape "
        f"{tuple(labels.shape)}. Override BROSTrainer.per_example_loss(outputs, labels) for this model head."
    )


__all__ = ["causal_lm_losses", "classification_losses", "per_example_losses", "sequence_losses"]
