"""Gradient, Hessian-action and cross-term estimators in random subspaces.

Pure functions on dicts of named tensors (``torch.func.functional_call`` style): no Trainer,
no module state. Notation (DESIGN.md §1-2): lower loss g(λ, θ), H = ∇²_θθ g, sketches P (the
update subspace) and Q (the second, independent probe).

Everything goes through one primitive, :func:`lower_pass`, which evaluates g at

    θ + P a + t · Q w + s · v          (a: r-dim coordinates; t, s: scalars; all zero)

and returns, from derivatives at zero,

    ∂g/∂a           = Pᵀ ∇_θ g                       (lower gradient in coordinates)
    ∂²g/∂a∂t        = Pᵀ H Q w                       (Hessian action in coordinates)
    ∂²g/∂λ∂s        = ∂_λ ⟨∇_θ g, v⟩                 (cross term)

either by double backward restricted to the scalars/coordinates (``mode="autograd"``, exact) or by
central finite differences of first-order quantities (``mode="finite_difference"``: no second-order
graph, O(ε²) bias, memory of a plain backward; the cross term then needs only forward passes and a
backward through λ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from bros_hf.sketch import Sketch, SketchKind

HessianMode = Literal["autograd", "finite_difference"]
LossFn = Callable[[dict[str, Tensor]], Tensor]
LowerLossFn = Callable[[Tensor, dict[str, Tensor]], Tensor]


@dataclass
class LowerPassResult:
    """What one pass over a lower batch ξ yields (coordinates are in P's subspace)."""

    loss: Tensor
    grad: dict[str, Tensor] | None
    hessian_action: dict[str, Tensor] | None
    cross: Tensor | None


def global_norm(tensors: Mapping[str, Tensor]) -> Tensor:
    """‖x‖₂ over all tensors of a dict, as a float32 scalar."""
    norms = [t.detach().float().norm() for t in tensors.values()]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class _CommonRandomNumbers:
    """Replays the global RNG state before each pass, so stochastic layers (dropout) draw the same
    masks in every pass of a finite difference: g(θ + δd) − g(θ − δd) then differs only through θ."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class SubspaceVector(NamedTuple):
    """A vector B w given by a basis (a :class:`Sketch`, identity for full space) and coordinates w."""

    basis: Sketch
    coords: Mapping[str, Tensor]

    def norm(self) -> float:
        """‖B w‖₂ over all tensors, without forming B w (r×r Gram matrices)."""
        return math.sqrt(sum(self.basis.expanded_norm_sq(n, w) for n, w in self.coords.items()))


Shift = tuple[Tensor | float, Sketch, Mapping[str, Tensor]]


class MaterializedPerturber:
    """Evaluate at θ + Σ_k c_k B_k w_k by forming the perturbed tensors (pure, any loss_fn)."""

    @contextmanager
    def __call__(self, params: Mapping[str, Tensor], shifts: list[Shift]) -> Iterator[dict[str, Tensor]]:
        out = {}
        for name, p in params.items():
            value = p.detach()
            for scale, basis, coords in shifts:
                value = value + scale * basis.expand_one(name, coords[name], p.shape)
            out[name] = value
        yield out


Perturber = Callable[[Mapping[str, Tensor], list[Shift]], AbstractContextManager[dict[str, Tensor]]]


def _zeros_for_unused(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(ref) if g is None else g for g, ref in zip(grads, like, strict=True)]


def lower_pass(
    lower_loss_fn: LowerLossFn,
    lam: Tensor,
    params: Mapping[str, Tensor],
    sketch_p: Sketch | None,
    *,
    direction: SubspaceVector | None = None,
    cross_vector: SubspaceVector | None = None,
    mode: HessianMode = "autograd",
    fd_eps: float = 1e-3,
    fd_eps_cross: float = 5e-3,
    perturber: Perturber | None = None,
) -> LowerPassResult:
    """One lower-batch evaluation: Pᵀ∇g, Pᵀ H d and ∂_λ⟨∇_θ g, v⟩ at (λ, θ).

    Args:
        lower_loss_fn: ``(λ, params) -> g`` scalar.
        lam: upper variables λ (detached inside; a fresh leaf is made when the cross term is needed).
        params: θ, name -> tensor (treated as constants; never modified).
        sketch_p: P; ``None`` skips the gradient and Hessian action (cross term only).
        direction: d = Q w given as (Q, w) (``None``: no Hessian action).
        cross_vector: v for the cross term as (basis, coordinates), typically S_P z = (P, Pᵀz).
        mode: ``"autograd"`` (double backward in the coordinates) or ``"finite_difference"``.
        fd_eps: relative finite-difference step of the Hessian action: θ ± δ d with
            δ‖d‖ = ``fd_eps`` · max(‖θ‖, 1).
        fd_eps_cross: the same for the cross term, which differences loss values rather than
            gradients and so needs a larger step to stay clear of float32 rounding (measured on a
            2-layer GPT-2: relative error 0.02 at 5e-3, 1.0 at 5e-5).
        perturber: how θ + Σ c_k B_k w_k reaches ``lower_loss_fn`` (default: materialised tensors;
            :class:`bros_hf.lowrank.LowRankPerturber` adds low-rank terms inside the layers instead).
    """
    perturber = perturber or MaterializedPerturber()
    if mode == "autograd":
        return _lower_pass_autograd(lower_loss_fn, lam, params, sketch_p, direction, cross_vector, perturber)
    if mode == "finite_difference":
        return _lower_pass_finite_difference(
            lower_loss_fn, lam, params, sketch_p, direction, cross_vector, fd_eps, fd_eps_cross, perturber
        )
    raise ValueError(f"Unknown Hessian-action mode {mode!r}: use 'autograd' or 'finite_difference'.")


def _lower_pass_autograd(
    lower_loss_fn, lam, params, sketch_p, direction, cross_vector, perturber
) -> LowerPassResult:
    coords = sketch_p.zeros_like(params, requires_grad=True) if sketch_p is not None else None
    coord_list = list(coords.values()) if coords is not None else []
    t = torch.zeros((), requires_grad=True) if direction is not None else None
    s = torch.zeros((), requires_grad=True) if cross_vector is not None else None
    lam_leaf = lam.detach().clone().requires_grad_(cross_vector is not None)
    shifts: list[Shift] = []
    if coords is not None:
        shifts.append((1.0, sketch_p, coords))
    if t is not None:
        shifts.append((t, *direction))
    if s is not None:
        shifts.append((s, *cross_vector))

    with perturber(params, shifts) as perturbed:
        loss = lower_loss_fn(lam_leaf, perturbed)
    scalars = [x for x in (t, s) if x is not None]
    second_order = bool(scalars)
    first = torch.autograd.grad(loss, coord_list + scalars, create_graph=second_order, allow_unused=True)
    grads = _zeros_for_unused(first[: len(coord_list)], coord_list)
    first_scalars = list(first[len(coord_list) :])

    hessian_action = None
    cross = None
    if t is not None:
        dg_dt = first_scalars.pop(0)
        if dg_dt is None or not dg_dt.requires_grad or not coord_list:
            hessian_action = {n: torch.zeros_like(c) for n, c in coords.items()} if coords else None
        else:
            hv = torch.autograd.grad(dg_dt, coord_list, retain_graph=s is not None, allow_unused=True)
            hessian_action = dict(zip(coords, _zeros_for_unused(hv, coord_list), strict=True))
    if s is not None:
        dg_ds = first_scalars.pop(0)
        if dg_ds is None or not dg_ds.requires_grad:
            cross = torch.zeros_like(lam_leaf)
        else:
            (cross,) = _zeros_for_unused(torch.autograd.grad(dg_ds, [lam_leaf], allow_unused=True), [lam_leaf])

    grad_dict = {n: g.detach() for n, g in zip(coords, grads, strict=True)} if coords is not None else None
    if hessian_action is not None:
        hessian_action = {n: h.detach() for n, h in hessian_action.items()}
    return LowerPassResult(
        loss=loss.detach(),
        grad=grad_dict,
        hessian_action=hessian_action,
        cross=None if cross is None else cross.detach(),
    )


def _coordinate_gradient(
    lower_loss_fn, lam, params, sketch_p, shifts, perturber, rng: _CommonRandomNumbers | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """g and Pᵀ∇_θ g at θ + Σ shifts (one plain backward)."""
    if rng is not None:
        rng.replay()
    coords = sketch_p.zeros_like(params, requires_grad=True)
    coord_list = list(coords.values())
    with perturber(params, [(1.0, sketch_p, coords), *shifts]) as perturbed:
        loss = lower_loss_fn(lam.detach(), perturbed)
    grads = _zeros_for_unused(torch.autograd.grad(loss, coord_list, allow_unused=True), coord_list)
    return loss.detach(), dict(zip(coords, grads, strict=True))


def _lambda_gradient(lower_loss_fn, lam, params, shifts, perturber, rng: _CommonRandomNumbers) -> Tensor:
    """∇_λ g at θ + Σ shifts; θ is constant, so the backward only runs through λ."""
    rng.replay()
    lam_leaf = lam.detach().clone().requires_grad_(True)
    with perturber(params, shifts) as perturbed:
        loss = lower_loss_fn(lam_leaf, perturbed)
    if not loss.requires_grad:
        return torch.zeros_like(lam_leaf)
    (grad,) = _zeros_for_unused(torch.autograd.grad(loss, [lam_leaf], allow_unused=True), [lam_leaf])
    return grad


def _lower_pass_finite_difference(
    lower_loss_fn, lam, params, sketch_p, direction, cross_vector, fd_eps, fd_eps_cross, perturber
) -> LowerPassResult:
    rng = _CommonRandomNumbers()
    scale = max(float(global_norm(params)), 1.0)
    loss, grads = None, None
    if sketch_p is not None:
        loss, grads = _coordinate_gradient(lower_loss_fn, lam, params, sketch_p, [], perturber, rng)

    hessian_action = None
    if direction is not None and sketch_p is not None:
        norm = direction.norm()
        if norm == 0.0:
            hessian_action = {n: torch.zeros_like(g) for n, g in grads.items()}
        else:
            delta = fd_eps * scale / norm
            _, plus = _coordinate_gradient(
                lower_loss_fn, lam, params, sketch_p, [(delta, *direction)], perturber, rng
            )
            _, minus = _coordinate_gradient(
                lower_loss_fn, lam, params, sketch_p, [(-delta, *direction)], perturber, rng
            )
            hessian_action = {n: (plus[n] - minus[n]) / (2 * delta) for n in plus}

    cross = None
    if cross_vector is not None:
        norm = cross_vector.norm()
        if norm == 0.0:
            cross = torch.zeros_like(lam, dtype=torch.float32)
        else:
            delta = fd_eps_cross * scale / norm
            plus = _lambda_gradient(lower_loss_fn, lam, params, [(delta, *cross_vector)], perturber, rng)
            minus = _lambda_gradient(lower_loss_fn, lam, params, [(-delta, *cross_vector)], perturber, rng)
            cross = (plus - minus) / (2 * delta)
    if loss is None:
        rng.replay()
        with torch.no_grad(), perturber(params, []) as perturbed:
            loss = lower_loss_fn(lam.detach(), perturbed)
    return LowerPassResult(loss=loss.detach(), grad=grads, hessian_action=hessian_action, cross=cross)


def hessian_action(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    vectors: Mapping[str, Tensor],
    *,
    probes: int = 2,
    rank: int = 16,
    generator: torch.Generator | None = None,
    mode: HessianMode = "autograd",
    sketch: SketchKind = "rademacher",
    fd_eps: float = 1e-3,
) -> dict[str, Tensor]:
    """Estimate the Hessian action H v, H = ∇²_θθ loss_fn(θ), returned with ``params``' shapes.

    - ``probes=0``: exact H v (identity sketches).
    - ``probes=1``: S_P H S_P v with one shared sketch. Biased: for Rademacher sketches
      E[S_P H S_P] = H + (H + tr(H) I − 2 diag(H)) / r. Kept for comparison.
    - ``probes=2``: the BROS bi-probe S_P H S_Q v with independent P, Q: E[S_P H S_Q] = H.

    Computed as P (Pᵀ H Q (Qᵀ v)), the mixed derivative of loss_fn(θ + P a + t Q Qᵀ v) in (a, t),
    so only r-dim coordinates and one scalar carry second-order graph (``mode="autograd"``), or as
    P [Pᵀ∇(θ + δ Q Qᵀ v) − Pᵀ∇(θ − δ Q Qᵀ v)] / 2δ (``mode="finite_difference"``, with
    δ‖Q Qᵀ v‖ = ``fd_eps`` · max(‖θ‖, 1)).
    """
    if probes not in (0, 1, 2):
        raise ValueError(f"probes must be 0 (exact), 1 (shared sketch) or 2 (bi-probe), got {probes}.")
    if generator is None and probes > 0:
        raise ValueError("A torch.Generator is required to draw sketches (probes=1 or 2).")
    params = dict(params)
    if probes == 0:
        sketch_p = sketch_q = Sketch.identity(params)
    else:
        sketch_p = Sketch.sample(params, rank, generator, sketch)
        sketch_q = sketch_p if probes == 1 else Sketch.sample(params, rank, generator, sketch)
    direction = SubspaceVector(sketch_q, sketch_q.reduce(dict(vectors)))
    dummy_lambda = torch.zeros(())
    result = lower_pass(
        lambda _lam, p: loss_fn(p),
        dummy_lambda,
        params,
        sketch_p,
        direction=direction,
        mode=mode,
        fd_eps=fd_eps,
    )
    return sketch_p.expand(result.hessian_action, params)


def cross_term(
    lower_loss_fn: LowerLossFn,
    lam: Tensor,
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    *,
    mode: HessianMode = "autograd",
    fd_eps_cross: float = 5e-3,
) -> Tensor:
    """∂_λ ⟨∇_θ g(λ, θ), v⟩ = ∇²_λθ g · v (in BROS, v = S_P z: ∂_λ⟨∇_a g, Pᵀ z⟩).

    ``finite_difference``: [∇_λ g(λ, θ + δv) − ∇_λ g(λ, θ − δv)] / 2δ, δ‖v‖ = fd_eps_cross · max(‖θ‖, 1);
    θ is constant there, so only forward passes and a backward through λ are needed."""
    result = lower_pass(
        lower_loss_fn,
        lam,
        dict(params),
        None,
        cross_vector=SubspaceVector(Sketch.identity(vector), dict(vector)),
        mode=mode,
        fd_eps_cross=fd_eps_cross,
    )
    return result.cross


def coordinate_gradient(
    loss_fn: LossFn, params: Mapping[str, Tensor], sketch_p: Sketch, perturber: Perturber | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """(f(θ), Pᵀ∇_θ f(θ)) with one plain backward through the coordinates a of θ + P a."""
    return _coordinate_gradient(
        lambda _lam, p: loss_fn(p), torch.zeros(()), dict(params), sketch_p, [], perturber or MaterializedPerturber()
    )
