"""Hugging Face model structure: the perturber for a model's layer types, and which trainable
parameters a list of module names (``lower_full_space_modules``) refers to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from bros_hf.core.lowrank import LowRankPerturber

logger = logging.get_logger(__name__)
EMBEDDINGS = "embeddings"
NONE = "none"


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


def full_space_parameter_names(
    model: nn.Module, entries: Sequence[str] | None, params: Mapping[str, Tensor]
) -> list[str]:
    """Names (keys of ``params``) of the trainable tensors held by the modules ``entries`` names.

    ``"embeddings"`` stands for the input and output embeddings; ``"none"`` (or an empty list) for
    no module. Frozen tensors are skipped (e.g. a peft model's base embeddings). An entry that
    matches no module of ``model`` is an error naming it.
    """
    entries = [e for e in (entries or []) if e != NONE]
    by_id = {id(p): name for name, p in params.items()}
    names: list[str] = []
    for entry in entries:
        modules = _embedding_modules(model) if entry == EMBEDDINGS else _named_modules(model, entry)
        if not modules and entry != EMBEDDINGS:
            sample = [name for name, _ in model.named_modules() if name][:8]
            raise ValueError(
                f"lower_full_space_modules entry {entry!r} matches no module of {type(model).__name__} "
                f"(module names look like {sample}). Use a module name or dotted suffix, 'embeddings' or 'none'."
            )
        for module in modules:
            for p in module.parameters():
                name = by_id.get(id(p))
                if name is not None and name not in names:
                    names.append(name)
    if names:
        logger.info(f"lower_full_space_modules={list(entries)}: full-space lower updates (U = I) for {names}.")
    return names
