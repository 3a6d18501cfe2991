"""Streamed (``datasets.IterableDataset``) training sets in domain mode: keys and balanced batches.

A stream cannot be scanned for its domains or sampled by index, so the domains are declared (a
``ClassLabel`` domain column or ``BROSConfig(domains=...)``), every example's key is added as it
streams by, and balanced batches come from one filtered stream per domain interleaved round-robin
(``datasets.interleave_datasets``): position j of the stream holds domain j mod K, as the map-style
:class:`~bros_hf.data.BalancedDomainSampler` gives. The Trainer resumes a stream by replaying it up to
the checkpoint's batch, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets

from bros_hf.data import KEY_COLUMN, check_domain_values


def stream_domains(stream: datasets.IterableDataset, column: str, declared: Sequence[str] | None) -> list[str]:
    """The domain names of a stream: ``declared`` (BROSConfig.domains), else its ClassLabel names."""
    feature = (stream.features or {}).get(column)
    if declared:
        return list(declared)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    raise ValueError(
        f"A streamed training set cannot be scanned for the values of {column!r} before training: declare its "
        "domains with BROSConfig(domains=['code', 'docs', ...]) (or give the column a datasets.ClassLabel feature)."
    )


def _key_of(value: Any, column: str, names: Sequence[str], lookup: dict[str, int], class_label: bool) -> int:
    check_domain_values([value], column, where="streamed training")
    name = names[value] if class_label and isinstance(value, int) else str(value)
    if name not in lookup:
        raise ValueError(
            f"A streamed training example has domain {name!r}, which is not among the declared domains {list(names)}: "
            "add it to BROSConfig(domains=...) or filter those examples out of the stream."
        )
    return lookup[name]


def attach_stream_keys(
    stream: datasets.IterableDataset,
    domain_column: str,
    domains: Sequence[str] | None,
    *,
    balanced: bool,
) -> tuple[datasets.IterableDataset, list[str]]:
    """(the stream with a ``bros_key`` column, the domain names); with ``balanced``, domains round-robin.

    Balancing filters the stream once per domain, so the source is read K times over (cheap for local
    files; for a remote source, prefer one stream per domain already interleaved, with
    ``balanced_domain_batches=False``). A domain that runs out restarts (``all_exhausted``), as the
    map-style sampler revisits small domains."""
    if domain_column not in (stream.column_names or [domain_column]):
        raise ValueError(
            f"upper_level='domain' needs a domain column, but the streamed training set has no column "
            f"{domain_column!r} (columns: {stream.column_names}). Add one with stream.map(...) or set "
            "BROSConfig(domain_column=...)."
        )
    names = stream_domains(stream, domain_column, domains)
    lookup = {name: i for i, name in enumerate(names)}
    class_label = isinstance((stream.features or {}).get(domain_column), datasets.ClassLabel)

    def add_key(example: dict[str, Any]) -> dict[str, int]:
        return {KEY_COLUMN: _key_of(example[domain_column], domain_column, names, lookup, class_label)}

    # Keys are added to the plain Python rows (a torch-formatted stream's map would write tensors back to
    # Arrow), then the stream's own format is put back.
    formatting = getattr(stream, "_formatting", None)
    keyed = stream.with_format(None).map(add_key)
    if balanced and len(names) > 1:
        per_domain = [keyed.filter(lambda example, k=k: example[KEY_COLUMN] == k) for k in range(len(names))]
        # Interleaving reads each domain's first example anyway; an empty domain would never yield one.
        empty = [name for name, domain in zip(names, per_domain, strict=True) if next(iter(domain), None) is None]
        if empty:
            raise ValueError(
                f"Declared domains {empty} have no examples in the streamed training set: drop them from "
                "BROSConfig(domains=...) or add data for them."
            )
        keyed = datasets.interleave_datasets(per_domain, stopping_strategy="all_exhausted")
    return keyed.with_format(getattr(formatting, "format_type", None)), names


__all__ = ["attach_stream_keys", "stream_domains"]
