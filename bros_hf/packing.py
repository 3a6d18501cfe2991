"""Packing tokenized text into fixed-size blocks without mixing domains (run_clm's ``group_texts``, per domain).

transformers' ``run_clm.py`` concatenates every tokenized text of a ``map`` batch and cuts the stream into blocks
of ``block_size`` tokens. A domain column cannot follow that: a block may hold two domains, and the column's
strings get concatenated like token lists. :func:`group_texts_by_domain` does the same cut within each domain of
the batch, so every block has exactly one domain, which it keeps as a scalar column; it works on a
``datasets.Dataset`` and on a streamed ``datasets.IterableDataset`` alike (both run ``map(batched=True)``).

As in ``group_texts``: texts are concatenated as they are (append an eos token when tokenizing if you want
one between documents), the remainder of each domain's stream in a batch that is shorter than ``block_size``
is dropped, and ``labels`` is a copy of ``input_ids``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import datasets

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
DatasetT = TypeVar(
    "DatasetT", datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict
)


def pack_batch(batch: dict[str, list], block_size: int, domain_column: str) -> dict[str, list]:
    """One ``map`` batch: per domain (in order of first appearance), concatenate the token columns and cut
    them into blocks of ``block_size``; returns the token columns, ``labels`` and the domain column."""
    columns = [name for name in TOKEN_COLUMNS if name in batch]
    streams: dict[Any, dict[str, list]] = {}
    for row, domain in enumerate(batch[domain_column]):
        if isinstance(domain, (list, tuple)):
            raise ValueError(
                f"Column {domain_column!r} holds a list ({domain!r:.60}) where one domain per text is expected: "
                "pack the tokenized texts before any other grouping, with one domain value per row."
            )
        stream = streams.setdefault(domain, {name: [] for name in columns})
        for name in columns:
            stream[name].extend(batch[name][row])
    out: dict[str, list] = {name: [] for name in (*columns, "labels", domain_column)}
    for domain, stream in streams.items():
        usable = len(stream["input_ids"]) // block_size * block_size
        for start in range(0, usable, block_size):
            for name in columns:
                out[name].append(stream[name][start : start + block_size])
            out["labels"].append(list(stream["input_ids"][start : start + block_size]))
            out[domain_column].append(domain)
    return out


def group_texts_by_domain(
    dataset: DatasetT,
    block_size: int,
    *,
    domain_column: str = "domain",
    batch_size: int = 1000,
    **map_kwargs: Any,
) -> DatasetT:
    """``dataset`` (tokenized: ``input_ids``, optionally ``attention_mask``/``token_type_ids``, and
    ``domain_column``) → blocks of exactly ``block_size`` tokens with ``labels`` and one domain each.

    Every other column is removed. ``batch_size`` texts are packed together (per domain), as in run_clm;
    ``map_kwargs`` go to ``dataset.map`` (e.g. ``num_proc``, ``desc`` for a ``datasets.Dataset``). A
    ``DatasetDict`` (or ``IterableDatasetDict``) is packed split by split, as run_clm maps ``raw_datasets``.
    """
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        packed = {
            split: group_texts_by_domain(
                part, block_size, domain_column=domain_column, batch_size=batch_size, **map_kwargs
            )
            for split, part in dataset.items()
        }
        return type(dataset)(packed)
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}.")
    names = dataset.column_names
    if names is None:  # a stream without declared features: its first row names the columns to remove
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError("Cannot pack an empty stream: the dataset yielded no rows.")
        names = list(first.keys())
    missing = [name for name in ("input_ids", domain_column) if name not in names]
    if missing:
        raise ValueError(
            f"Cannot pack: no column(s) {missing} among {names}. Tokenize first (input_ids) and keep the "
            f"domain column (domain_column={domain_column!r})."
        )
    return dataset.map(
        pack_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"block_size": block_size, "domain_column": domain_column},
        remove_columns=names,
        **map_kwargs,
    )
