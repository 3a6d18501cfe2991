"""Known-answer tasks for the upper level (domain mixtures and per-example weights).

Construction: every training domain d has its own labelling rule p_d(y|x) = 1[y = argmax W_d x] on a
shared input distribution x ~ N(0, I). Each target example draws its label from rule d with
probability π_d. A well-specified lower level trained on the mixture w learns
p_w(y|x) = Σ_d w_d p_d(y|x) (each domain enters with weight w_d), whose expected target
cross-entropy E_x[ -Σ_d π_d log p_w(y_d(x)|x) ] is minimised exactly at w = π (Gibbs' inequality,
pointwise in x whenever the rules disagree). So the bilevel answer is known: w* = π.
"""

from __future__ import annotations

import datasets
import numpy as np


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
    w = np.asarray(list(weights.values()) if isinstance(weights, dict) else weights, dtype=np.float64)
    return 0.5 * float(np.abs(w - np.asarray(pi)).sum())
