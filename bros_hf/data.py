"""Data plumbing for the bilevel trainer: example keys, balanced domain batches, the upper stream.

Every training example carries a key column ``bros_key``: its domain id (domain mode) or its
index in the training set (sample mode). The collator wrapper moves the key out of the model
inputs into a tensor the trainer reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

KEY_COLUMN = "bros_key"


def domain_names(values: Sequence[Any], column: str) -> list[str]:
    """Sorted, stable list of domain names (as strings) found in ``values``."""
    names = sorted({str(v) for v in values})
    if not names:
        raise ValueError(f"The training set has no examples, so column {column!r} names no domain.")
    return names


def _column_values(dataset: Any, column: str) -> list[Any]:
    if isinstance(dataset, datasets.Dataset):
        if column not in dataset.column_names:
            raise ValueError(
                f"upper_level='domain' needs a domain column, but the training set has no column {column!r} "
                f"(columns: {dataset.column_names}). Add one (e.g. dataset.add_column({column!r}, names)) or set "
                f"BROSConfig(domain_column=...)."
            )
        return list(dataset.with_format(None)[column])
    values = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, Mapping) or column not in item:
            raise ValueError(
                f"upper_level='domain' needs a domain column, but training example {i} has no key {column!r}. "
                f"Return it from every example (a name or id) or set BROSConfig(domain_column=...)."
            )
        values.append(_as_scalar(item[column]))
    return values


def _as_scalar(value: Any) -> Any:
    """A 0-d tensor or NumPy scalar as the Python number it holds (so type checks and messages see it)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _domain_value_fix(value: Any, column: str) -> str:
    """How to repair one bad domain value, by what it is."""
    if value is None:
        return (
            f"Fill in the missing domains or drop those examples, e.g. "
            f"dataset.filter(lambda ex: ex[{column!r}] is not None)."
        )
    if isinstance(value, float):
        return (
            f"Use integer ids or names: dataset.cast_column({column!r}, datasets.Value('int64')) "
            f"or dataset.map(lambda ex: {{{column!r}: str(ex[{column!r}])}})."
        )
    if hasattr(value, "__len__"):  # list, tuple, array, tensor (str never gets here)
        return "Each example belongs to exactly one domain: store a single name or id, not a sequence."
    return f"Map it to names first, e.g. dataset.map(lambda ex: {{{column!r}: str(ex[{column!r}])}})."


def check_domain_values(values: Sequence[Any], column: str, where: str = "training") -> None:
    """Domain values must be strings or integers (one hashable scalar per example); ``where`` names the set."""
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(
                f"Column {column!r} must hold one domain name (str) or id (int) per example; {where} example "
                f"{index} has {type(value).__name__} {value!r}. {_domain_value_fix(value, column)}"
            )


def attach_keys(
    dataset: Any,
    upper_level: str,
    domain_column: str,
    domains: Sequence[str] | None = None,
    *,
    balanced: bool = True,
) -> tuple[Any, list[str] | None]:
    """Return (dataset with a ``bros_key`` column, domain names or None).

    Domain mode: key = index of the example's domain in the sorted domain list (a streamed
    ``datasets.IterableDataset``: in the declared list, see :mod:`bros_hf.streaming`; with ``balanced``
    the stream is re-ordered round-robin over domains). Sample mode: key = the example's index in ``dataset``.
    """
    if upper_level == "domain" and isinstance(dataset, datasets.IterableDataset):
        from bros_hf.streaming import attach_stream_keys  # streaming imports this module

        return attach_stream_keys(dataset, domain_column, domains, balanced=balanced)
    if isinstance(dataset, (IterableDataset, datasets.IterableDataset)):
        raise ValueError(
            f"upper_level={upper_level!r} needs a map-style (indexable) training set to key its examples; got an "
            f"iterable dataset ({type(dataset).__name__}). "
            + (
                "Sample mode learns one weight per example index, so materialise it first: "
                "datasets.Dataset.from_generator(lambda: (yield from ds), features=ds.features)."
                if upper_level == "sample"
                else "Domain mode streams a datasets.IterableDataset; wrap a torch one: "
                "datasets.IterableDataset.from_generator(lambda: iter(ds))."
            )
        )
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            "The training set must be indexable (support len() and [i]): pass a datasets.Dataset or a torch "
            "map-style Dataset of dicts."
        )
    if len(dataset) == 0:
        raise ValueError("The training set is empty: pass a non-empty train_dataset.")
    names = None
    if upper_level == "domain":
        values = _column_values(dataset, domain_column)
        check_domain_values(values, domain_column)
        found = domain_names(values, domain_column)
        names = list(domains) if domains else found
        empty = sorted(set(names) - set(found))
        if empty:
            raise ValueError(
                f"Domains {empty} have no training examples in column {domain_column!r}; drop them from "
                "BROSConfig(domains=...) or add data for them."
            )
        unlisted = sorted(set(found) - set(names))
        if unlisted:
            raise ValueError(
                f"Training examples have domains {unlisted} not listed in BROSConfig(domains={names}): add them "
                "to domains, or filter those examples out of the training set."
            )
        lookup = {name: i for i, name in enumerate(names)}
        keys = [lookup[str(v)] for v in values]
    else:
        keys = list(range(len(dataset)))
    if isinstance(dataset, datasets.Dataset):
        if KEY_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(KEY_COLUMN)
        return dataset.add_column(KEY_COLUMN, keys), names
    return KeyedDataset(dataset, keys), names


class KeyedDataset(Dataset):
    """Wrap a map-style dataset of dicts, adding ``bros_key`` to every example."""

    def __init__(self, dataset: Any, keys: Sequence[int]):
        self.dataset = dataset
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item[KEY_COLUMN] = self.keys[index]
        return item


class KeyedCollator:
    """Collate with the user's collator after taking ``bros_key`` out of each example.

    ``check`` (e.g. :meth:`bros_hf.validation.LabelSpace.check_batch`) sees every collated batch
    while it is still on the CPU, where checking it costs no device synchronisation.
    """

    def __init__(
        self,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        drop: Sequence[str] = (),
        check: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.collator = collator
        self.drop = tuple(drop)
        self.check = check

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [f.get(KEY_COLUMN) for f in features]
        stripped = [{k: v for k, v in f.items() if k != KEY_COLUMN and k not in self.drop} for f in features]
        batch = self.collator(stripped)
        if self.check is not None:
            self.check(batch)
        if all(k is not None for k in keys):
            batch[KEY_COLUMN] = torch.tensor(flatten_keys(keys), dtype=torch.long)
        return batch


def flatten_keys(keys: Sequence[Any]) -> list[int]:
    """One key per example, in batch order: a packed row (several examples in one row) carries a list of keys,
    one per packed segment in row order; an ordinary row carries one."""
    flat: list[int] = []
    for key in keys:
        if isinstance(key, (list, tuple)) or getattr(key, "ndim", 0) > 0:
            flat.extend(int(k) for k in key)
        else:
            flat.append(int(key))
    return flat


class BalancedDomainSampler(Sampler[int]):
    """Round-robin over domains: position j of an epoch draws from domain j mod K.

    Within a domain, examples come from seeded permutations (a new one whenever a domain runs out,
    so small domains are revisited), so every batch of a size divisible by K holds each domain
    equally often and L_d is the mean over that domain's share of the batch. An epoch has
    ``len(dataset)`` positions. Deterministic in (seed, epoch): replays and resumes reproduce it.
    """

    def __init__(self, keys: Sequence[int], num_domains: int, seed: int = 0):
        self.members: list[list[int]] = [[] for _ in range(num_domains)]
        for index, key in enumerate(keys):
            self.members[key].append(index)
        self.num_examples = len(keys)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        queues: list[list[int]] = [[] for _ in self.members]
        for position in range(self.num_examples):
            domain = position % len(self.members)
            if not queues[domain]:
                order = torch.randperm(len(self.members[domain]), generator=generator).tolist()
                queues[domain] = [self.members[domain][i] for i in reversed(order)]
            yield queues[domain].pop()


def fetch_rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    """The rows at ``indices``, in one ``__getitems__`` call when the dataset has it, as torch's DataLoader
    fetches a batch (``datasets.Dataset`` then reads one Arrow slice instead of one per row: one row at a time
    took half of a small model's step), else one ``dataset[i]`` per index."""
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is None:
        return [dataset[i] for i in indices]
    return list(getitems(indices))


class UpperStream:
    """Endless stream of upper-level batches ζ: sharded by rank, reshuffled every pass.

    Pass e uses the permutation of a generator seeded with (seed, e); rank k of W takes positions
    k, k+W, ...; batches are consecutive slices of that shard (a final short slice is dropped unless
    the shard is smaller than one batch). ``state_dict`` holds (pass, offset) for exact resume.
    """

    def __init__(
        self,
        dataset: Any,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(dataset) == 0:
            raise ValueError("The upper (target) set is empty: pass a non-empty upper_dataset.")
        if len(dataset) < world_size:
            raise ValueError(
                f"The upper set has {len(dataset)} examples, fewer than the {world_size} processes: each needs "
                "one. Add target examples or launch fewer processes."
            )
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0
        self._shard: list[int] | None = None

    def _current_shard(self) -> list[int]:
        if self._shard is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._shard = order[self.rank :: self.world_size]
        return self._shard

    def next_batch(self) -> dict[str, Any]:
        shard = self._current_shard()
        size = min(self.batch_size, len(shard))
        if self.offset + size > len(shard):
            self.epoch += 1
            self.offset = 0
            self._shard = None
            shard = self._current_shard()
        indices = shard[self.offset : self.offset + size]
        self.offset += size
        return self.collator(fetch_rows(self.dataset, indices))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._shard = None
