"""BROS and MA-SOBA steps on dicts of tensors, usable from any training loop.

Per step k, with lower batch ξ and upper batch ζ (docs/method.md):

    θ ← θ − β S_U ∇_θ g(λ, θ; ξ)                            (through r-dim coordinates)
    z ← Π_R( z − κ γ_n S_P ( H S_Q z − ∇_θ f(θ; ζ) ) )       H = ∇²_θθ g(λ, θ; ξ)
    D = ∇_λ f − ∂_λ ⟨∇_θ g, S_Q z⟩
    h ← (1 − ρ) h + ρ D,       λ ← λ − α h      (``upper_rule="masoba"``, this class's default)

``upper_rule="normalized"`` (the default of ``BROSConfig``) replaces the last line by a scale-free
exponentiated-gradient step on the weights (:mod:`bros_hf.core.upper`). ``method="masoba"`` is the same code with identity sketches (S_U = S_P = S_Q = I). ``method="bros"``
draws independent Rademacher (or Gaussian) P, Q every step from a generator seeded identically on every
process, on the parameters' device (rank identity is checked at every checkpoint save by the Trainer): each auxiliary step is then the unbiased bi-probe step the method analyses. The
lower update runs in U = P when ``resample_every`` = 1 (the analysed method), else in its own
subspace U, redrawn every ``resample_every`` steps: the lower optimizer (e.g. Adam) keeps its state
in U's coordinates between redraws, which it needs to make progress (see the README's numbers).
Tensors named in ``lower_full_space`` (e.g. embeddings) take their lower update in full space (U = I)
while P and Q stay random for them; tensors named in ``unsketched`` (e.g. a classification head) are full-space
in all three (P = Q = U = I). γ_n = γ · r / n for a tensor sketched along a dimension of size n (``aux_step_scaling="rank_ratio"``,
the default) because the variance of S_P H S_Q grows like (n / r)²; full-space tensors use γ. κ ∈ [0, 1] is 1 unless ``aux_step_limit`` c is set: then κ = min(1, c ā / b̄) keeps the
auxiliary step contracting in mean square whatever γ (:meth:`BilevelEngine.aux_step_factor`; ``BROSConfig`` sets
c = 1). All terms of a step use the iterates (θ_k, z_k, λ_k).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from bros_hf.core.estimators import (
    DEFAULT_FD_EPS,
    HessianMode,
    LossFn,
    LowerLossFn,
    LowerPassResult,
    Perturber,
    SubspaceVector,
    coordinate_gradient,
    global_norm,
    lower_pass,
)
from bros_hf.core.sketch import Sketch, SketchKind
from bros_hf.core.upper import DEFAULT_RMS_DECAY, UpperRule, UpperVariable

Method = Literal["bros", "masoba"]
AUX_MOMENT_DECAY = 0.9
"""Decay of the running means behind the auxiliary step's limit (:meth:`BilevelEngine.aux_step_factor`)."""


# Largest block (elements) of a low-precision z updated at once in float32: 16 MB of temporaries per block.
Z_UPDATE_BLOCK = 1 << 22


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """float32 ``x`` to bfloat16, rounded up or down at random so that E[result] = x: the 16 low bits of the float32
    pattern, read as a fraction of the bfloat16 spacing, are the probability of rounding the magnitude up
    (a uniform 16-bit integer added to them carries into the kept bits with exactly that probability).
    Round-to-nearest would drop every update smaller than half that spacing (2⁻⁹ relative), so z would stop
    moving once its steps are small."""
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic_round rounds float32 to bfloat16, not to {dtype}.")
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _float32_dot(x: Tensor, y: Tensor) -> Tensor:
    """⟨x, y⟩ of two flat tensors accumulated in float32, in blocks of ``Z_UPDATE_BLOCK`` elements when either is in a
    lower precision (no full-size float32 copy of a bfloat16 z)."""
    if x.dtype == y.dtype == torch.float32:
        return torch.dot(x, y)
    return sum(
        (torch.dot(x[i : i + Z_UPDATE_BLOCK].float(), y[i : i + Z_UPDATE_BLOCK].float()) for i in range(0, x.numel(), Z_UPDATE_BLOCK)),
        torch.zeros((), device=x.device),
    )


# Largest tensors (elements) whose dot products are batched by stacking same-shape pairs (small copies only).
BATCHED_DOT_LIMIT = 1 << 16


def _sum_of_float32_dots(pairs: list[tuple[Tensor, Tensor]], device: torch.device) -> Tensor:
    """Σ ⟨x, y⟩ over pairs of same-shape tensors, in float32 on ``device``. Small float32 pairs of one shape are
    stacked and reduced together (a few kernels per distinct shape rather than several per tensor); the others go
    through :func:`_float32_dot` one by one (no stacked copy of a large or low-precision tensor)."""
    total = torch.zeros((), device=device)
    groups: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
    for x, y in pairs:
        if x.dtype == y.dtype == torch.float32 and x.numel() <= BATCHED_DOT_LIMIT and x.device == y.device:
            groups.setdefault((x.shape, x.device), []).append((x, y))
        else:
            total += _float32_dot(x.reshape(-1), y.reshape(-1)).to(device)
    for members in groups.values():
        xs = torch.stack([x for x, _ in members])
        ys = torch.stack([y for _, y in members])
        total += (xs * ys).sum().to(device)
    return total


def _times_scalar(tensors: list[Tensor], scalar: Tensor, in_place: bool = False) -> list[Tensor]:
    """[t · scalar for t in tensors] (a 0-d ``scalar``), with one foreach call per device instead of one kernel per
    tensor; ``in_place`` multiplies the tensors themselves."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    results: list[Tensor] = list(tensors)
    for device, indices in by_device.items():
        group, factor = [tensors[i] for i in indices], scalar.to(device)
        if in_place:
            torch._foreach_mul_(group, factor)
            products = group
        else:
            products = torch._foreach_mul(group, factor)
        for index, product in zip(indices, products, strict=True):
            results[index] = product
    return results


@dataclass
class BilevelHyperparameters:
    """Knobs of the bilevel step (see module docstring for the equations)."""

    method: Method = "bros"
    rank: int = 16
    sketch: SketchKind = "rademacher"
    resample_every: int = 1
    hessian_mode: HessianMode = "autograd"
    aux_lr: float = 0.1
    aux_step_scaling: Literal["rank_ratio", "none"] = "rank_ratio"
    upper_lr: float = 0.1
    ma_weight: float = 0.5
    upper_rule: UpperRule = "masoba"
    upper_rms_decay: float = DEFAULT_RMS_DECAY
    z_radius: float | None = None
    aux_step_limit: float | None = None
    fd_eps: float = DEFAULT_FD_EPS
    upper_warmup_steps: int = 0
    lower_full_space: tuple[str, ...] = ()
    unsketched: tuple[str, ...] = ()
    z_dtype: Literal["bfloat16"] | None = None  # None: float32

    def __post_init__(self) -> None:
        if self.method not in ("bros", "masoba"):
            raise ValueError(f"method must be 'bros' or 'masoba', got {self.method!r}.")
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}.")
        if self.resample_every < 1:
            raise ValueError(f"resample_every must be ≥ 1, got {self.resample_every}.")
        for name in ("aux_lr", "upper_lr", "fd_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if not 0.0 < self.ma_weight <= 1.0:
            raise ValueError(f"ma_weight ρ must be in (0, 1], got {self.ma_weight}.")
        if self.upper_rule not in ("normalized", "masoba"):
            raise ValueError(f"upper_rule must be 'normalized' or 'masoba', got {self.upper_rule!r}.")
        if not 0.0 <= self.upper_rms_decay < 1.0:
            raise ValueError(f"upper_rms_decay β must be in [0, 1), got {self.upper_rms_decay}.")
        if self.z_radius is not None and not self.z_radius > 0:
            raise ValueError(f"z_radius must be > 0 or None, got {self.z_radius}.")
        if self.aux_step_limit is not None and not 0.0 < self.aux_step_limit < 2.0:
            raise ValueError(
                f"aux_step_limit c must be in (0, 2) (the auxiliary iteration stops contracting at c = 2) or None, "
                f"got {self.aux_step_limit}."
            )
        if self.z_dtype not in (None, "bfloat16"):
            raise ValueError(f"z_dtype must be None (float32) or 'bfloat16', got {self.z_dtype!r}.")
        self.lower_full_space = tuple(self.lower_full_space)
        self.unsketched = tuple(self.unsketched)


@dataclass
class Terms:
    """Everything one step needs from its batches, in the coordinates the updates use.

    ``lower_grad`` = Uᵀ∇_θ g(λ, θ; ξ), ``hessian_action`` = Pᵀ H S_Q z, ``upper_grad`` = Pᵀ∇_θ f(θ; ζ),
    ``cross`` = ∂_λ⟨∇_θ g, S_Q z⟩ (so D = −cross), ``aux_moments`` = (⟨Pᵀz, Pᵀ H S_Q z⟩, Σ_n γ_n ‖P Pᵀ H S_Q z‖²)
    (:meth:`BilevelEngine.aux_moments`, which limit the auxiliary step), and the two losses. Terms of several micro-batches
    (or processes) combine linearly: ``t_1.scaled(1 / n) + … + t_n.scaled(1 / n)`` is their mean.
    An empty ``upper_grad`` means ``hessian_action`` already holds the residual Pᵀ H S_Q z − Pᵀ∇f
    (:meth:`accumulation_share`).
    """

    lower_loss: Tensor
    upper_loss: Tensor
    lower_grad: dict[str, Tensor]
    hessian_action: dict[str, Tensor]
    upper_grad: dict[str, Tensor]
    cross: Tensor
    aux_moments: Tensor

    def groups(self) -> dict[str, dict[str, Tensor]]:
        """Every tensor, by group then name (a stable order, e.g. for one flat all-reduce)."""
        return {
            "lower_grad": self.lower_grad,
            "hessian_action": self.hessian_action,
            "upper_grad": self.upper_grad,
            "cross": {"cross": self.cross},
            "aux_moments": {"aux_moments": self.aux_moments},
            "losses": {"lower": self.lower_loss, "upper": self.upper_loss},
        }

    @classmethod
    def from_groups(cls, groups: Mapping[str, Mapping[str, Tensor]]) -> Terms:
        """Inverse of :meth:`groups`."""
        return cls(
            lower_loss=groups["losses"]["lower"],
            upper_loss=groups["losses"]["upper"],
            lower_grad=dict(groups["lower_grad"]),
            hessian_action=dict(groups["hessian_action"]),
            upper_grad=dict(groups["upper_grad"]),
            cross=groups["cross"]["cross"],
            aux_moments=groups["aux_moments"]["aux_moments"],
        )

    def scaled(self, factor: float) -> Terms:
        """Detached float32 copies times ``factor`` (one micro-batch's share of an accumulated step)."""
        groups = self.groups()
        return Terms.from_groups(
            {g: {n: t.detach().float() * factor for n, t in ts.items()} for g, ts in groups.items()}
        )

    def accumulation_share(self, factor: float) -> Terms:
        """:meth:`scaled` by ``factor``, with ``hessian_action`` replaced by the auxiliary residual
        Pᵀ H S_Q z − Pᵀ∇f and ``upper_grad`` left empty. z's update uses only that difference
        (:meth:`BilevelEngine.update_auxiliary`) and means commute with it, so accumulating and all-reducing the
        residual gives the same step with one new tensor per parameter where :meth:`scaled` makes two: less
        memory across micro-batches, fewer bytes between processes. float32 terms with ``factor`` 1 (no
        accumulation) are taken as they are, not copied: the passes made them and nothing else holds them."""

        def share(t: Tensor) -> Tensor:
            t = t.detach()
            return t if factor == 1.0 and t.dtype == torch.float32 else t.float() * factor

        names = list(self.hessian_action)
        differences = torch._foreach_sub(  # foreach: one call for all tensors
            [self.hessian_action[n].detach().float() for n in names],
            [self.upper_grad[n].detach().float() for n in names],
        )
        if factor != 1.0:
            torch._foreach_mul_(differences, factor)
        residual = dict(zip(names, differences, strict=True))
        lower_grad = {n: share(g) for n, g in self.lower_grad.items()}
        return Terms(
            share(self.lower_loss), share(self.upper_loss), lower_grad, residual, {}, share(self.cross),
            share(self.aux_moments),
        )

    def __add__(self, other: Terms) -> Terms:
        mine, theirs = self.groups(), other.groups()
        return Terms.from_groups({g: {n: t + theirs[g][n] for n, t in ts.items()} for g, ts in mine.items()})

    def add_(self, other: Terms) -> Terms:
        """``self += other``, tensor by tensor in place (accumulating micro-batches without new buffers)."""
        theirs = other.groups()
        for group, tensors in self.groups().items():
            for name, tensor in tensors.items():
                tensor.add_(theirs[group][name])
        return self

    def is_finite(self) -> bool:
        """True when every entry of every term is finite: the largest |entry| over all terms (a NaN anywhere makes
        it NaN) from torch's fused per-device norms, then one host synchronisation."""
        tensors = [t for ts in self.groups().values() for t in ts.values()]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)))


@dataclass
class StepStatistics:
    """What a step reports, as 0-dim tensors on the terms' device: reading them (``float()``) synchronises
    with the device, so loops read them only when they log. ``hypergradient_norm`` is NaN on a skipped step;
    ``aux_step_factor`` is the factor κ ∈ [0, 1] that ``aux_step_limit`` put on the auxiliary step (1: unlimited)."""

    lower_loss: Tensor
    upper_loss: Tensor
    hypergradient_norm: Tensor
    aux_step_factor: Tensor
    skipped: bool


LowerUpdate = Callable[[dict[str, Tensor] | None], None]
"""Takes the lower coordinate gradient Uᵀ∇g of an accepted step and moves θ (through
:meth:`BilevelEngine.apply_coordinates` or an optimizer over the coordinates); called with ``None``
when the step is skipped."""


class BilevelEngine:
    """State of one bilevel problem: θ (referenced, updated in place), z, sketches, λ (``upper``).

    A step is :meth:`begin_step`, :meth:`compute_terms` on each micro-batch, then :meth:`apply` on
    their mean (the Trainer adapter accumulates micro-batches and all-reduces between the two);
    :meth:`step` is all three for one batch pair with SGD on the lower level, for custom loops.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        upper: UpperVariable,
        hparams: BilevelHyperparameters,
        seed: int = 0,
        perturber: Perturber | None = None,
    ):
        self.params = dict(params)
        for field_name in ("lower_full_space", "unsketched"):
            unknown = sorted(set(getattr(hparams, field_name)) - set(self.params))
            if unknown:
                raise ValueError(f"{field_name} names tensors that are not among the parameters: {unknown}.")
        self.perturber = perturber
        self.upper = upper
        self.hparams = hparams
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)
        z_dtype = torch.bfloat16 if hparams.z_dtype == "bfloat16" else torch.float32
        # A bfloat16 z is contiguous whatever θ's strides: its update writes through [m, n] views.
        layout = torch.contiguous_format if hparams.z_dtype is not None else torch.preserve_format
        self.z = {n: torch.zeros_like(p, dtype=z_dtype, memory_format=layout) for n, p in self.params.items()}
        self.aux_moment_means = torch.zeros(2, device=device)  # running means of Terms.aux_moments
        self._z_in_p: dict[str, Tensor] | None = None  # Pᵀz of this step (z and P are fixed within a step)
        self.step_count = 0
        self.sketch_p = Sketch.identity(self.params)
        self.sketch_q = self.sketch_p
        self.sketch_u = self.sketch_p
        self._resample_if_due()

    # -- sketches -------------------------------------------------------------------------------
    @property
    def full_space(self) -> bool:
        return self.hparams.method == "masoba"

    def _resample_if_due(self) -> bool:
        """Fresh P, Q; a fresh U when due (U = P at ``resample_every`` = 1). True when U changed.

        U is the identity for the tensors in ``lower_full_space`` (their lower update is full-space); P, Q and U
        are the identity for those in ``unsketched``."""
        if self.full_space:
            return False
        kind, rank, full = self.hparams.sketch, self.hparams.rank, self.hparams.lower_full_space
        unsketched = self.hparams.unsketched
        self.sketch_p = Sketch.sample(self.params, rank, self.generator, kind).with_identity(unsketched)
        self.sketch_q = Sketch.sample(self.params, rank, self.generator, kind).with_identity(unsketched)
        if self.hparams.resample_every == 1:
            self.sketch_u = self.sketch_p.with_identity(full)
            return True
        if self.step_count % self.hparams.resample_every != 0:
            return False
        self.sketch_u = Sketch.sample(self.params, rank, self.generator, kind).with_identity((*full, *unsketched))
        return True

    def begin_step(self) -> bool:
        """Call once per optimizer step before any term; returns True when the lower subspace U changed."""
        return self._resample_if_due()

    def end_step(self) -> None:
        self.step_count += 1
        self._z_in_p = None

    # -- terms ----------------------------------------------------------------------------------
    def lower_terms(self, lower_loss_fn: LowerLossFn, *, need_upper: bool = True) -> LowerPassResult:
        """Uᵀ∇g, Pᵀ H S_Q z and ∂_λ⟨∇_θ g, S_Q z⟩ on one lower batch, at the current iterates."""
        direction = SubspaceVector(self.sketch_q, self.sketch_q.reduce(self.z)) if need_upper else None
        return lower_pass(
            lower_loss_fn,
            self.upper.logits,
            self.params,
            self.sketch_p,
            direction=direction,
            with_cross=need_upper,
            lower_sketch=self.sketch_u,
            mode=self.hparams.hessian_mode,
            fd_eps=self.hparams.fd_eps,
            perturber=self.perturber,
        )

    def upper_terms(self, upper_loss_fn: LossFn) -> tuple[Tensor, dict[str, Tensor]]:
        """(f(θ; ζ), Pᵀ∇_θ f(θ; ζ)) on one upper batch."""
        return coordinate_gradient(upper_loss_fn, self.params, self.sketch_p, self.perturber)

    def aux_moments(self, hessian_action: Mapping[str, Tensor]) -> Tensor:
        """(a, b) = (⟨z, u⟩, ‖u‖²_{G⁻¹}) for u = G P Pᵀ H S_Q z, the Hessian part of the auxiliary step (G = diag(γ_n)),
        from ``hessian_action`` = Pᵀ H S_Q z: a = Σ ⟨Pᵀz, Pᵀ H S_Q z⟩, an unbiased estimate of the curvature
        ⟨z, H z⟩ along z, and b = Σ_n γ_n ‖P Pᵀ H S_Q z‖² (r × r Gram matrices; no full-size tensor is formed).
        A float32 [2] tensor, no host synchronisation."""
        if self._z_in_p is None:
            self._z_in_p = self.sketch_p.reduce(self.z)
        device = self.aux_moment_means.device
        names = list(self._z_in_p)
        actions = {name: hessian_action[name].detach() for name in names}
        along = _sum_of_float32_dots([(self._z_in_p[name], actions[name]) for name in names], device)
        gammas = {name: self.aux_step_size(name) for name in names}
        square = self.sketch_p.expanded_norm_sq_sum(actions, gammas).to(device)
        return torch.stack([along, square])

    # -- updates --------------------------------------------------------------------------------
    def aux_step_size(self, name: str) -> float:
        """γ_n: γ · r/n for sketched tensors under ``rank_ratio`` scaling, else γ."""
        gamma = self.hparams.aux_lr
        if self.hparams.aux_step_scaling == "rank_ratio":
            gamma *= self.sketch_p.rank_ratio(name, self.params[name])
        return gamma

    @torch.no_grad()
    def aux_step_factor(self, moments: Tensor) -> Tensor:
        """κ = min(1, c · ā / b̄) ∈ [0, 1], the factor on every γ_n this step (``aux_step_limit`` c; 1 when None).

        The auxiliary step without its ∇f part moves z to z − κ u, u = G P Pᵀ H S_Q z, and in G⁻¹'s norm
        ‖z − κu‖² = ‖z‖² − 2κa + κ²b with (a, b) = :meth:`aux_moments`. In mean square it contracts for
        κ < 2 E[a] / E[b] and most at κ = E[a] / E[b]; beyond, z grows until it sits at z_radius, as when γ is
        too large for the model's curvature or for the variance of the sketched step. ā, b̄ are running means
        (decay ``AUX_MOMENT_DECAY``) of the step's (a, b), mean over micro-batches and processes (b's mean is
        ≥ b of the averaged step: a shorter, safe κ under accumulation). Full space at an eigenvector of H with
        eigenvalue ℓ: ā / b̄ = 1 / (γ ℓ), so c caps γ ℓ at c. κ never lengthens a step, is 1 until z has a
        measured (a, b), and 0 (z held) while the mean curvature along z is not positive. On the device: no
        host synchronisation."""
        limit = self.hparams.aux_step_limit
        means = self.aux_moment_means
        if limit is None:
            return torch.ones((), device=means.device)
        means.lerp_(moments.to(means.device).float(), 1.0 - AUX_MOMENT_DECAY)
        along, square = means.unbind()
        factor = (limit * along / square).clamp(min=0.0, max=1.0)
        return torch.where(square > 0, factor, torch.ones_like(factor))

    @torch.no_grad()
    def update_auxiliary(
        self,
        hessian_action: Mapping[str, Tensor],
        upper_grad: Mapping[str, Tensor],
        factor: Tensor | None = None,
    ) -> None:
        """z ← Π_R(z − κ γ_n P (Pᵀ H Q Qᵀ z − Pᵀ∇f)); all arguments are P-coordinates (empty ``upper_grad``:
        ``hessian_action`` is already the residual); κ = ``factor`` (:meth:`aux_step_factor`; None: 1). Sketched
        tensors are updated in place through ``addmm_`` on a view of z, so no full-size P·residual is formed. A bfloat16
        z (``z_dtype``) is updated in float32 blocks of rows and stochastically rounded back (:func:`stochastic_round`)."""
        if self.hparams.z_dtype is not None:
            self._update_low_precision_z(hessian_action, upper_grad, factor)
            self._project_z()
            return
        matrices = self.sketch_p.matrices
        scaled: dict[str, Tensor] = {}
        if factor is not None:  # κ on the sketched coordinates ([m, r]: small) in one foreach call
            sketched = [
                (name, coords)
                for terms in (hessian_action, upper_grad)
                for name, coords in terms.items()
                if matrices[name] is not None
            ]
            products = _times_scalar([c for _, c in sketched], factor)
            scaled = {id(c): p for (_, c), p in zip(sketched, products, strict=True)}
        for name, z in self.z.items():
            gamma = self.aux_step_size(name)
            for coords, sign in ((hessian_action[name], -1.0), (upper_grad.get(name), 1.0)):
                if coords is None:
                    continue
                if factor is not None and matrices[name] is None:  # full space: scaled inside, no full-size temporary
                    z.addcmul_(coords.to(z.dtype), factor.to(z.device, z.dtype), value=sign * gamma)
                    continue
                self.sketch_p.add_expanded_(name, z, scaled.get(id(coords), coords), alpha=sign * gamma)
        self._project_z()

    def _project_z(self) -> None:
        """z ← z · min(1, R / ‖z‖) (Π_R), on the device without a host synchronisation. On the CPU, where reading
        the factor costs nothing, a factor of exactly 1 (z inside the ball) skips the multiply: one read and one
        write of z fewer, the same z."""
        radius = self.hparams.z_radius
        if radius is None:
            return
        shrink = (radius / global_norm(self.z)).clamp_(max=1.0)
        if shrink.device.type == "cpu" and float(shrink) == 1.0:
            return
        _times_scalar(list(self.z.values()), shrink, in_place=True)

    def _update_low_precision_z(
        self, hessian_action: Mapping[str, Tensor], upper_grad: Mapping[str, Tensor], factor: Tensor | None
    ) -> None:
        """The step of :meth:`update_auxiliary` on a low-precision z: each tensor, viewed as [m, n], in blocks of
        rows of at most ``Z_UPDATE_BLOCK`` elements: float32 copy, + κ γ_n (± P coordinates), stochastic rounding
        back. Unbiased (E[z'] is the float32 result) and without a full-size float32 temporary."""
        for name, z in self.z.items():
            gamma, matrix = self.aux_step_size(name), self.sketch_p.matrices[name]
            terms = [
                (coords, sign * gamma)
                for coords, sign in ((hessian_action[name], -1.0), (upper_grad.get(name), 1.0))
                if coords is not None
            ]
            flat = z.view(z.shape[0], -1) if z.dim() > 0 else z.view(1, 1)
            rows = max(1, Z_UPDATE_BLOCK // flat.shape[1])
            for start in range(0, flat.shape[0], rows):
                work = flat[start : start + rows].float()
                for coords, alpha in terms:
                    block = coords.reshape(flat.shape[0], -1)[start : start + rows].float()
                    if factor is not None:
                        block = block * factor.to(block.device)
                    if matrix is None:
                        work.add_(block, alpha=alpha)
                    else:
                        work.addmm_(block, matrix.T.to(block.dtype), alpha=alpha)
                flat[start : start + rows] = stochastic_round(work, z.dtype, self.generator)

    def update_upper(self, hypergradient: Tensor) -> bool:
        """h, λ update with D (skipped during the upper warm-up or when D is non-finite)."""
        if self.step_count < self.hparams.upper_warmup_steps:
            return False
        hparams = self.hparams
        return self.upper.update(
            hypergradient, hparams.upper_lr, hparams.ma_weight, rule=hparams.upper_rule, rms_decay=hparams.upper_rms_decay
        )

    @torch.no_grad()
    def apply_coordinates(self, deltas: Mapping[str, Tensor]) -> None:
        """θ ← θ + U Δa for each tensor (the lower update, Δa from any optimizer in U's coordinates), in place."""
        for name, delta in deltas.items():
            self.sketch_u.add_expanded_(name, self.params[name], delta)

    # -- one step: terms, then updates ----------------------------------------------------------
    def compute_terms(self, lower_loss_fn: LowerLossFn, upper_loss_fn: LossFn) -> Terms:
        """All terms of one micro-batch at the current iterates (call :meth:`begin_step` first).

        Whatever a pass returns is held through the passes after it, so the pass with the highest
        peak runs first: the double backward (autograd); with finite differences the upper pass,
        so that no full-size lower gradient (full-space tensors) is held through another pass."""
        if self.hparams.hessian_mode == "autograd":
            lower = self.lower_terms(lower_loss_fn)
            upper_loss, upper_grad = self.upper_terms(upper_loss_fn)
        else:
            upper_loss, upper_grad = self.upper_terms(upper_loss_fn)
            lower = self.lower_terms(lower_loss_fn)
        return Terms(
            lower_loss=lower.loss,
            upper_loss=upper_loss,
            lower_grad=lower.grad,
            hessian_action=lower.hessian_action,
            upper_grad=upper_grad,
            cross=lower.cross,
            aux_moments=self.aux_moments(lower.hessian_action)
            if self.hparams.aux_step_limit is not None
            else torch.zeros(2, device=self.aux_moment_means.device),  # unused without the limit: no Pᵀz pass
        )

    def apply(self, terms: Terms, lower_update: LowerUpdate) -> StepStatistics:
        """The updates of one step from its (accumulated, all-reduced) terms, then the step counter.

        If any term is non-finite the whole step is skipped (z, h, λ unchanged; ``lower_update(None)``);
        otherwise z ← Π_R(z − γ_n P(Pᵀ H S_Q z − Pᵀ∇f)), h and λ with D = −cross, and
        ``lower_update(Uᵀ∇g)``."""
        finite = terms.is_finite()
        hypergradient = -terms.cross
        if finite:
            factor = self.aux_step_factor(terms.aux_moments)
            self.update_auxiliary(terms.hessian_action, terms.upper_grad, factor)
            self.update_upper(hypergradient)
            lower_update(terms.lower_grad)
        else:
            factor = torch.full((), float("nan"), device=self.aux_moment_means.device)
            lower_update(None)
        self.end_step()
        norm = hypergradient.norm() if finite else torch.full((), float("nan"), device=hypergradient.device)
        return StepStatistics(terms.lower_loss, terms.upper_loss, norm, factor, skipped=not finite)

    def sgd(self, lower_lr: float) -> LowerUpdate:
        """The lower update θ ← θ − β S_U ∇g (plain SGD in U's coordinates), for custom loops."""

        def update(grad: dict[str, Tensor] | None) -> None:
            if grad is not None:
                self.apply_coordinates({n: -lower_lr * g for n, g in grad.items()})

        return update

    def step(self, lower_loss_fn: LowerLossFn, upper_loss_fn: LossFn, lower_lr: float) -> StepStatistics:
        """One whole BROS/MA-SOBA step on one batch pair with SGD on the lower level (custom loops).

        z takes the auxiliary residual Pᵀ H S_Q z − Pᵀ∇f in one expansion (:meth:`Terms.accumulation_share`), as
        ``BROSTrainer`` does: P(a − b) and Pa − Pb round differently, and the cross term's finite difference
        divides such round-off by 2δ, so only the same operations give the Trainer's step to the last bit."""
        self.begin_step()
        terms = self.compute_terms(lower_loss_fn, upper_loss_fn).accumulation_share(1.0)
        return self.apply(terms, self.sgd(lower_lr))

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: z, λ/h, sketches, generator, step.

        Tensors are on the CPU. As with ``nn.Module.state_dict``, those already there are the live state, not copies
        (a copy of z is the size of the model: +466 MB at GPT-2 124M while saving), so save or copy the result
        before the next step."""
        return {
            "z": {n: z.detach().cpu() for n, z in self.z.items()},
            "aux_moment_means": self.aux_moment_means.detach().cpu(),
            "upper": self.upper.state_dict(),
            "sketch_p": self.sketch_p.state_dict(),
            "sketch_q": self.sketch_q.state_dict(),
            "sketch_u": self.sketch_u.state_dict(),
            "generator": self.generator.get_state(),
            "step_count": torch.tensor(self.step_count, dtype=torch.int64),
            "hparams": {k: v for k, v in asdict(self.hparams).items() if v is not None},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # A field added after the checkpoint was written counts as its default there (e.g. unsketched = ()).
        defaults = {f.name: f.default for f in fields(BilevelHyperparameters) if f.default is not MISSING}
        saved = {**{k: v for k, v in defaults.items() if v is not None}, **state["hparams"]}
        current = {k: v for k, v in asdict(self.hparams).items() if v is not None}
        differing = {
            k: (saved.get(k), current.get(k))
            for k in set(saved) | set(current)
            if k != "upper_warmup_steps" and saved.get(k) != current.get(k)
        }
        if differing:
            details = ", ".join(
                f"{k}: checkpoint={a!r} vs now={b!r}" for k, (a, b) in sorted(differing.items())
            )
            raise ValueError(
                f"Refusing to resume bilevel state written by a different configuration ({details})."
            )
        missing = set(self.z) ^ set(state["z"])
        if missing:
            raise ValueError(
                f"Bilevel checkpoint does not match the trainable parameters: {sorted(missing)[:5]}."
            )
        for name, z in self.z.items():
            z.copy_(state["z"][name])
        self.aux_moment_means.copy_(state["aux_moment_means"])
        self.upper.load_state_dict(state["upper"])
        names = list(self.params)
        self.sketch_p = Sketch.from_state_dict(names, state["sketch_p"]).to(
            next(iter(self.z.values())).device
        )
        self.sketch_q = Sketch.from_state_dict(names, state["sketch_q"]).to(
            next(iter(self.z.values())).device
        )
        if self.hparams.resample_every == 1:
            self.sketch_u = self.sketch_p.with_identity(self.hparams.lower_full_space)
        else:
            self.sketch_u = Sketch.from_state_dict(names, state["sketch_u"]).to(
                next(iter(self.z.values())).device
            )
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as error:  # e.g. a CPU generator's state for a CUDA generator: another device type
            raise ValueError(
                f"Cannot restore the sketch generator on {self.generator.device} from this checkpoint ({error}): the "
                "sketches are drawn on the parameters' device, so resume on the device type the run was saved on."
            ) from error
        self.step_count = int(state["step_count"])


def make_lower_loss(
    per_example_loss: Callable[[Mapping[str, Tensor]], Tensor],
    upper: UpperVariable,
    keys: Tensor,
) -> LowerLossFn:
    """g(λ, θ) = (1/n) Σ_i c_i(λ) ℓ_i(θ) for the examples with ``keys`` (domain ids or indices).

    ``per_example_loss`` must return one loss per key: any other shape would broadcast against the
    coefficients and weight the wrong examples, so it is an error."""

    def lower_loss(lam: Tensor, params: dict[str, Tensor]) -> Tensor:
        losses = per_example_loss(params)
        if losses.shape != keys.shape:
            raise ValueError(
                f"The per-example loss has shape {tuple(losses.shape)} but the batch has {keys.numel()} examples "
                f"(keys of shape {tuple(keys.shape)}): one loss per example is needed. Padding-free batches "
                "(DataCollatorWithFlattening) hold several examples in one row and need per-segment losses; "
                "otherwise return one loss per example from per_example_loss."
            )
        return (upper.coefficients(keys, lam).to(losses.dtype) * losses).mean()

    return lower_loss
