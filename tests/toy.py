"""Tiny problems with known answers for trainer tests: a 3-domain classification toy."""

from __future__ import annotations

import datasets
import numpy as np
import torch

from benchmarks.mixture_tasks import MLPClassifier


class TinyClassifier(MLPClassifier):
    """The benchmarks' MLP classifier (HF-style forward: (features, labels=None) -> {"logits", "loss"}) with the
    trainer tests' default sizes."""

    def __init__(self, in_dim: int = 16, hidden: int = 32, num_classes: int = 4):
        super().__init__(in_dim, hidden, num_classes)


def three_domain_toy(
    n_per_domain: int = 256, n_target: int = 256, dim: int = 16, classes: int = 4, seed: int = 0
):
    """Domain A: y = argmax(W x); B: labels unrelated to x; C: A with permuted labels.

    Returns (train, target) ``datasets.Dataset`` with columns features, labels, domain; the target
    set is drawn from A, so the best mixture puts its weight on A.
    """
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(classes, dim))

    def domain_a(n):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        return x, (x @ weights.T).argmax(1)

    xa, ya = domain_a(n_per_domain)
    xb = rng.normal(size=(n_per_domain, dim)).astype(np.float32)
    yb = rng.integers(0, classes, n_per_domain)
    xc, yc = domain_a(n_per_domain)
    yc = (yc + 1) % classes
    xt, yt = domain_a(n_target)
    train = datasets.Dataset.from_dict(
        {
            "features": np.concatenate([xa, xb, xc]).tolist(),
            "labels": np.concatenate([ya, yb, yc]).tolist(),
            "domain": ["A"] * n_per_domain + ["B"] * n_per_domain + ["C"] * n_per_domain,
        }
    )
    target = datasets.Dataset.from_dict(
        {"features": xt.tolist(), "labels": yt.tolist(), "domain": ["A"] * n_target}
    )
    return train.with_format("torch"), target.with_format("torch")


def tiny_llama(
    vocab: int = 32, hidden: int = 16, layers: int = 1, heads: int = 2, kv_heads: int = 1, seed: int = 0
):
    """A randomly initialised Llama causal LM (SwiGLU MLP of width 2·hidden, 64 positions), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)
