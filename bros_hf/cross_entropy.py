"""Per-token cross-entropy over a large vocabulary without [tokens, vocab] float32 buffers beyond its gradient.

For logits x_t ∈ R^V and target y_t, with label smoothing ε (the Trainer's ``label_smoothing_factor``):

    ℓ_t = lse(x_t) − (1 − ε) x_{t, y_t} − ε · mean_v x_{t, v},        lse(x) = log Σ_v exp(x_v)
    ∂ℓ_t / ∂x_t = softmax(x_t) − (1 − ε) e_{y_t} − ε / V

``F.cross_entropy(x.float(), y, reduction="none")`` keeps log softmax(x) (float32, the logits' size) for backward
and builds the gradient through two more logits-sized tensors (the one-hot scatter, then the softmax backward);
for bfloat16 logits it also makes a float32 copy of them. Here the forward reads the logits in blocks of rows
(small temporaries), saves only the logits themselves (in their own dtype) and a float per token, and the backward
writes the gradient block by block into one buffer: one logits-sized allocation per pass instead of three or four,
which matters because a bilevel step runs three passes over a vocabulary-sized head. Liger-Kernel and
cut-cross-entropy fuse the same arithmetic in Triton kernels, for CUDA only; this is plain torch, for any device.

Inside :func:`gradient_in_logits` the backward writes the gradient into the logits' own memory instead: no
logits-sized allocation at all, and the logits and their gradient are never held at once (for GPT-2 at 3 × 512 tokens
each is 309 MB). That is for callers that own the logits, such as the trainer's bilevel passes with the built-in loss:
nothing may read the logits after the backward pass. Another autograd node that saved them for its own backward is
not silently misled: autograd's version check raises when that node unpacks them.

Under a double backward (``hessian_mode="autograd"``: grad mode is on inside backward) the gradient is built from
differentiable ops on the logits instead, so second derivatives are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 22
"""Logits entries (rows × vocabulary) handled at once: 16 MB of float32 temporaries per block."""


_GRADIENT_IN_LOGITS: ContextVar[bool] = ContextVar("gradient_in_logits", default=False)


@contextmanager
def gradient_in_logits() -> Iterator[None]:
    """Token losses computed inside this context (their forward) write ∂ℓ/∂x into the memory of the logits x in
    backward, overwriting them, where the logits are a contiguous non-leaf tensor (the output of a head). Use it only
    where nothing reads the logits after the backward pass."""
    token = _GRADIENT_IN_LOGITS.set(True)
    try:
        yield
    finally:
        _GRADIENT_IN_LOGITS.reset(token)


def token_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float = 0.0) -> Tensor:
    """ℓ_t for logits [N, V] and labels [N]: an [N] tensor in float32 (float64 for float64 logits), 0 where
    ``labels == ignore_index``; equal to ``F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
    reduction="none", label_smoothing=label_smoothing)`` in value and gradient."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"token_cross_entropy takes logits [N, V] and labels [N]; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    return _TokenCrossEntropy.apply(logits, labels, ignore_index, float(label_smoothing))


def _row_step(logits: Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(logits.shape[1], 1))


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, smoothing: float) -> Tensor:
        valid = labels != ignore_index
        targets = torch.where(valid, labels, 0).long()
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        mean = torch.empty_like(lse) if smoothing else None
        step = _row_step(logits)
        for start in range(0, logits.shape[0], step):
            block = logits[start : start + step].to(dtype)
            lse[start : start + step] = torch.logsumexp(block, dim=1)
            if mean is not None:
                mean[start : start + step] = block.mean(dim=1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).to(dtype)
        loss = lse - (1.0 - smoothing) * picked
        if mean is not None:
            loss = loss - smoothing * mean
        ctx.save_for_backward(logits, lse, targets, valid)
        ctx.smoothing = smoothing
        ctx.gradient_in_logits = _GRADIENT_IN_LOGITS.get() and not logits.is_leaf and logits.is_contiguous()
        return torch.where(valid, loss, 0.0)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, lse, targets, valid = ctx.saved_tensors
        smoothing, vocabulary = ctx.smoothing, logits.shape[1]
        weight = torch.where(valid, grad_loss.to(lse.dtype), 0.0)[:, None]
        if torch.is_grad_enabled():  # double backward: every factor differentiable in the logits (and in grad_loss)
            probabilities = torch.softmax(logits.to(lse.dtype), dim=1)
            one_hot = torch.zeros_like(probabilities).scatter_(1, targets[:, None], 1.0 - smoothing)
            grad = (probabilities - one_hot - smoothing / vocabulary) * weight
            return grad.to(logits.dtype), None, None, None
        if ctx.gradient_in_logits:
            grad = logits  # overwritten block by block: each block's logits are read before its gradient is written
        else:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        in_place = logits.dtype == lse.dtype
        step = _row_step(logits)
        # Lower-precision logits: each block in float32 in one scratch buffer, then rounded into the gradient.
        scratch = None if in_place else torch.empty(min(step, logits.shape[0]), vocabulary, dtype=lse.dtype,
                                                    device=grad.device)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            block = grad[rows] if in_place else scratch[: grad[rows].shape[0]]
            torch.sub(logits[rows], lse[rows, None], out=block)  # in place where block is these very rows
            block.exp_().mul_(weight[rows])
            block.scatter_add_(1, targets[rows, None], weight[rows] * -(1.0 - smoothing))
            if smoothing:
                block.sub_(weight[rows] * (smoothing / vocabulary))
            if not in_place:
                grad[rows].copy_(block)
        return grad, None, None, None
