"""Averaging the bilevel terms over processes: bucketed all-reduces, in place.

DDP all-reduces gradients in buckets of ``bucket_cap_mb`` (25 MB by default) rather than in one
buffer; the same here keeps the extra memory of a step's all-reduce to one bucket. With full-space
terms (MA-SOBA, or the full-space lower update of the embeddings) one flat buffer would be the
size of everything sent: three full gradients for MA-SOBA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def buckets(tensors: Sequence[Tensor], cap_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of ``tensors`` whose sizes add up to at most ``cap_bytes`` (a larger tensor alone)."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > cap_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_mean_(tensors: Sequence[Tensor], world_size: int, cap_bytes: int = BUCKET_BYTES) -> None:
    """Replace every tensor by its mean over the ``world_size`` processes, in place, one all-reduce per bucket
    (the same order on every process, so the buckets match)."""
    for bucket in buckets(tensors, cap_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for tensor in bucket:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
        for tensor in bucket:
            tensor.div_(world_size)
