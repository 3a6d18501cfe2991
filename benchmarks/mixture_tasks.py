"""Data-mixture tasks with a known (or measurable) best mixture w*, for ``benchmarks.mixtures``.

``rules*`` (exact w*): every training domain d labels x ~ N(0, I) by its own rule
y = argmax(W_d x); each target label comes from rule d with probability π_d. A well-specified lower
level trained on the mixture w learns p_w(y|x) = Σ_d w_d 1[y = argmax W_d x], whose expected target
cross-entropy E_x[-Σ_d π_d log p_w(y_d(x)|x)] is minimised exactly at w = π (Gibbs' inequality,
pointwise in x wherever the rules disagree). So w* = π.

``lm2`` (measurable w*): causal LM on the offline corpus of ``recipes/local_corpus.py`` (training
domains ``code``, ``docs``, ``legal``); the target is 70 % ``docs`` + 30 % ``code`` blocks of
held-out text. w* is taken as the target's composition (0.3, 0.7, 0). That is the natural
answer, not a proven optimum: a finite model trained for finitely many steps may prefer another
mixture (e.g. more of a harder domain), so the fresh-model target loss is the real quality measure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch import nn

from benchmarks.data import DictDataset
from benchmarks.models import ModelSize, build_model

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def rule_mixture_task(
    target_mixture: tuple[float, ...],
    n_per_domain: int = 2000,
    n_target: int = 1000,
    dim: int = 8,
    classes: int = 3,
    seed: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset, np.ndarray]:
    """K = len(target_mixture) domains named D0..D{K-1}, domain d labelled by y = argmax(W_d x).

    Target labels: rule d with probability π_d. Returns (train, target, π); both datasets have columns
    features, labels, domain (the target's domain column is the rule that labelled the example).
    """
    pi = np.asarray(target_mixture, dtype=np.float64)
    if not np.isclose(pi.sum(), 1.0) or (pi < 0).any():
        raise ValueError(f"target_mixture must be a probability vector, got {target_mixture}.")
    rng = np.random.default_rng(seed)
    k = len(pi)
    rules = rng.normal(size=(k, classes, dim))
    names = [f"D{d}" for d in range(k)]
    xs, ys, ds = [], [], []
    for d in range(k):
        x = rng.normal(size=(n_per_domain, dim)).astype(np.float32)
        xs.append(x)
        ys.append((x @ rules[d].T).argmax(1))
        ds += [names[d]] * n_per_domain
    train = datasets.Dataset.from_dict(
        {"features": np.concatenate(xs).tolist(), "labels": np.concatenate(ys).tolist(), "domain": ds}
    )
    xt = rng.normal(size=(n_target, dim)).astype(np.float32)
    source = rng.choice(k, size=n_target, p=pi)
    yt = np.einsum("ncd,nd->nc", rules[source], xt).argmax(1)
    target = datasets.Dataset.from_dict(
        {"features": xt.tolist(), "labels": yt.tolist(), "domain": [names[d] for d in source]}
    )
    return train.with_format("torch"), target.with_format("torch"), pi


def total_variation(weights: dict[str, float] | np.ndarray, pi: np.ndarray) -> float:
    """TV(w, π) = ½ ‖w − π‖₁ (w as a vector, or a dict in the order of π)."""
    w = np.asarray(list(weights.values()) if isinstance(weights, dict) else weights, dtype=np.float64)
    return 0.5 * float(np.abs(w - np.asarray(pi)).sum())


class MLPClassifier(nn.Module):
    """in_dim → hidden (tanh) → classes, HF-style forward: (features, labels=None) → {"logits", "loss"}."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


@dataclass
class MixtureTask:
    """One benchmark task. ``train`` has a domain column; ``target`` is what the mixture is learned
    against, ``target_eval`` a disjoint sample of the same target distribution (fresh-model loss)."""

    name: str
    domains: list[str]
    w_star: np.ndarray
    w_star_kind: str  # "exact" | "target composition"
    train: DictDataset
    target: DictDataset
    target_eval: DictDataset
    make_model: Callable[[int], nn.Module]  # seed → freshly initialised model
    steps: int
    batch_size: int
    learning_rate: float
    description: str

    def domain_ids(self) -> torch.Tensor:
        """Index of every training example's domain in ``domains``."""
        lookup = {name: i for i, name in enumerate(self.domains)}
        return torch.tensor([lookup[d] for d in self.train.domains], dtype=torch.long)


def _as_dict_dataset(ds: datasets.Dataset) -> DictDataset:
    rows = ds.with_format(None)[:]
    columns = {"features": torch.tensor(rows["features"]), "labels": torch.tensor(rows["labels"])}
    return DictDataset(columns, list(rows["domain"]))


def rules_task(
    name: str, mixture: tuple[float, ...], dim: int, classes: int, hidden: int, seed: int, steps: int
) -> MixtureTask:
    """A :func:`rule_mixture_task` (2000 examples per domain, 1000 target, 2000 target-eval examples)
    with an MLP dim-hidden-classes, batch 96, AdamW lr 3e-3 (the known-answer tests' setting)."""
    n_target, n_eval = 1000, 2000
    train, target, pi = rule_mixture_task(
        mixture, n_target=n_target + n_eval, dim=dim, classes=classes, seed=seed
    )
    target_all = _as_dict_dataset(target)
    split = {k: (v[:n_target], v[n_target:]) for k, v in target_all.columns.items()}
    return MixtureTask(
        name=name,
        domains=[f"D{d}" for d in range(len(mixture))],
        w_star=pi,
        w_star_kind="exact",
        train=_as_dict_dataset(train),
        target=DictDataset({k: v[0] for k, v in split.items()}, target_all.domains[:n_target]),
        target_eval=DictDataset({k: v[1] for k, v in split.items()}),
        make_model=lambda s: _seeded(lambda: MLPClassifier(dim, hidden, classes), s),
        steps=steps,
        batch_size=96,
        learning_rate=3e-3,
        description=f"{len(mixture)} rule domains, target labels from rule d w.p. π = {tuple(mixture)}; "
        f"MLP {dim}-{hidden}-{classes}",
    )


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def _load_local_corpus():
    """recipes/local_corpus.py, imported the way the recipes import it (from the recipes folder)."""
    if RECIPES_DIR not in sys.path:
        sys.path.insert(0, RECIPES_DIR)
    import local_corpus

    return local_corpus


def _compose(blocks: datasets.Dataset, composition: dict[str, float], seed: int) -> DictDataset:
    """The largest sample of ``blocks`` whose domain shares are ``composition`` (rounded), shuffled."""
    by_domain = {d: [i for i, v in enumerate(blocks["domain"]) if v == d] for d in composition}
    total = min(len(by_domain[d]) / share for d, share in composition.items() if share > 0)
    chosen = [i for d, share in composition.items() for i in by_domain[d][: int(round(total * share))]]
    order = np.random.default_rng(seed).permutation(len(chosen))
    chosen = [chosen[i] for i in order]
    ids = torch.tensor(blocks.select(chosen)["input_ids"], dtype=torch.long)
    return DictDataset({"input_ids": ids, "labels": ids}, [blocks["domain"][i] for i in chosen])


def lm_task(name: str, steps: int, max_docs_per_domain: int = 200, seed: int = 0) -> MixtureTask:
    """Tiny Llama (hidden 64, 2 layers, 4 heads, BPE vocab 512, blocks of 64 tokens) on the offline corpus;
    training domains code, docs, legal; target = 70 % docs + 30 % code blocks of the corpus' target split,
    target-eval the same composition of its eval split. Batch 12 (4 blocks per domain), AdamW lr 3e-3."""
    corpus_module = _load_local_corpus()
    domains = ["code", "docs", "legal"]
    composition = {"code": 0.3, "docs": 0.7}
    datasets.disable_progress_bars()
    corpus = corpus_module.build_local_corpus(
        None, domains=domains, max_docs_per_domain=max_docs_per_domain, chunk_chars=1000, seed=seed
    )
    tokenizer = corpus_module.train_bpe_tokenizer(corpus["train"]["text"], vocab_size=512)
    blocks = {split: corpus_module.tokenize_and_group(corpus[split], tokenizer, 64) for split in corpus}
    train_ids = torch.tensor(blocks["train"]["input_ids"], dtype=torch.long)
    size = ModelSize(name, "llama", hidden=64, layers=2, heads=4, vocab=len(tokenizer), seq_len=64)
    return MixtureTask(
        name=name,
        domains=domains,
        w_star=np.array([composition.get(d, 0.0) for d in domains]),
        w_star_kind="target composition",
        train=DictDataset({"input_ids": train_ids, "labels": train_ids}, list(blocks["train"]["domain"])),
        target=_compose(blocks["target"], composition, seed),
        target_eval=_compose(blocks["eval"], composition, seed + 1),
        make_model=lambda s: build_model(size, s),
        steps=steps,
        batch_size=12,
        learning_rate=3e-3,
        description="offline corpus (code, docs, legal), target 70 % docs + 30 % code held-out blocks; "
        "Llama 64-d 2 layers, vocab 512, 64 tokens",
    )


# name → (builder of the task for a number of steps, default steps, --quick steps)
TASKS: dict[str, tuple[Callable[[str, int], MixtureTask], int, int]] = {
    "rules3": (
        lambda n, s: rules_task(n, (0.6, 0.4, 0.0), dim=8, classes=3, hidden=64, seed=0, steps=s),
        1000,
        300,
    ),
    "rules4": (
        lambda n, s: rules_task(n, (0.2, 0.5, 0.3, 0.0), dim=10, classes=4, hidden=48, seed=1, steps=s),
        1000,
        300,
    ),
    "lm2": (lambda n, s: lm_task(n, steps=s), 250, 100),
}


def build_task(name: str, quick: bool, steps: int | None = None) -> MixtureTask:
    """Task ``name`` with ``steps`` optimizer steps (default: the task's default, or its --quick count)."""
    builder, default_steps, quick_steps = TASKS[name]
    return builder(name, steps or (quick_steps if quick else default_steps))
