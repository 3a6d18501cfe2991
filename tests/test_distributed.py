"""bros_hf.distributed: bucketed in-place means over two real gloo processes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bros_hf.distributed import all_reduce_mean_, buckets


def rank_tensors(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    shapes = [(3, 4), (50,), (2, 2, 2), (1,), (200, 3)]
    return [torch.randn(shape, generator=generator) for shape in shapes] + [torch.randn(6, 4, generator=generator).t()]


def worker(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    tensors = rank_tensors(rank)
    all_reduce_mean_(tensors, 2, cap_bytes=256)  # several buckets, one tensor larger than a bucket
    torch.save(tensors, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_buckets_respect_the_cap_and_keep_order():
    tensors = [torch.zeros(n) for n in (10, 10, 30, 5, 100, 1)]
    groups = list(buckets(tensors, cap_bytes=100))
    assert [[t.numel() for t in group] for group in groups] == [[10, 10], [30], [5], [100], [1]]
    assert [t for group in groups for t in group] == tensors


def test_every_rank_ends_with_the_mean_in_place(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    expected = [(a + b) / 2 for a, b in zip(rank_tensors(0), rank_tensors(1), strict=True)]
    for rank_result in results:
        for got, want in zip(rank_result, expected, strict=True):
            torch.testing.assert_close(got, want)
