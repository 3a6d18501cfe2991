"""Synthetic 3-domain data sets with a known best mixture (no files, no hub).

Causal LM (``lm_domains``): token sequences from three sources over the model's vocabulary,
- ``match``: a sparse Markov chain A (every token has 4 possible successors); the target set and
  the evaluation set are fresh samples of the same chain, so this domain is the one that helps;
- ``other``: a different sparse chain B (learnable, but useless for the target);
- ``noise``: uniformly random tokens (unlearnable).

Image classification (``image_domains``): Gaussian images; ``match`` labels are the argmax of a
fixed linear map of 4×4 average-pooled pixels, ``other`` the same labels permuted, ``noise``
random labels. The target is ``match``.

Random tokens would be enough for memory and time; these sets also carry signal, so the learned
mixture and the target loss are meaningful quality measurements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmarks.models import ModelSize

DOMAINS = ("match", "other", "noise")
TARGET_DOMAIN = "match"


class DictDataset(Dataset):
    """Map-style data set of dicts ``{column: row}`` built from stacked tensors (+ a domain column)."""

    def __init__(self, columns: dict[str, torch.Tensor], domains: list[str] | None = None):
        self.columns = columns
        self.domains = domains
        self.length = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {name: values[index] for name, values in self.columns.items()}
        if self.domains is not None:
            item["domain"] = self.domains[index]
        return item


def _markov_chain(vocab: int, branching: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, vocab, size=(vocab, branching))


def _sample_chain(successors: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    vocab, branching = successors.shape
    tokens = np.empty((n, length), dtype=np.int64)
    tokens[:, 0] = rng.integers(0, vocab, size=n)
    for t in range(1, length):
        tokens[:, t] = successors[tokens[:, t - 1], rng.integers(0, branching, size=n)]
    return tokens


def lm_domains(size: ModelSize, n_per_domain: int, n_target: int, n_eval: int, seed: int):
    """(train, target, eval) for a causal LM of ``size``; labels = input_ids."""
    rng = np.random.default_rng(seed)
    chain_a = _markov_chain(size.vocab, 4, rng)
    chain_b = _markov_chain(size.vocab, 4, rng)
    parts = {
        "match": _sample_chain(chain_a, n_per_domain, size.seq_len, rng),
        "other": _sample_chain(chain_b, n_per_domain, size.seq_len, rng),
        "noise": rng.integers(0, size.vocab, size=(n_per_domain, size.seq_len)),
    }
    ids = torch.from_numpy(np.concatenate([parts[d] for d in DOMAINS]))
    domains = [d for d in DOMAINS for _ in range(n_per_domain)]
    train = DictDataset({"input_ids": ids, "labels": ids}, domains)
    target_ids = torch.from_numpy(_sample_chain(chain_a, n_target, size.seq_len, rng))
    eval_ids = torch.from_numpy(_sample_chain(chain_a, n_eval, size.seq_len, rng))
    target = DictDataset({"input_ids": target_ids, "labels": target_ids}, [TARGET_DOMAIN] * n_target)
    evaluation = DictDataset({"input_ids": eval_ids, "labels": eval_ids})
    return train, target, evaluation


def image_domains(size: ModelSize, n_per_domain: int, n_target: int, n_eval: int, seed: int):
    """(train, target, eval) for an image classifier of ``size``."""
    rng = np.random.default_rng(seed)
    classes = size.num_labels
    pooled = 4
    weights = rng.normal(size=(classes, 3 * pooled * pooled))

    def images(n: int) -> tuple[torch.Tensor, np.ndarray]:
        x = torch.from_numpy(rng.normal(size=(n, 3, size.image_size, size.image_size)).astype(np.float32))
        features = torch.nn.functional.adaptive_avg_pool2d(x, pooled).reshape(n, -1).numpy()
        return x, (features @ weights.T).argmax(1)

    xa, ya = images(n_per_domain)
    xb, yb = images(n_per_domain)
    yb = (yb + 1) % classes
    xc, _ = images(n_per_domain)
    yc = rng.integers(0, classes, size=n_per_domain)
    pixels = torch.cat([xa, xb, xc])
    labels = torch.from_numpy(np.concatenate([ya, yb, yc])).long()
    domains = [d for d in DOMAINS for _ in range(n_per_domain)]
    train = DictDataset({"pixel_values": pixels, "labels": labels}, domains)
    xt, yt = images(n_target)
    xe, ye = images(n_eval)
    target = DictDataset(
        {"pixel_values": xt, "labels": torch.from_numpy(yt).long()}, [TARGET_DOMAIN] * n_target
    )
    evaluation = DictDataset({"pixel_values": xe, "labels": torch.from_numpy(ye).long()})
    return train, target, evaluation


def build_data(size: ModelSize, n_per_domain: int, n_target: int, n_eval: int, seed: int):
    if size.is_lm:
        return lm_domains(size, n_per_domain, n_target, n_eval, seed)
    return image_domains(size, n_per_domain, n_target, n_eval, seed)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the tensor columns of ``items`` (drops the domain column)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "domain"}
