"""What autograd keeps for backward, in bytes: the memory checks of the loss and low-rank tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_for_backward_bytes(run: Callable[[], object], excluded: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` builds its graph, leaving out the
    storages of ``excluded`` (e.g. the weights, which exist anyway)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    skipped = {t.untyped_storage().data_ptr() for t in excluded}
    return sum(size for pointer, size in storages.items() if pointer not in skipped)
