"""Gradient, Hessian-action and cross-term estimators in random subspaces.

Pure functions on dicts of named tensors (``torch.func.functional_call`` style): no Trainer,
no module state. Notation (docs/method.md): lower loss g(λ, θ), H = ∇²_θθ g, sketches P (the
auxiliary update's subspace), Q (the second, independent probe) and U (the lower update's subspace).

Everything goes through one primitive, :func:`lower_pass`, which evaluates g at

    θ + U b + P a + t · d,     d = Q w    (a, b: r-dim coordinates; t: a scalar; all zero; U = P by default)

and returns, from derivatives at zero,

    ∂g/∂b           = Uᵀ ∇_θ g                       (lower gradient in coordinates)
    ∂²g/∂a∂t        = Pᵀ H d                         (Hessian action in coordinates)
    ∂²g/∂λ∂t        = ∂_λ ⟨∇_θ g, d⟩                 (cross term along the same direction)

either by double backward restricted to the scalar t (``mode="autograd"``, exact: one second
backward yields both second-order terms) or by central differences of first-order quantities at
θ ± δd (``mode="finite_difference"``: two plain backward passes yield all three terms, no
second-order graph, O(δ²) bias, memory of a plain backward).

BROS uses d = S_Q z for both second-order terms. The paper writes the cross term with S_P z; S_Q z
is unbiased for the same reason (E[Q Qᵀ] = I, Q independent of z, λ, θ), and sharing d is what
lets one pair of passes produce everything.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from bros_hf.core.sketch import Sketch, SketchKind

HessianMode = Literal["autograd", "finite_difference"]
# Relative finite-difference step δ‖d‖ / max(‖θ‖, 1); see _lower_pass_finite_difference for why 2e-3.
DEFAULT_FD_EPS = 2e-3
# In bf16 (autocast or bf16 weights) round-off swamps differences at 2e-3 (Hessian action 33 % off); at 2e-2 it
# is 3-5 % off, and mixtures learned with it matched or beat double backward's (benchmarks/README.md).
DEFAULT_FD_EPS_HALF_PRECISION = 2e-2
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
    """‖x‖₂ over all tensors of a dict, as a float32 scalar on their device (no host synchronisation, and
    no float32 copy of half-precision tensors: torch's ``get_total_norm``, fused per device where it can)."""
    if not tensors:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([t.detach() for t in tensors.values()]).float()


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

    def norm(self) -> Tensor:
        """‖B w‖₂ over all tensors, without forming B w (r×r Gram matrices), as a float32 scalar (no host
        synchronisation)."""
        return self.basis.expanded_norm_sq_sum(self.coords).sqrt()


Shift = tuple[Tensor | float, Sketch, Mapping[str, Tensor]]
# Zero coordinates (B, a) whose only purpose is ∂g/∂a in a first-order pass (never differentiated twice).
Probe = tuple[Sketch, Mapping[str, Tensor]]


class MaterializedPerturber:
    """Evaluate at θ + Σ_j B_j a_j + Σ_k c_k B_k w_k by forming the perturbed tensors (pure, any loss_fn)."""

    @contextmanager
    def __call__(
        self, params: Mapping[str, Tensor], shifts: list[Shift], probes: Sequence[Probe] = ()
    ) -> Iterator[dict[str, Tensor]]:
        shifts = [(1.0, *probe) for probe in probes] + list(shifts)
        out = {}
        for name, p in params.items():
            value = p
            for scale, basis, coords in shifts:
                if name in coords:
                    value = value + (scale * basis.expand_one(name, coords[name], p.shape)).to(p.dtype)
            out[name] = value
        yield out


Perturber = Callable[..., AbstractContextManager[dict[str, Tensor]]]
"""``perturber(params, shifts, probes=())`` → context yielding the perturbed parameter dict.

``params`` are used as given (callers detach θ, or pass leaves they differentiate by); a probe or
shift names only the tensors it perturbs (a tensor absent from its coordinates is left alone)."""


def _zeros_for_unused(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(ref) if g is None else g for g, ref in zip(grads, like, strict=True)]


class _Coordinates:
    """Zero coordinates for several sketches at once, each distinct (tensor, basis) pair once.

    ``leaves[i][name]`` is what ∂g/∂(coordinates of sketch i) is taken with respect to:

    - a sketched tensor (B ∈ R^{n×r}): zero coordinates a ∈ R^{m×r} of θ + B a; sketches holding the
      same matrix object for a tensor (U = P where U is not redrawn) share one leaf;
    - a full-space tensor (B = I): θ itself, detached and made a leaf (``base``), so its gradient
      ∇_θ g comes from the ordinary backward: no zero tensor of θ's size and no θ + a copy.

    ``base`` is θ detached, with those leaves in place; ``probes`` lists each sketched leaf once.
    ``skip[i]``: full-space tensors sketch i does not need this time (no leaf, no gradient).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        sketches: Sequence[Sketch],
        skip: Sequence[Collection[str]] = (),
    ):
        skip = list(skip) + [()] * (len(sketches) - len(skip))
        self.base = {name: p.detach() for name, p in params.items()}
        full = {
            name
            for sketch, skipped in zip(sketches, skip, strict=True)
            for name, matrix in sketch.matrices.items()
            if matrix is None and name not in skipped
        }
        for name in full:
            self.base[name].requires_grad_(True)
        shared: dict[tuple[str, int], Tensor] = {}
        self.leaves: list[dict[str, Tensor]] = []
        self.probes: list[Probe] = []
        for sketch, skipped in zip(sketches, skip, strict=True):
            group, fresh = {}, {}
            for name, p in params.items():
                matrix = sketch.matrices[name]
                if matrix is None:
                    if name not in skipped:
                        group[name] = self.base[name]
                    continue
                key = (name, id(matrix))
                if key not in shared:
                    shared[key] = fresh[name] = torch.zeros(
                        sketch.coordinate_shape(name, p), dtype=p.dtype, device=p.device, requires_grad=True
                    )
                group[name] = shared[key]
            self.leaves.append(group)
            self.probes.append((sketch, fresh))
        self.targets = list({id(t): t for group in self.leaves for t in group.values()}.values())

    def split(self, grads: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Gradients for ``targets`` (in order) → one dict per sketch (shared leaves: the same tensor)."""
        by_leaf = {id(t): g for t, g in zip(self.targets, grads, strict=True)}
        return [{name: by_leaf[id(t)] for name, t in group.items()} for group in self.leaves]


def _probed(sketch_p: Sketch | None, lower_sketch: Sketch | None) -> tuple[list[Sketch], int | None, int | None]:
    """The sketches whose coordinates a pass probes, and the positions of U and P among them:
    none (cross term only), [P] (U is P) or [U, P]."""
    if sketch_p is None:
        return [], None, None
    if lower_sketch is sketch_p:
        return [sketch_p], 0, 0
    return [lower_sketch, sketch_p], 0, 1


def lower_pass(
    lower_loss_fn: LowerLossFn,
    lam: Tensor,
    params: Mapping[str, Tensor],
    sketch_p: Sketch | None,
    *,
    direction: SubspaceVector | None = None,
    with_cross: bool = False,
    lower_sketch: Sketch | None = None,
    mode: HessianMode = "autograd",
    fd_eps: float = DEFAULT_FD_EPS,
    perturber: Perturber | None = None,
) -> LowerPassResult:
    """One lower-batch evaluation: Uᵀ∇g, Pᵀ H d and ∂_λ⟨∇_θ g, d⟩ at (λ, θ).

    Args:
        lower_loss_fn: ``(λ, params) -> g`` scalar.
        lam: upper variables λ (detached inside; a fresh leaf is made when the cross term is needed).
        params: θ, name -> tensor (treated as constants; never modified).
        sketch_p: P, the subspace of the Hessian action; ``None`` skips gradient and Hessian action
            (cross term only).
        direction: d = Q w given as (Q, w) (``None``: neither Hessian action nor cross term).
        with_cross: also return the cross term ∂_λ⟨∇_θ g, d⟩ along the same direction d.
        lower_sketch: U, the subspace of the returned gradient Uᵀ∇g (default: P).
        mode: ``"autograd"`` (double backward in the coordinates) or ``"finite_difference"``.
        fd_eps: relative finite-difference step: θ ± δ d with δ‖d‖ = ``fd_eps`` · max(‖θ‖, 1).
            The Hessian action differences gradients and the cross term differences λ-gradients
            (loss values), so the step trades O(δ²) bias against float32 round-off of both; see
            :func:`_lower_pass_finite_difference` for the measurements behind the default.
        perturber: how θ + Σ c_k B_k w_k reaches ``lower_loss_fn`` (default: materialised tensors;
            :class:`bros_hf.core.lowrank.LowRankPerturber` adds low-rank terms inside the layers instead).
    """
    if with_cross and direction is None:
        raise ValueError("The cross term ∂_λ⟨∇_θ g, d⟩ needs a direction d.")
    if sketch_p is None and direction is None:
        raise ValueError("Nothing to compute: pass a sketch P (gradient) and/or a direction d.")
    if lower_sketch is not None and sketch_p is None:
        raise ValueError("A lower sketch U needs the sketch P as well.")
    lower_sketch = lower_sketch or sketch_p
    perturber = perturber or MaterializedPerturber()
    if mode == "autograd":
        return _lower_pass_autograd(
            lower_loss_fn, lam, params, sketch_p, lower_sketch, direction, with_cross, perturber
        )
    if mode == "finite_difference":
        return _lower_pass_finite_difference(
            lower_loss_fn, lam, params, sketch_p, lower_sketch, direction, with_cross, fd_eps, perturber
        )
    raise ValueError(f"Unknown Hessian-action mode {mode!r}: use 'autograd' or 'finite_difference'.")


def _second_derivatives(
    dg_dt: Tensor | None,
    targets: list[Tensor],
    names: list[str],
    first: Sequence[Tensor | None],
    first_targets: list[Tensor],
) -> list[Tensor]:
    """∂(∂g/∂t)/∂x for each target x, refusing to return zeros where the graph is missing.

    A first-order gradient without a graph for its own derivative means an operation on the path has
    no double backward (fused or flash attention, fused norms, custom kernels): the second-order terms
    would silently be zero. That is an error naming the tensors; a tensor the loss never used is 0."""
    fix = (
        "Some operation in the model's forward has no double backward (e.g. flash/efficient attention, fused "
        "norm or loss kernels). Use hessian_mode='finite_difference' (first-order passes only), or eager / "
        "SDPA-math attention (attn_implementation='eager')."
    )
    if dg_dt is None or not dg_dt.requires_grad:
        raise RuntimeError(f"The second-order graph is missing: ∂g/∂t has no graph to differentiate. {fix}")
    second = torch.autograd.grad(dg_dt, targets, allow_unused=True)
    used = {id(x) for x, g in zip(first_targets, first, strict=True) if g is not None}
    missing = [n for n, x, g in zip(names, targets, second, strict=False) if g is None and id(x) in used]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RuntimeError(f"The second-order graph is missing for {shown} (their gradient has none). {fix}")
    return _zeros_for_unused(second, targets)


def _lower_pass_autograd(
    lower_loss_fn, lam, params, sketch_p, lower_sketch, direction, with_cross, perturber
) -> LowerPassResult:
    """g at θ + U b + P a + t d; ∂g/∂b, then one backward of ∂g/∂t (with graph) to (a, λ)."""
    sketches, lower_index, p_index = _probed(sketch_p, lower_sketch)
    coords = _Coordinates(params, sketches)
    t = torch.zeros((), requires_grad=True) if direction is not None else None
    lam_leaf = lam.detach().clone().requires_grad_(with_cross)
    shifts: list[Shift] = [(1.0, *probe) for probe in coords.probes]
    if t is not None:
        shifts.append((t, *direction))

    # Every backward runs inside the perturber's context: activation checkpointing recomputes the forward
    # during backward, and that recomputation must see the same perturbation (the hooks) as the forward.
    with perturber(coords.base, shifts) as perturbed:
        loss = lower_loss_fn(lam_leaf, perturbed)
        flat = coords.targets
        scalars = [t] if t is not None else []
        first = torch.autograd.grad(loss, flat + scalars, create_graph=t is not None, allow_unused=True)
        grads = coords.split([g.detach() for g in _zeros_for_unused(first[: len(flat)], flat)])

        hessian_action = cross = None
        if t is not None:
            # ∂²g/∂t∂a = Pᵀ H d and ∂²g/∂t∂λ = ∂_λ⟨∇_θ g, d⟩ from the same second backward.
            p_coords = coords.leaves[p_index] if p_index is not None else {}
            targets = list(p_coords.values()) + ([lam_leaf] if with_cross else [])
            second = _second_derivatives(first[-1], targets, list(p_coords), first[: len(flat)], flat)
            if p_coords:
                hessian_action = {n: h.detach() for n, h in zip(p_coords, second, strict=False)}
            if with_cross:
                cross = second[-1].detach()
    return LowerPassResult(
        loss=loss.detach(),
        grad=None if lower_index is None else grads[lower_index],
        hessian_action=hessian_action,
        cross=cross,
    )


def _first_order(
    lower_loss_fn,
    lam,
    params,
    sketches: list[Sketch],
    shifts,
    perturber,
    rng: _CommonRandomNumbers | None,
    with_lambda: bool,
    skip: Sequence[Collection[str]] = (),
) -> tuple[Tensor, list[dict[str, Tensor]], Tensor | None]:
    """(g, [Bᵀ∇_θ g for each sketch B], ∇_λ g) at θ + Σ shifts with one plain backward (θ is a constant).

    ``rng``: the RNG state to replay first, so passes that are differenced see the same dropout masks.
    ``skip``: per sketch, full-space tensors whose gradient is not needed (see :class:`_Coordinates`)."""
    if rng is not None:
        rng.replay()
    coords = _Coordinates(params, sketches, skip)
    lam_leaf = lam.detach().clone().requires_grad_(with_lambda)
    targets = coords.targets + ([lam_leaf] if with_lambda else [])
    with perturber(coords.base, list(shifts), probes=coords.probes) as perturbed:  # backward inside: see above
        loss = lower_loss_fn(lam_leaf, perturbed)
        if targets and loss.requires_grad:
            grads = _zeros_for_unused(torch.autograd.grad(loss, targets, allow_unused=True), targets)
        else:
            grads = [torch.zeros_like(x) for x in targets]
    coord_grads = coords.split(grads[: len(coords.targets)])
    return loss.detach(), coord_grads, grads[-1] if with_lambda else None


def _one_sided(sketches: list[Sketch], lower_index: int | None, p_index: int | None) -> set[str]:
    """Tensors whose lower gradient comes from the θ − δd pass alone: U = I but P sketched (by default the
    embeddings). Their gradient is only needed for the lower step, where the O(δ) bias ∇g(θ − δd) − ∇g(θ) = −δ H d
    (7.8e-3 relative at the default eps, ``python -m benchmarks.fd_accuracy``) is far below minibatch noise, while a gradient from
    both passes would cost the weight-gradient products of one more pass and hold a weight-size buffer through
    the second pass (the last pass makes it, so none is held during another one)."""
    if lower_index is None or p_index is None or lower_index == p_index:
        return set()
    lower, aux = sketches[lower_index].matrices, sketches[p_index].matrices
    return {n for n, m in lower.items() if m is None and aux[n] is not None}


def _lower_pass_finite_difference(
    lower_loss_fn, lam, params, sketch_p, lower_sketch, direction, with_cross, fd_eps, perturber
) -> LowerPassResult:
    """Two gradient passes at θ ± δ d give all three terms (central differences, O(δ²) bias):

        Uᵀ∇g       ≈ [Uᵀ∇g(θ + δd) + Uᵀ∇g(θ − δd)] / 2     (∇g(θ − δd) alone where U = I ≠ P: _one_sided)
        Pᵀ H d     ≈ [Pᵀ∇g(θ + δd) − Pᵀ∇g(θ − δd)] / 2δ
        ∂_λ⟨∇g, d⟩ ≈ [∇_λ g(θ + δd) − ∇_λ g(θ − δd)] / 2δ

    Both passes replay the same RNG state (dropout masks), so the differences see θ only. Without
    a direction (or with d = 0) it is one plain gradient pass at θ.

    Step size: a common ``fd_eps`` = 2e-3 (δ‖d‖ relative to max(‖θ‖, 1)). Measured in float32
    against double backward on a 2-layer Llama (``python -m benchmarks.fd_accuracy``; the default is
    also checked in tests/test_lowrank.py): the gradient and Hessian action errors grow like eps²
    (≈1e-4 relative at 2e-3, 2e-3 at 1e-2); the cross term, which differences loss values, is
    dominated by round-off below 1e-3 (7e-2 at 2e-4, 1e-3-7e-3 at 2e-3).
    """
    rng = _CommonRandomNumbers()
    sketches, lower_index, p_index = _probed(sketch_p, lower_sketch)
    norm, theta_norm = 0.0, 1.0
    if direction is not None:  # one host synchronisation for both norms
        direction_norm = direction.norm()
        norm, theta_norm = torch.stack([direction_norm, global_norm(params).to(direction_norm.device)]).tolist()
    if norm == 0.0:
        with torch.set_grad_enabled(bool(sketches)):
            loss, grads, _ = _first_order(lower_loss_fn, lam, params, sketches, [], perturber, rng, False)
        hessian_action = None
        if direction is not None and p_index is not None:
            hessian_action = {n: torch.zeros_like(g) for n, g in grads[p_index].items()}
        cross = torch.zeros_like(lam, dtype=torch.float32) if with_cross else None
        grad = None if lower_index is None else grads[lower_index]
        return LowerPassResult(loss=loss, grad=grad, hessian_action=hessian_action, cross=cross)

    delta = fd_eps * max(theta_norm, 1.0) / norm
    skip = [
        _one_sided(sketches, lower_index, p_index) if i == lower_index else () for i in range(len(sketches))
    ]
    plus, minus = (
        _first_order(
            lower_loss_fn,
            lam,
            params,
            sketches,
            [(sign * delta, *direction)],
            perturber,
            rng,
            with_cross,
            pass_skip,
        )
        for sign, pass_skip in ((1.0, skip), (-1.0, ()))
    )
    (loss_p, grads_p, lam_p), (loss_m, grads_m, lam_m) = plus, minus
    grad = hessian_action = None
    # foreach kernels: one call per operation for all tensors (small models: interpreter time per tensor adds up).
    if p_index is not None:
        names = list(grads_p[p_index])
        plus, minus = grads_p[p_index], grads_m[p_index]
        differences = torch._foreach_sub([plus[n] for n in names], [minus[n] for n in names])
        torch._foreach_div_(differences, 2 * delta)
        hessian_action = dict(zip(names, differences, strict=True))
    if lower_index is not None:  # in place, after the difference: no third gradient-sized buffer
        grad, plus_grads = grads_m[lower_index], grads_p[lower_index]
        both = [n for n in grad if n in plus_grads]
        averaged = [grad[n] for n in both]
        torch._foreach_add_(averaged, [plus_grads[n] for n in both])
        torch._foreach_mul_(averaged, 0.5)
    cross = (lam_p - lam_m) / (2 * delta) if with_cross else None
    return LowerPassResult(
        loss=0.5 * (loss_p + loss_m), grad=grad, hessian_action=hessian_action, cross=cross
    )


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
    fd_eps: float = DEFAULT_FD_EPS,
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
    fd_eps: float = DEFAULT_FD_EPS,
) -> Tensor:
    """∂_λ ⟨∇_θ g(λ, θ), v⟩ = ∇²_λθ g · v (in BROS, v = S_Q z).

    ``finite_difference``: [∇_λ g(λ, θ + δv) − ∇_λ g(λ, θ − δv)] / 2δ, δ‖v‖ = fd_eps · max(‖θ‖, 1);
    θ is constant there, so only forward passes and a backward through λ are needed."""
    result = lower_pass(
        lower_loss_fn,
        lam,
        dict(params),
        None,
        direction=SubspaceVector(Sketch.identity(vector), dict(vector)),
        with_cross=True,
        mode=mode,
        fd_eps=fd_eps,
    )
    return result.cross


def coordinate_gradient(
    loss_fn: LossFn, params: Mapping[str, Tensor], sketch_p: Sketch, perturber: Perturber | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """(f(θ), Pᵀ∇_θ f(θ)) with one plain backward through the coordinates a of θ + P a."""
    loss, grads, _ = _first_order(
        lambda _lam, p: loss_fn(p),
        torch.zeros(()),
        dict(params),
        [sketch_p],
        [],
        perturber or MaterializedPerturber(),
        None,
        with_lambda=False,
    )
    return loss, grads[0]
