"""Upper-level variables λ and their update.

Two parametrisations (docs/method.md):

- :class:`DomainMixture`: K logits, mixture w = (1 − ε) softmax(λ) + ε / K (ε the floor). An example
  of domain d enters the lower loss with coefficient K · w_d, so the uniform mixture gives the
  plain mean loss: g = (1/n) Σ_i K w_{d(i)} ℓ_i = Σ_d K w_d (n_d / n) L_d.
- :class:`SampleWeights`: one logit per training example, weight σ(λ_i), g = (1/n) Σ_i σ(λ_i) ℓ_i.
  Logits are clipped to [−15, 15] so weights stay strictly inside (0, 1) in float32.

D is the hypergradient estimate with respect to λ. Two update rules (``rule``):

``"normalized"`` (default): normalised mirror descent (exponentiated gradient) on the weights.
    G = ∂F/∂w recovered from D by the chain rule (the mirror-descent gradient),
        domain:  G = D / ((1 − ε) softmax(λ)),  then centred (G ← G − mean G; softmax ignores shifts)
                 [D = (1 − ε) s ⊙ (∂F/∂w − ⟨s, ∂F/∂w⟩), so G = ∂F/∂w up to a constant]
        sample:  G_i = D_i / (σ(λ_i)(1 − σ(λ_i)))   (= ∂F/∂w_i exactly)
    h ← (1 − ρ) h + ρ G,      v ← β v + (1 − β) ms(G),      λ ← λ − α ĥ / √v̂
    with ĥ = h / (1 − (1 − ρ)^k), v̂ = v / (1 − β^k) (Adam-style bias corrections, k = accepted
    updates) and ms(G) the mean square of G (sample mode: over the examples of the batch, D_i ≠ 0).
    The iterate keeps moving (it can leave a vertex) and jitters around an interior optimum; the
    tail average below is the answer.
    In terms of w this is w ← w ⊙ exp(−α ĥ/√v̂) / Z (DoReMi's exponentiated gradient) with a step
    that does not depend on the scale of D (a loss ×c or a different task gives the same steps),
    and, unlike D, G does not vanish when softmax(λ) saturates, so a mixture can leave a vertex.
    A domain's logit moves by at most about α per update (|ĥ|/√v̂ ≲ 1 for a consistent signal).

``"masoba"``: the plain MA-SOBA step h ← (1 − ρ) h + ρ D; λ ← λ − α h (scale-dependent).

A non-finite D is rejected (the update is skipped and ``update`` returns False), so λ, h and v
never become non-finite.

Averaging: besides the final iterate, :meth:`UpperVariable.average_weights` returns a *tail* average
of w over the accepted updates from 2^(j−1) to k where 2^j ≤ k < 2^(j+1) (the last 1/2 to 3/4 of the
run), which drops the initial transient; it is kept online from two running sums (no max_steps needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

SAMPLE_LOGIT_BOUND = 15.0
DOMAIN_LOGIT_BOUND = 50.0  # beyond this, softmax weights no longer change in float32
UpperRule = Literal["normalized", "masoba"]
DEFAULT_RMS_DECAY = 0.99
_STATE_TENSORS = ("logits", "momentum", "second_moment", "tail_sum", "previous_tail_sum")
_TINY = 1e-30  # guards divisions by weights and by √v̂ (both are > 0 whenever D is nonzero)


class UpperVariable:
    """Shared state and update of the upper-level variables: logits λ, moving average h, running
    mean square v (normalized rule), running sums of weights (for averaged weights) and the number
    of accepted updates."""

    def __init__(self, size: int, init_logit: float = 0.0):
        if size < 1:
            raise ValueError(f"The upper level needs at least one variable, got size {size}.")
        self.logits = torch.full((size,), float(init_logit), dtype=torch.float32)
        # float64: under the normalized rule G = ∂F/∂w divides D by weights that can be ~1e-30.
        self.momentum = torch.zeros(size, dtype=torch.float64)
        self.second_moment = torch.zeros((), dtype=torch.float64)
        self.tail_sum = torch.zeros(size, dtype=torch.float64)  # updates in [2^j, k]
        self.previous_tail_sum = torch.zeros(size, dtype=torch.float64)  # updates in [2^(j-1), 2^j)
        self.num_updates = 0

    def weights(self, logits: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def coefficients(self, keys: Tensor, logits: Tensor | None = None) -> Tensor:
        """Per-example multipliers c_i(λ) of the lower loss for examples with ``keys``."""
        raise NotImplementedError

    def _constrain(self) -> None:
        """Keep λ in its bounded representation after an update (subclass hook)."""

    def mirror_gradient(self, hypergradient: Tensor) -> tuple[Tensor, Tensor]:
        """(G, ms): the gradient w.r.t. the weights w recovered from D = ∂F/∂λ, and the mean square
        of G over the variables this D informs (subclass hook)."""
        raise NotImplementedError

    def update(
        self,
        hypergradient: Tensor,
        lr: float,
        ma_weight: float,
        rule: UpperRule = "normalized",
        rms_decay: float = DEFAULT_RMS_DECAY,
    ) -> bool:
        """One upper step with D = ``hypergradient`` (see the module docstring for both rules).

        Returns False and changes nothing if D is non-finite."""
        hypergradient = hypergradient.detach().to(self.logits)
        if not bool(torch.isfinite(hypergradient).all()):
            return False
        if rule == "masoba":
            self.momentum.mul_(1.0 - ma_weight).add_(hypergradient, alpha=ma_weight)
            self.logits.sub_(self.momentum, alpha=lr)
        elif rule == "normalized":
            gradient, mean_square = self.mirror_gradient(hypergradient)
            k = self.num_updates + 1
            self.momentum.mul_(1.0 - ma_weight).add_(gradient, alpha=ma_weight)
            self.second_moment.mul_(rms_decay).add_(mean_square.to(self.second_moment), alpha=1.0 - rms_decay)
            m_hat = self.momentum / (1.0 - (1.0 - ma_weight) ** k)
            v_hat = self.second_moment / (1.0 - rms_decay**k)
            self.logits.sub_(m_hat / (v_hat.sqrt() + _TINY), alpha=lr)
        else:
            raise ValueError(f"rule must be 'normalized' or 'masoba', got {rule!r}.")
        self._constrain()
        self._accumulate(self.weights().double())
        return True

    def _accumulate(self, weights: Tensor) -> None:
        self.num_updates += 1
        k = self.num_updates
        if k & (k - 1) == 0:  # k is a power of two: a new tail window starts at k
            self.previous_tail_sum = self.tail_sum.clone() if k > 1 else torch.zeros_like(self.tail_sum)
            self.tail_sum.zero_()
        self.tail_sum += weights

    def _tail_start(self) -> int:
        """First update of the tail window: 2^(j−1) for 2^j ≤ k < 2^(j+1) (1 for k ≤ 1)."""
        k = self.num_updates
        return max(1, (1 << (k.bit_length() - 1)) // 2)

    def average_weights(self) -> Tensor:
        """Tail-averaged weights: the mean of w(λ_j) over accepted updates j = 2^(j−1)..k (the last
        1/2 to 3/4 of them; current weights before any update)."""
        if self.num_updates == 0:
            return self.weights()
        count = self.num_updates - self._tail_start() + 1
        return ((self.tail_sum + self.previous_tail_sum) / count).float()

    def to(self, device: torch.device | str) -> UpperVariable:
        for name in _STATE_TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).detach().cpu().clone() for name in _STATE_TENSORS}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in (*_STATE_TENSORS, "num_updates") if name not in state]
        if missing:
            raise ValueError(f"Upper-level state lacks {missing}: it was written by another version of bros-hf.")
        if state["logits"].shape != self.logits.shape:
            raise ValueError(
                f"Upper-level state has {state['logits'].numel()} variables but this run has "
                f"{self.logits.numel()}: the checkpoint comes from a different dataset or domain list."
            )
        for name in _STATE_TENSORS:
            current = getattr(self, name)
            setattr(self, name, state[name].to(device=current.device, dtype=current.dtype).clone())
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

    def mirror_gradient(self, hypergradient: Tensor) -> tuple[Tensor, Tensor]:
        """G = D / ((1 − ε) s) − mean, s = softmax(λ): ∂F/∂w up to an additive constant (which
        softmax ignores); computed in float64 so that tiny weights keep their gradient."""
        s = (1.0 - self.floor) * torch.softmax(self.logits.double(), dim=0)
        gradient = hypergradient.double() / s.clamp_min(_TINY)
        gradient = gradient - gradient.mean()
        return gradient, (gradient * gradient).mean()

    def _constrain(self) -> None:
        self.logits.clamp_(-DOMAIN_LOGIT_BOUND, DOMAIN_LOGIT_BOUND)
        self.logits.sub_(self.logits.mean())

    def as_dict(self, weights: Tensor | None = None) -> dict[str, float]:
        """{domain: weight} for the current (or given) weights, renormalised in float64 so that they sum to 1
        to float64 precision: float32 weights sum to 1 only within ~1e-7, and e.g. numpy's sampling (behind
        ``datasets.interleave_datasets(probabilities=...)``) refuses probabilities off by more than ~1e-8."""
        weights = (self.weights() if weights is None else weights).detach().double()
        weights = weights / weights.sum()
        return {name: float(w) for name, w in zip(self.domains, weights.tolist(), strict=True)}


class SampleWeights(UpperVariable):
    """One weight σ(λ_i) ∈ (0, 1) per training example; coefficients σ(λ_i)."""

    def __init__(self, num_examples: int, init_logit: float = 0.0):
        if abs(init_logit) > SAMPLE_LOGIT_BOUND:
            raise ValueError(f"init_logit must be within ±{SAMPLE_LOGIT_BOUND}, got {init_logit}.")
        super().__init__(num_examples, init_logit)

    @classmethod
    def from_weights(cls, weights: Tensor) -> SampleWeights:
        """Weights starting at w_i instead of 0.5: λ_i = log(w_i / (1 − w_i)), with w clipped into
        [σ(−15), σ(15)] (the logits' bounds). E.g. the weights an earlier run learned on the same training set."""
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.dim() != 1 or w.numel() < 1:
            raise ValueError(f"Initial sample weights must be a non-empty 1-D sequence, got shape {tuple(w.shape)}.")
        if not bool(((w > 0) & (w < 1)).all()):
            bad = w[~((w > 0) & (w < 1))][:5].tolist()
            raise ValueError(f"Initial sample weights must lie strictly inside (0, 1) (they are σ(λ)), got {bad}.")
        variable = cls(w.numel())
        variable.logits = torch.logit(w).clamp(-SAMPLE_LOGIT_BOUND, SAMPLE_LOGIT_BOUND).float()
        return variable

    def weights(self, logits: Tensor | None = None) -> Tensor:
        logits = self.logits if logits is None else logits
        return torch.sigmoid(logits.float())

    def coefficients(self, keys: Tensor, logits: Tensor | None = None) -> Tensor:
        logits = self.logits if logits is None else logits
        return torch.sigmoid(logits[keys.to(logits.device)].float())

    def mirror_gradient(self, hypergradient: Tensor) -> tuple[Tensor, Tensor]:
        """G_i = D_i / (σ_i (1 − σ_i)) = ∂F/∂w_i (the binary-entropy mirror map is the logit);
        the mean square is over the examples of the batch (D_i ≠ 0)."""
        s = torch.sigmoid(self.logits.double())
        gradient = hypergradient.double() / (s * (1.0 - s)).clamp_min(_TINY)
        seen = hypergradient != 0
        mean_square = (gradient[seen] ** 2).mean() if bool(seen.any()) else gradient.new_zeros(())
        return gradient, mean_square

    def _constrain(self) -> None:
        self.logits.clamp_(-SAMPLE_LOGIT_BOUND, SAMPLE_LOGIT_BOUND)
