"""Upper-level variables λ with the MA-SOBA moving-average update.

Two parametrisations (docs/method.md):

- :class:`DomainMixture`: K logits, mixture w = (1 − ε) softmax(λ) + ε / K (ε the floor). An example
  of domain d enters the lower loss with coefficient K · w_d, so the uniform mixture gives the
  plain mean loss: g = (1/n) Σ_i K w_{d(i)} ℓ_i = Σ_d K w_d (n_d / n) L_d.
- :class:`SampleWeights`: one logit per training example, weight σ(λ_i), g = (1/n) Σ_i σ(λ_i) ℓ_i.
  Logits are clipped to [−15, 15] so weights stay strictly inside (0, 1) in float32.

Both keep the moving average h of hypergradient estimates D and update

    h ← (1 − ρ) h + ρ D,        λ ← λ − α h.

A non-finite D is rejected (the update is skipped and ``update`` returns False), so λ and h never
become non-finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

SAMPLE_LOGIT_BOUND = 15.0
DOMAIN_LOGIT_BOUND = 50.0  # beyond this, softmax weights no longer change in float32


class UpperVariable:
    """Shared state and update of the upper-level variables: logits λ, moving average h,
    running sum of weights (for time-averaged weights) and the number of accepted updates."""

    def __init__(self, size: int, init_logit: float = 0.0):
        if size < 1:
            raise ValueError(f"The upper level needs at least one variable, got size {size}.")
        self.logits = torch.full((size,), float(init_logit), dtype=torch.float32)
        self.momentum = torch.zeros(size, dtype=torch.float32)
        self.weight_sum = torch.zeros(size, dtype=torch.float64)
        self.num_updates = 0

    def weights(self, logits: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def coefficients(self, keys: Tensor, logits: Tensor | None = None) -> Tensor:
        """Per-example multipliers c_i(λ) of the lower loss for examples with ``keys``."""
        raise NotImplementedError

    def _constrain(self) -> None:
        """Keep λ in its bounded representation after an update (subclass hook)."""

    def update(self, hypergradient: Tensor, lr: float, ma_weight: float) -> bool:
        """MA-SOBA step: h ← (1 − ρ) h + ρ D; λ ← λ − α h. Returns False (no change) if D is non-finite."""
        hypergradient = hypergradient.detach().to(self.logits)
        if not bool(torch.isfinite(hypergradient).all()):
            return False
        self.momentum.mul_(1.0 - ma_weight).add_(hypergradient, alpha=ma_weight)
        self.logits.sub_(self.momentum, alpha=lr)
        self._constrain()
        self.weight_sum += self.weights().double()
        self.num_updates += 1
        return True

    def average_weights(self) -> Tensor:
        """Time-averaged weights (1/k) Σ_j w(λ_j) over accepted updates (current weights before any)."""
        if self.num_updates == 0:
            return self.weights()
        return (self.weight_sum / self.num_updates).float()

    def to(self, device: torch.device | str) -> UpperVariable:
        self.logits = self.logits.to(device)
        self.momentum = self.momentum.to(device)
        self.weight_sum = self.weight_sum.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().cpu().clone(),
            "momentum": self.momentum.detach().cpu().clone(),
            "weight_sum": self.weight_sum.detach().cpu().clone(),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["logits"].shape != self.logits.shape:
            raise ValueError(
                f"Upper-level state has {state['logits'].numel()} variables but this run has "
                f"{self.logits.numel()}: the checkpoint comes from a different dataset or domain list."
            )
        device = self.logits.device
        self.logits = state["logits"].to(device=device, dtype=torch.float32).clone()
        self.momentum = state["momentum"].to(device=device, dtype=torch.float32).clone()
        self.weight_sum = state["weight_sum"].to(device=device, dtype=torch.float64).clone()
        self.num_updates = int(state["num_updates"])


class DomainMixture(UpperVariable):
    """Mixture over K domains: w = (1 − ε) softmax(λ) + ε/K, coefficients K · w_d.

    The logits are re-centred (mean zero) after each update; softmax is shift-invariant, so this
    changes nothing but keeps λ bounded.
    """

    def __init__(self, domains: Sequence[str], floor: float = 0.0):
        if len(domains) < 1:
            raise ValueError("DomainMixture needs at least one domain.")
        if len(set(domains)) != len(domains):
            raise ValueError(f"Duplicate domain names: {list(domains)}.")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"mixture floor ε must be in [0, 1), got {floor}.")
        super().__init__(len(domains))
        self.domains = list(domains)
        self.floor = float(floor)

    def weights(self, logits: Tensor | None = None) -> Tensor:
        logits = self.logits if logits is None else logits
        k = logits.numel()
        return (1.0 - self.floor) * torch.softmax(logits.float(), dim=0) + self.floor / k

    def coefficients(self, keys: Tensor, logits: Tensor | None = None) -> Tensor:
        weights = self.weights(logits)
        return weights.numel() * weights[keys.to(weights.device)]

    def _constrain(self) -> None:
        self.logits.clamp_(-DOMAIN_LOGIT_BOUND, DOMAIN_LOGIT_BOUND)
        self.logits.sub_(self.logits.mean())

    def as_dict(self, weights: Tensor | None = None) -> dict[str, float]:
        """{domain: weight} for the current (or given) weights."""
        weights = self.weights() if weights is None else weights
        return {name: float(w) for name, w in zip(self.domains, weights.tolist(), strict=True)}


class SampleWeights(UpperVariable):
    """One weight σ(λ_i) ∈ (0, 1) per training example; coefficients σ(λ_i)."""

    def __init__(self, num_examples: int, init_logit: float = 0.0):
        if abs(init_logit) > SAMPLE_LOGIT_BOUND:
            raise ValueError(f"init_logit must be within ±{SAMPLE_LOGIT_BOUND}, got {init_logit}.")
        super().__init__(num_examples, init_logit)

    def weights(self, logits: Tensor | None = None) -> Tensor:
        logits = self.logits if logits is None else logits
        return torch.sigmoid(logits.float())

    def coefficients(self, keys: Tensor, logits: Tensor | None = None) -> Tensor:
        logits = self.logits if logits is None else logits
        return torch.sigmoid(logits[keys.to(logits.device)].float())

    def _constrain(self) -> None:
        self.logits.clamp_(-SAMPLE_LOGIT_BOUND, SAMPLE_LOGIT_BOUND)
