"""UpperStream: the upper batches come from one batched fetch, identical to fetching row by row."""

from __future__ import annotations

import datasets
import torch

from bros_hf.data import UpperStream, fetch_rows


def stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]}


class CountingRows(torch.utils.data.Dataset):
    """A map-style dataset that counts how rows are fetched."""

    def __init__(self, n: int, batched: bool):
        self.n, self.single, self.batched_calls = n, 0, 0
        if batched:
            self.__getitems__ = self._getitems

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        self.single += 1
        return {"x": torch.tensor([float(index)])}

    def _getitems(self, indices: list[int]) -> list[dict]:
        self.batched_calls += 1
        return [{"x": torch.tensor([float(i)])} for i in indices]


def test_batched_fetch_equals_row_by_row_on_a_datasets_dataset():
    ds = datasets.Dataset.from_dict(
        {"features": [[float(i), -float(i)] for i in range(37)], "labels": list(range(37))}
    )
    ds = ds.with_format("torch")
    indices = [5, 0, 36, 17, 17]
    batched, single = fetch_rows(ds, indices), [ds[i] for i in indices]
    assert len(batched) == len(single)
    for a, b in zip(batched, single, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    streams = [UpperStream(ds, stack, batch_size=8, seed=3) for _ in range(2)]
    streams[1].dataset = [ds[i] for i in range(len(ds))]  # a plain list: row by row
    for _ in range(12):  # several passes over the 37 examples
        first, second = (stream.next_batch() for stream in streams)
        assert torch.equal(first["features"], second["features"]) and torch.equal(
            first["labels"], second["labels"]
        )


def test_stream_uses_one_batched_call_per_batch_when_the_dataset_has_one():
    batched, single = CountingRows(20, batched=True), CountingRows(20, batched=False)
    for dataset in (batched, single):
        stream = UpperStream(dataset, stack, batch_size=4, seed=0)
        for _ in range(3):
            stream.next_batch()
    assert (batched.batched_calls, batched.single) == (3, 0)
    assert (single.batched_calls, single.single) == (0, 12)
