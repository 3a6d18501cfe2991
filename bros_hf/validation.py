"""Checks on what users hand to BROSTrainer, each failing with the problem and the fix.

- :class:`LabelSpace`: labels and token ids must lie in the model's label space (classes of a
  classifier, vocabulary of a causal LM), checked on whole ``datasets.Dataset`` columns at
  construction and on every collated batch (which covers torch and iterable datasets).
- :func:`check_subspace_coverage`: ``bilevel_method="bros"`` with a rank that sketches nothing.
- :func:`check_coordinate_optimizer`: an optimizer whose step is relative to the parameter's own scale, which the
  always-zero subspace coordinates do not have.
- :class:`DomainPresenceMonitor`: warns when a domain has been missing from the lower batches
  for many consecutive optimizer steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from torch import Tensor, nn
from transformers.utils import logging

from bros_hf.core.sketch import is_sketched, sketched_dim
from bros_hf.losses import IGNORE_INDEX

logger = logging.get_logger(__name__)

_SHOWN = 10  # offending values quoted in a message


# ---------------------------------------------------------------------------------- label space
@dataclass(frozen=True)
class Bound:
    """Valid ids are 0..size-1 (plus -100 where ``ignore`` allows it); ``source`` says where size came from."""

    size: int
    source: str
    ignore: bool = True

    def offending(self, values: Tensor) -> list[int]:
        """Sorted distinct out-of-range values of an integer tensor (at most ``_SHOWN``)."""
        valid = (values >= 0) & (values < self.size)
        if self.ignore:
            valid |= values == IGNORE_INDEX
        return values[~valid].unique().tolist()[:_SHOWN]  # torch.unique sorts

    def offending_arrow(self, values: pa.ChunkedArray) -> list[int]:
        """Same as :meth:`offending` for a flat Arrow integer column, without copying it to Python."""
        valid = pc.and_(pc.greater_equal(values, 0), pc.less(values, self.size))
        if self.ignore:
            valid = pc.or_(valid, pc.equal(values, IGNORE_INDEX))
        return sorted(pc.unique(pc.filter(values, pc.invert(valid))).to_pylist())[:_SHOWN]


def _call(model: nn.Module, method: str) -> Any:
    """``model.method()`` or None where the model lacks it (or its base class refuses)."""
    getter = getattr(model, method, None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _class_bound(model: nn.Module) -> Bound | None:
    """Number of classes of a classifier: ``config.num_labels`` of a Hugging Face ``*Classification``
    model, else the ``out_features`` of the last ``nn.Linear`` of a plain ``nn.Module`` (its head).
    Hugging Face models of other kinds have ``num_labels`` too (default 2) without using it: skipped."""
    config = getattr(model, "config", None)
    if config is not None:
        num_labels = getattr(config, "num_labels", None)
        if "Classification" in type(model).__name__ and isinstance(num_labels, int):
            return Bound(num_labels, "model.config.num_labels")
        return None
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        return None
    name, head = linears[-1]
    return Bound(head.out_features, f"out_features of the model's last nn.Linear {name!r}")


def _vocabulary_bound(model: nn.Module) -> Bound | None:
    """Vocabulary of a causal LM's logits: rows of ``get_output_embeddings()`` (the LM head)."""
    head = _call(model, "get_output_embeddings")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    return Bound(getattr(head, "out_features", weight.shape[0]), "model.get_output_embeddings()")


def _input_bound(model: nn.Module) -> Bound | None:
    """Rows of the input embedding: every input id must index one (no ignore value)."""
    embedding = _call(model, "get_input_embeddings")
    if not isinstance(embedding, nn.Embedding):
        return None
    return Bound(embedding.num_embeddings, "model.get_input_embeddings()", ignore=False)


@dataclass(frozen=True)
class LabelSpace:
    """The ids a model accepts. Any bound may be None (not discoverable): that check is skipped.

    ``classes`` applies to one integer label per example, ``vocabulary`` to a sequence of integer
    labels per example (causal LM targets), ``inputs`` to ``input_ids``. Floating-point labels
    (regression, soft targets) are never checked.
    """

    classes: Bound | None = None
    vocabulary: Bound | None = None
    inputs: Bound | None = None

    @classmethod
    def of(cls, model: nn.Module, check_labels: bool = True) -> LabelSpace:
        """Discover the label space of ``model`` (a torch.compile wrapper is looked through).

        ``check_labels=False`` (a custom ``per_example_loss`` gives labels its own meaning) keeps
        only the ``input_ids`` check."""
        model = getattr(model, "_orig_mod", model)
        if not check_labels:
            return cls(inputs=_input_bound(model))
        return cls(_class_bound(model), _vocabulary_bound(model), _input_bound(model))

    def _bounds(self, column: str, per_example_sequence: bool) -> Bound | None:
        if column == "input_ids":
            return self.inputs if per_example_sequence else None
        return self.vocabulary if per_example_sequence else self.classes

    def check_dataset(self, dataset: Any, where: str) -> None:
        """Check whole label / input_ids columns of a ``datasets.Dataset`` (Arrow compute, no Python
        copy). Other datasets are checked batch by batch by :meth:`check_batch`."""
        if not isinstance(dataset, datasets.Dataset):
            return
        for column in ("labels", "label", "input_ids"):
            if column not in dataset.column_names:
                continue
            values, sequences = _flatten(dataset.with_format("arrow")[column])
            bound = self._bounds(column, sequences)
            if bound is not None and pa.types.is_integer(values.type):
                _raise_if_any(bound.offending_arrow(values), bound, column, where, sequences)

    def check_batch(self, batch: Mapping[str, Any], where: str) -> None:
        """Check the ``labels`` and ``input_ids`` of one collated batch ([B] or [B, T] tensors)."""
        for column in ("labels", "input_ids"):
            values = batch.get(column)
            if not isinstance(values, Tensor) or values.is_floating_point() or values.dim() not in (1, 2):
                continue
            bound = self._bounds(column, values.dim() == 2)
            if bound is not None:
                _raise_if_any(bound.offending(values), bound, column, where, values.dim() == 2)


def _flatten(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, bool]:
    """(all leaf values, whether the column held a sequence per example)."""
    nested = False
    while (
        pa.types.is_list(values.type)
        or pa.types.is_large_list(values.type)
        or pa.types.is_fixed_size_list(values.type)
    ):
        values = pc.list_flatten(values)
        nested = True
    return values, nested


def _raise_if_any(offending: Sequence[int], bound: Bound, column: str, where: str, tokens: bool) -> None:
    if not offending:
        return
    top = bound.size - 1
    if column == "input_ids":
        fix = (
            "Tokenize with the model's own tokenizer, or call model.resize_token_embeddings(len(tokenizer)); "
            "pad input_ids with tokenizer.pad_token_id (-100 belongs in labels only)."
        )
        kind = (
            f"input_ids outside the model's {bound.size} embedding rows (0..{top}, read from {bound.source})"
        )
    elif tokens:
        fix = (
            "Tokenize with the model's own tokenizer, or call model.resize_token_embeddings(len(tokenizer)); "
            f"mark ignored positions with {IGNORE_INDEX}."
        )
        kind = f"token labels outside the model's vocabulary of {bound.size} (0..{top}, read from {bound.source})"
    else:
        fix = (
            f"Remap the labels to 0..{top} ({IGNORE_INDEX} ignores an example) or build the model with "
            f"num_labels={max(max(offending) + 1, bound.size)}."
        )
        kind = f"labels outside the model's {bound.size} classes (0..{top}, read from {bound.source})"
    raise ValueError(f"The {where} has {column!r} values {list(offending)} — {kind}. {fix}")


# ---------------------------------------------------------------------------------- sketch coverage
def check_subspace_coverage(params: Mapping[str, Tensor], rank: int, unsketched: Collection[str] = ()) -> None:
    """BROS sketches a tensor only if it is a matrix whose sketched dimension n exceeds the rank r (sketch.py)
    and ``unsketched`` (the tensors of ``full_space_modules``, and vectors with broadcast dimensions) does not
    name it.

    Raise if nothing is sketched (BROS would silently be full-space MA-SOBA); otherwise log once
    which tensors stay full space, since their memory and variance differ from the sketched ones.
    """
    full = [name for name, p in params.items() if name in unsketched or not is_sketched(p, rank)]
    if len(full) == len(params):
        matrices = {
            name: sketched_dim(p) for name, p in params.items() if p.dim() >= 2 and name not in unsketched
        }
        if not matrices:
            raise ValueError(
                "bilevel_method='bros' sketches only tensors with ≥ 2 dimensions outside full_space_modules, and "
                "every other trainable tensor is 1-D or [1, ...]: it would be full-space MA-SOBA in disguise. Set "
                "bilevel_method='masoba' (or full_space_modules=['none'] to sketch the head)."
            )
        largest = max(matrices, key=matrices.get)
        raise ValueError(
            f"subspace_rank={rank} is ≥ the sketched dimension of every trainable tensor, so "
            f"bilevel_method='bros' would be full-space MA-SOBA in disguise. Lower subspace_rank below "
            f"{matrices[largest]} (the largest, of {largest!r}) or set bilevel_method='masoba'."
        )
    if full:
        count = sum(params[name].numel() for name in full)
        total = sum(p.numel() for p in params.values())
        shown = ", ".join(full[:_SHOWN]) + (
            f", ... ({len(full) - _SHOWN} more)" if len(full) > _SHOWN else ""
        )
        logger.info(
            f"BROS subspace_rank={rank}: {len(full)} of {len(params)} trainable tensors ({count} of {total} "
            f"parameters) stay full-space (1-D or [1, ...], sketched dimension ≤ {rank}, or full_space_modules): "
            f"{shown}."
        )


# ---------------------------------------------------------------------------------- coordinate optimizer
def check_coordinate_optimizer(
    optimizer_cls: type, optimizer_kwargs: Mapping[str, Any], sketched: Sequence[str]
) -> None:
    """Refuse an optimizer that scales its step by the parameter's own root mean square where it would step
    subspace coordinates.

    The lower optimizer steps the coordinates a of each sketched tensor (``sketched``), which are zero before
    every step (θ ← θ + U a, then a ← 0), so a step relative to RMS(a) would be its floor ε₂ times the step size,
    whatever θ's scale. Full-space tensors (U = I: ``bilevel_method="masoba"``, and under BROS the
    ``full_space_modules``, ``lower_full_space_modules``, vectors and small tensors) are stepped as θ itself, as in
    a plain Trainer, so any optimizer is right for them. ``optim="adafactor"`` builds transformers' Adafactor with
    ``scale_parameter=False, relative_step=False`` (an absolute step, lr), which is right everywhere; torch's
    ``Adafactor`` and transformers' with either flag on are not, unless nothing is sketched.
    """
    name = f"{optimizer_cls.__module__}.{optimizer_cls.__qualname__}"
    relative = optimizer_cls.__name__ == "Adafactor" and (
        optimizer_cls.__module__.startswith("torch.")
        or optimizer_kwargs.get("scale_parameter", True)
        or optimizer_kwargs.get("relative_step", True)
    )
    if relative and sketched:
        raise ValueError(
            f"{name} with {dict(optimizer_kwargs)} scales each step by the parameter's root mean square, but the "
            f"lower optimizer steps subspace coordinates that are zero before every step ({len(sketched)} sketched "
            f"tensors, e.g. {sketched[0]!r}), so every step would be the floor eps times the step size. Use "
            "optim='adafactor' (transformers' Adafactor with scale_parameter=False, relative_step=False: an "
            "absolute step, learning_rate), or pass those two flags in optimizer_cls_and_kwargs."
        )


# ---------------------------------------------------------------------------------- domain presence
# A domain of fair share 1/K, sampled uniformly into ≥ K examples per step, misses one step with
# probability ≤ (1 - 1/K)^K ≤ e^-1 and 20 in a row with probability ≤ e^-20: 20 straight absences
# mean a domain far below its share. With fewer than K examples per step even round-robin batches
# visit a domain only every ⌈K / B⌉ steps, so the patience is at least four such gaps.
MIN_PATIENCE = 20


def presence_patience(num_domains: int, examples_per_step: int) -> int:
    """Consecutive optimizer steps without a domain before :class:`DomainPresenceMonitor` warns."""
    return max(MIN_PATIENCE, 4 * math.ceil(num_domains / max(examples_per_step, 1)))


class DomainPresenceMonitor:
    """Warn (once per domain) when a domain has had no example in the lower batches for ``patience``
    consecutive optimizer steps: its L_d is then missing from g, and its weight moves only through
    the softmax normalisation, with no signal about its own data."""

    def __init__(self, domains: Sequence[str], examples_per_step: int, balanced: bool):
        self.domains = list(domains)
        self.examples_per_step = examples_per_step
        self.balanced = balanced
        self.patience = presence_patience(len(self.domains), examples_per_step)
        self.absent_steps = [0] * len(self.domains)
        self.warned: set[str] = set()

    def observe(self, counts: Tensor, step: int) -> None:
        """Record one optimizer step's examples per domain (summed or averaged over processes)."""
        starved = []
        for index, count in enumerate(counts.tolist()):
            self.absent_steps[index] = 0 if count > 0 else self.absent_steps[index] + 1
            name = self.domains[index]
            if self.absent_steps[index] >= self.patience and name not in self.warned:
                self.warned.add(name)
                starved.append(name)
        if starved:
            warnings.warn(self._message(starved, step), UserWarning, stacklevel=3)

    def _message(self, starved: list[str], step: int) -> str:
        fixes = []
        if not self.balanced:
            fixes.append("set balanced_domain_batches=True (every batch then holds every domain)")
        if self.examples_per_step < len(self.domains):
            fixes.append(
                f"raise per_device_train_batch_size × gradient_accumulation_steps × processes "
                f"(now {self.examples_per_step} examples per step) to at least {len(self.domains)}"
            )
        fixes.append("drop the domain (filter it out of train_dataset and BROSConfig.domains)")
        return (
            f"Domains {starved} have had no example in the training batches for {self.patience} consecutive "
            f"optimizer steps (up to step {step}): their mixture weights get no signal from their own data. "
            f"Fix: {'; or '.join(fixes)}."
        )
