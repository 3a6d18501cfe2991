"""Per-example losses of a causal LM without holding its [batch, tokens, vocab] logits.

A causal LM's head maps the final hidden states h ∈ R^{B×T×d} to logits h Wᵀ ∈ R^{B×T×V}. For a large
vocabulary these logits (saved for backward by the token loss, :mod:`bros_hf.cross_entropy`) and their gradient
are the largest tensors of a pass: 309 MB each for GPT-2 (V = 50 257) at 3 × 512 tokens in float32. Here the head
and the token loss run on chunks of c tokens,

    ℓ_t = −log softmax(head(h_t))[y_t]       for the tokens t of one chunk,

each chunk under activation checkpointing: its logits exist only while its losses are computed, and again in
backward while its gradient is (one more head product per pass, the price of the memory). The hidden states and
the head module come from the model itself (:func:`split_causal_lm`), and the head is called as a module, so
forward hooks on it (the bilevel passes' low-rank perturbations and probes) see every chunk.

Liger-Kernel's fused linear cross-entropy does the same on GPUs, in Triton, computing the gradient inside its
forward; it needs the loss to be the last operation, whereas here token losses are weighted per example
afterwards, and it does not run on CPU. So this is plain torch: ``torch.utils.checkpoint`` per chunk.

The split into "base model, then head" is an assumption about the model's forward that some families break
(Granite's ``logits_scaling``, Gemma 2's logit soft-capping, Cohere's ``logit_scale``): :func:`check_split`
compares the two ways once and names the model if they differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bros_hf.losses import token_losses


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(base model, head) of a transformers causal LM: the module that returns the final hidden states
    (``model.base_model``) and the one that maps them to logits (``model.get_output_embeddings()``).
    A peft model is split through its wrapped transformers model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(inner, "base_model", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if base is None or base is inner or head is None:
        raise ValueError(
            f"loss_chunk_size needs a transformers causal LM with a base model and an output embedding (lm_head); "
            f"{type(inner).__name__} has {'no base model' if base is None or base is inner else 'no output embedding'}. "
            "Set loss_chunk_size=None."
        )
    config = getattr(inner, "config", None)
    after_head = {
        name: getattr(config, name, None) for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)
    }
    if after_head:
        raise ValueError(
            f"{type(inner).__name__} transforms its logits after the head ({after_head}), so loss_chunk_size, which "
            "computes the loss from head(last hidden state), would train on other losses than the model's. Set "
            "loss_chunk_size=None for this model."
        )
    return base, head


# Config fields of transformers models that change the logits after the head (Gemma 2/3's soft-cap, Granite's divisor,
# Cohere's multiplier). Other such models are caught by check_split, once their logits differ measurably.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


def final_hidden_states(base: nn.Module, model_inputs: dict[str, Any]) -> Tensor:
    """The base model's last hidden states [B, T, d] for ``model_inputs``."""
    outputs = base(**model_inputs)
    hidden = getattr(outputs, "last_hidden_state", None)
    return outputs[0] if hidden is None else hidden


def _head_token_losses(head: nn.Module, hidden: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
    return token_losses(head(hidden), targets, label_smoothing)


def chunked_token_losses(
    hidden: Tensor, head: nn.Module, targets: Tensor, chunk_tokens: int, label_smoothing: float = 0.0
) -> Tensor:
    """−log softmax(head(h_t))[y_t] at every position of ``targets`` (0 where y_t = −100; label-smoothed as
    :func:`bros_hf.losses.sequence_losses`), computed over chunks of ``chunk_tokens`` positions whose logits are
    recomputed in backward instead of saved. ``hidden`` [..., d] and ``targets`` [...] are aligned (a causal LM's
    targets are its labels shifted by one). Returns a tensor of the shape of ``targets``."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be ≥ 1, got {chunk_tokens}.")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"Hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} are not aligned position by position."
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(hidden.device)
    pieces = [
        checkpoint(
            _head_token_losses,
            head,
            flat_hidden[start : start + chunk_tokens],
            flat_targets[start : start + chunk_tokens],
            label_smoothing,
            use_reentrant=False,
        )
        for start in range(0, flat_targets.numel(), chunk_tokens)
    ]
    return torch.cat(pieces).view(targets.shape)


@torch.no_grad()
def check_split(model: nn.Module, model_inputs: dict[str, Any], *, half_precision: bool, tokens: int = 64) -> None:
    """Raise unless head(base(x)) gives the logits the model's own forward gives, on the first example's first
    ``tokens`` positions (a causal LM's logits there do not depend on what follows), in eval mode (dropout
    would make two forwards differ); every module's train/eval flag is restored afterwards."""
    base, head = split_causal_lm(model)
    sliced = {
        k: v[:1, :tokens] if torch.is_tensor(v) and v.dim() == 2 else v
        for k, v in model_inputs.items()
    }
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        own = model(**sliced)
        own_logits = (own.logits if hasattr(own, "logits") else own[0]).float()
        split_logits = head(final_hidden_states(base, sliced)).float()
    finally:
        for module, training in modes.items():
            module.training = training
    scale = max(float(own_logits.abs().max()), 1e-6)
    error = float((own_logits - split_logits).abs().max()) / scale if own_logits.shape == split_logits.shape else 1.0
    tolerance = 3e-2 if half_precision else 1e-4
    if error > tolerance:
        raise ValueError(
            f"{type(model).__name__} does not compute its logits as get_output_embeddings()(last hidden state): they "
            f"differ by {error:.1%} (e.g. a final logit scale or soft-cap), so loss_chunk_size would train on other "
            "losses than the model's. Set loss_chunk_size=None for this model."
        )
