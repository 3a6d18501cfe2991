"""Plain-torch domain-mixture baselines for ``benchmarks.mixtures``: DoReMi-style and DoGE-style.

Both train a proxy model with AdamW (lr of the task, linear decay to 0, as the Trainer's default) on
balanced batches (batch_size / K examples of every domain, drawn with replacement) and learn the
domain weights w alongside it; the answer is the time average of w over all steps.

DoReMi-style (Xie et al., 2023; Group DRO on excess loss, no target set):
  1. a reference model θ_ref trained on the uniform mixture for the same number of steps;
  2. the proxy θ: per step, per-domain excess loss e_d = mean_{i ∈ d} max(ℓ_i(θ) − ℓ_i(θ_ref), 0),
     w ← normalize(w ⊙ exp(η e_d)), then w ← (1 − c) w + c/K, and θ steps on Σ_d w_d mean_{i ∈ d} ℓ_i(θ).
  η = 1 and c = 1e-3 as in DoReMi. The clip is per example (a sequence's mean token loss for the LM),
  DoReMi clips per token. DoReMi never sees the target set: it upweights the domains where the proxy
  lags the reference most, whatever the target is.

DoGE-style (Fan et al., 2024; first-order gradient alignment with the target, no Hessian):
  per step, g_d = ∇ mean_{i ∈ d} ℓ_i(θ) for every domain and g_t = ∇ mean ℓ(θ) on a target batch;
  a_d = ⟨g_d, g_t⟩ (to first order, the target-loss decrease of a step on domain d), normalised by its
  root mean square over domains: â_d = a_d / sqrt(mean_j a_j²); w ← normalize(w ⊙ exp(η â_d)), and θ
  steps on Σ_d w_d g_d. The normalisation is one scalar per step, so it keeps the ranking and ratios
  of the inner products (and DoGE's fixed point, equal alignments across the domains in use) while
  making the step free of the losses' scale and of the model's size: a logit moves by at most about
  η·sqrt(K) per step, like BROS's normalised upper step. η = DOMAIN_LOGIT_TRAVEL / steps, the same
  logit-travel budget as BROSConfig's default upper step size, for every task. (A cosine
  ⟨g_d, g_t⟩ / (‖g_d‖ ‖g_t‖) was the other candidate: it is tiny for a model with many parameters, so
  the same η barely moves w on the LM task, and dividing by ‖g_d‖ changes the fixed point.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bros_hf.config import DOMAIN_LOGIT_TRAVEL
from bros_hf.losses import per_example_losses

DOREMI_STEP_SIZE = 1.0
DOREMI_SMOOTHING = 1e-3

Batch = dict[str, Tensor]


def exponentiated_step(weights: Tensor, signal: Tensor, eta: float) -> Tensor:
    """normalize(w ⊙ exp(η s)), computed as softmax(log w + η s) so that large η s cannot overflow."""
    return torch.softmax(torch.log(weights) + eta * signal, dim=0)


def doremi_update(
    weights: Tensor, excess: Tensor, eta: float = DOREMI_STEP_SIZE, smoothing: float = DOREMI_SMOOTHING
) -> Tensor:
    """w ← (1 − c) · normalize(w ⊙ exp(η e)) + c/K (exponentiated gradient ascent on the excess loss e)."""
    return (1.0 - smoothing) * exponentiated_step(weights, excess, eta) + smoothing / len(weights)


def doge_update(weights: Tensor, alignment: Tensor, eta: float) -> Tensor:
    """w ← normalize(w ⊙ exp(η a)) (exponentiated gradient ascent on the alignment a)."""
    return exponentiated_step(weights, alignment, eta)


def normalized_alignment(domain_grads: list[list[Tensor]], target_grad: list[Tensor]) -> Tensor:
    """â_d = a_d / sqrt(mean_j a_j²) with a_d = ⟨g_d, g_t⟩ over all parameters (all 0 if every a_d is 0)."""
    flat_t = torch.cat([g.reshape(-1) for g in target_grad])
    flat_d = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in domain_grads])
    alignment = flat_d @ flat_t
    rms = alignment.pow(2).mean().sqrt()
    return alignment / rms if rms > 0 else alignment


def domain_excess(losses: Tensor, reference: Tensor, domain_of: Tensor, num_domains: int) -> Tensor:
    """e_d = mean over the batch's examples of domain d of max(ℓ_i − ℓ_ref_i, 0) (0 for an absent domain)."""
    clipped = (losses - reference).clamp(min=0.0)
    return domain_means(clipped, domain_of, num_domains)


def domain_means(values: Tensor, domain_of: Tensor, num_domains: int) -> Tensor:
    """mean_{i ∈ d} values_i for every domain d (0 where the batch has no example of d)."""
    sums = torch.zeros(num_domains, dtype=values.dtype).index_add(0, domain_of, values)
    counts = torch.bincount(domain_of, minlength=num_domains).clamp(min=1)
    return sums / counts


class BalancedBatches:
    """Batches of ``batch_size // K`` examples of every domain, drawn with replacement (seeded)."""

    def __init__(
        self, columns: dict[str, Tensor], domain_ids: Tensor, num_domains: int, batch_size: int, seed: int
    ):
        self.columns = columns
        self.members = [torch.nonzero(domain_ids == d).flatten() for d in range(num_domains)]
        self.per_domain = max(batch_size // num_domains, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Batch, Tensor]:
        """(batch, domain id of every row)."""
        picks = [m[torch.randint(len(m), (self.per_domain,), generator=self.generator)] for m in self.members]
        indices = torch.cat(picks)
        domain_of = torch.arange(len(picks)).repeat_interleave(self.per_domain)
        return {k: v[indices] for k, v in self.columns.items()}, domain_of


class UniformBatches:
    """Batches of ``batch_size`` examples drawn uniformly with replacement (the target stream)."""

    def __init__(self, columns: dict[str, Tensor], batch_size: int, seed: int):
        self.columns = columns
        self.size = len(next(iter(columns.values())))
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Batch:
        indices = torch.randint(self.size, (self.batch_size,), generator=self.generator)
        return {k: v[indices] for k, v in self.columns.items()}


def losses_of(model: nn.Module, batch: Batch) -> Tensor:
    """Per-example losses ℓ_i (classification or causal LM) of ``model`` on ``batch``."""
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    return per_example_losses(outputs, batch["labels"])


def make_optimizer(model: nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay 0) with linear decay to 0 over ``steps``: the Trainer's defaults."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
    return optimizer, schedule


def train_uniform(model: nn.Module, batches: BalancedBatches, lr: float, steps: int) -> nn.Module:
    """θ_ref: plain training on balanced (= uniform-mixture) batches."""
    optimizer, schedule = make_optimizer(model, lr, steps)
    model.train()
    for _ in range(steps):
        batch, _ = batches.next()
        optimizer.zero_grad()
        losses_of(model, batch).mean().backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def doremi(
    make_model: Callable[[], nn.Module],
    batches: Callable[[], BalancedBatches],
    num_domains: int,
    lr: float,
    steps: int,
) -> np.ndarray:
    """Time-averaged DoReMi-style weights (module docstring); ``make_model``/``batches`` give fresh copies."""
    reference = train_uniform(make_model(), batches(), lr, steps)
    proxy, stream = make_model(), batches()
    optimizer, schedule = make_optimizer(proxy, lr, steps)
    weights = torch.full((num_domains,), 1.0 / num_domains)
    total = torch.zeros(num_domains, dtype=torch.float64)
    proxy.train()
    for _ in range(steps):
        batch, domain_of = stream.next()
        losses = losses_of(proxy, batch)
        with torch.no_grad():
            reference_losses = losses_of(reference, batch)
        weights = doremi_update(
            weights, domain_excess(losses.detach(), reference_losses, domain_of, num_domains)
        )
        total += weights.double()
        optimizer.zero_grad()
        (weights * domain_means(losses, domain_of, num_domains)).sum().backward()
        optimizer.step()
        schedule.step()
    return (total / steps).numpy()


def doge(
    model: nn.Module,
    batches: BalancedBatches,
    target: UniformBatches,
    num_domains: int,
    lr: float,
    steps: int,
) -> np.ndarray:
    """Time-averaged DoGE-style weights (module docstring): K + 1 backward passes per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = make_optimizer(model, lr, steps)
    eta = DOMAIN_LOGIT_TRAVEL / steps
    weights = torch.full((num_domains,), 1.0 / num_domains)
    total = torch.zeros(num_domains, dtype=torch.float64)
    model.train()
    for _ in range(steps):
        batch, domain_of = batches.next()
        per_domain = domain_means(losses_of(model, batch), domain_of, num_domains)
        domain_grads = [
            list(torch.autograd.grad(per_domain[d], params, retain_graph=True)) for d in range(num_domains)
        ]
        target_grad = torch.autograd.grad(losses_of(model, target.next()).mean(), params)
        weights = doge_update(weights, normalized_alignment(domain_grads, list(target_grad)), eta)
        total += weights.double()
        for i, p in enumerate(params):
            p.grad = sum(weights[d] * domain_grads[d][i] for d in range(num_domains))
        optimizer.step()
        schedule.step()
    return (total / steps).numpy()
