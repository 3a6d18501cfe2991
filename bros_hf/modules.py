"""Hugging Face model structure: the perturber for a model's layer types, and which trainable
parameters a list of module names (``lower_full_space_modules``, ``full_space_modules``) refers to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from bros_hf.core.lowrank import LowRankPerturber

logger = logging.get_logger(__name__)
EMBEDDINGS = "embeddings"
HEAD = "head"
NONE = "none"
# transformers' classification heads: ``classifier`` (ViT, BERT, RoBERTa, ...) and ``score`` (Llama, GPT-2, Qwen
# ... *ForSequenceClassification), the names peft keeps fully trainable (modules_to_save) for classification.
HEAD_NAMES = ("classifier", "score")
# What each config field's tensors get, for the info log.
_MEANING = {
    "lower_full_space_modules": "full-space lower updates (U = I)",
    "full_space_modules": "full space in every update (P = Q = U = I)",
}


def model_perturber(model: nn.Module) -> LowRankPerturber:
    """The low-rank perturber for a transformers model: hooks on ``nn.Linear``, ``nn.Embedding`` and
    GPT-2's transposed ``Conv1D``."""
    return LowRankPerturber(model, transposed_linear=(Conv1D,))


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embeddings (``get_input_embeddings`` / ``get_output_embeddings``)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def _named_modules(model: nn.Module, entry: str) -> list[nn.Module]:
    """Modules whose name is ``entry`` or ends with ``.entry`` (peft's target_modules rule)."""
    return [m for name, m in model.named_modules() if name == entry or name.endswith("." + entry)]


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """The model's classification head: its modules named one of :data:`HEAD_NAMES` (or a dotted suffix)."""
    return [m for entry in HEAD_NAMES for m in _named_modules(model, entry)]


def _resolve(model: nn.Module, entry: str) -> list[nn.Module]:
    if entry == EMBEDDINGS:
        return _embedding_modules(model)
    if entry == HEAD:
        return _head_modules(model)
    return _named_modules(model, entry)


def broadcast_vector_names(params: Mapping[str, Tensor]) -> list[str]:
    """Tensors with ≥ 2 dimensions and a leading dimension of 1: vectors kept with broadcast dimensions (ViT's class
    token [1, 1, d] and position embeddings [1, N, d]). Viewed as a [1, n] matrix, such a tensor would be sketched
    as a vector, to r of its n directions, by a P ∈ R^{n×r} r times its own size; the trainer keeps them full-space,
    like biases."""
    return [name for name, p in params.items() if p.dim() >= 2 and p.shape[0] == 1]


def full_space_parameter_names(
    model: nn.Module,
    entries: Sequence[str] | None,
    params: Mapping[str, Tensor],
    field_name: str = "lower_full_space_modules",
) -> list[str]:
    """Names (keys of ``params``) of the trainable tensors held by the modules ``entries`` names.

    ``"embeddings"`` stands for the input and output embeddings, ``"head"`` for the classification head (either
    may be absent); ``"none"`` (or an empty list) for no module. Frozen tensors are skipped (e.g. a peft model's
    base embeddings). Any other entry that matches no module of ``model`` is an error naming it and
    ``field_name``, the config field it came from.
    """
    entries = [e for e in (entries or []) if e != NONE]
    by_id = {id(p): name for name, p in params.items()}
    names: list[str] = []
    for entry in entries:
        modules = _resolve(model, entry)
        if not modules and entry not in (EMBEDDINGS, HEAD):
            sample = [name for name, _ in model.named_modules() if name][:8]
            raise ValueError(
                f"{field_name} entry {entry!r} matches no module of {type(model).__name__} (module names look "
                f"like {sample}). Use a module name or dotted suffix, 'embeddings', 'head' or 'none'."
            )
        for module in modules:
            for p in module.parameters():
                name = by_id.get(id(p))
                if name is not None and name not in names:
                    names.append(name)
    if names:
        logger.info(f"{field_name}={list(entries)}: {_MEANING.get(field_name, 'full space')} for {names}.")
    return names
