"""Numerical checks of the math core: sketches, Hessian actions, cross terms, convergence of BROS
and MA-SOBA on a problem with a closed-form solution, and hyper-data cleaning on digits.

Every test fixes its seeds; tolerances are stated next to each assertion together with the value
measured when the test was written (torch 2.13 CPU), so a reader can see the margin.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from bros_hf import (
    BilevelEngine,
    BilevelHyperparameters,
    Sketch,
    UpperVariable,
    cross_term,
    hessian_action,
)
from bros_hf.core.sketch import is_sketched, random_matrix


@pytest.fixture(autouse=True)
def _single_thread():
    """All problems here are tiny: one intra-op thread is fastest, and much faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rel_err(estimate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """‖estimate − reference‖ / ‖reference‖ over all tensors of the dicts."""
    num = math.sqrt(sum(float(((estimate[k] - reference[k]) ** 2).sum()) for k in reference))
    den = math.sqrt(sum(float((reference[k] ** 2).sum()) for k in reference))
    return num / den


# ---------------------------------------------------------------------------------------------
# Sketch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_sketch_is_isotropic_on_average(kind):
    # E[P Pᵀ] = I. n = 16, r = 4, 4000 draws: per-entry Monte-Carlo std ≤ sqrt(2 / (r·M)) ≈ 0.011,
    # tolerance 0.06 (> 5 std; measured max deviation ≈ 0.03).
    n, r, draws = 16, 4, 4000
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(n, n)
    for _ in range(draws):
        p = random_matrix(n, r, gen, kind)
        assert p.shape == (n, r)
        acc += p @ p.T
    mean = acc / draws
    assert (mean - torch.eye(n)).abs().max() < 0.06
    if kind == "rademacher":
        p = random_matrix(n, r, gen, kind)
        assert torch.allclose(p.abs(), torch.full((n, r), 1 / math.sqrt(r)))


def _toy_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "linear.weight": torch.randn(6, 20, generator=gen),  # n = 20 > r: sketched
        "conv.weight": torch.randn(4, 3, 5, 5, generator=gen),  # n = 75 > r: sketched
        "linear.bias": torch.randn(6, generator=gen),  # 1-D: full space
        "norm.weight": torch.randn(20, generator=gen),  # 1-D: full space
        "small.weight": torch.randn(3, 8, generator=gen),  # n = 8 ≤ r: full space
    }


def test_sketch_shapes_and_which_tensors_are_sketched():
    params, rank = _toy_params(), 8
    sketch = Sketch.sample(params, rank, torch.Generator().manual_seed(1))
    sketched = {name for name, p in params.items() if sketch.matrices[name] is not None}
    assert sketched == {"linear.weight", "conv.weight"}
    assert sketched == {name for name, p in params.items() if is_sketched(p, rank)}
    assert sketch.matrices["linear.weight"].shape == (20, rank)
    assert sketch.matrices["conv.weight"].shape == (75, rank)

    coords = sketch.reduce(params)
    assert coords["linear.weight"].shape == (6, rank)
    assert coords["conv.weight"].shape == (4, rank)
    for name in ("linear.bias", "norm.weight", "small.weight"):
        assert coords[name] is params[name]  # full-space tensors pass through untouched
    for name, coord in coords.items():
        assert coord.shape == sketch.coordinate_shape(name, params[name])
    expanded = sketch.expand(coords, params)
    assert {n: t.shape for n, t in expanded.items()} == {n: p.shape for n, p in params.items()}
    assert sketch.rank_ratio("linear.weight", params["linear.weight"]) == rank / 20
    assert sketch.rank_ratio("linear.bias", params["linear.bias"]) == 1.0

    # expand is the adjoint of reduce: ⟨Pᵀx, a⟩ = ⟨x, P a⟩ (float32 round-off, rtol 1e-5).
    gen = torch.Generator().manual_seed(2)
    a = {n: torch.randn(c.shape, generator=gen) for n, c in coords.items()}
    lhs = sum(float((coords[n] * a[n]).sum()) for n in params)
    rhs = sum(float((params[n] * expanded_a).sum()) for n, expanded_a in sketch.expand(a, params).items())
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # S_P = P Pᵀ: project equals expand(reduce(.)) and is the identity off the sketched tensors.
    projected = sketch.project(params)
    for name in ("linear.bias", "norm.weight", "small.weight"):
        assert torch.equal(projected[name], params[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_expanded_in_place_equals_adding_the_expanded_tensor(dtype):
    """θ + α P a through addmm_ on a view (no full-size P a) is θ + α expand(a), for sketched, full-space and
    non-contiguous tensors, in the target's dtype."""
    params, rank = _toy_params(), 8
    params["transposed.weight"] = torch.randn(20, 6).T  # non-contiguous: takes the expanded tensor
    sketch = Sketch.sample(params, rank, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(3)
    for name, p in params.items():
        coords = torch.randn(sketch.coordinate_shape(name, p), generator=gen)
        target = p.to(dtype)
        expected = (p + 0.3 * sketch.expand_one(name, coords, p.shape)).to(dtype)
        before = target.data_ptr()
        sketch.add_expanded_(name, target, coords, alpha=0.3)
        assert target.dtype == dtype and target.data_ptr() == before
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(target, expected, **tolerance)


def test_one_draw_for_all_matrices_is_the_per_tensor_stream():
    """Sketch.sample draws every matrix in one call: the same numbers as one draw per tensor in order."""
    params, rank = _toy_params(), 4
    sketch = Sketch.sample(params, rank, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for name, p in params.items():
        if is_sketched(p, rank):
            torch.testing.assert_close(sketch.matrices[name], random_matrix(p[0].numel(), rank, gen), rtol=0, atol=0)


def test_identity_sketch_is_exact_pass_through():
    params = _toy_params()
    sketch = Sketch.identity(params)
    assert all(m is None for m in sketch.matrices.values())
    for name, tensor in sketch.project(params).items():
        assert torch.equal(tensor, params[name])
    assert sketch.state_dict() == {}


def test_sketch_draws_are_reproducible():
    params = _toy_params()
    first = Sketch.sample(params, 8, torch.Generator().manual_seed(123), "gaussian")
    second = Sketch.sample(params, 8, torch.Generator().manual_seed(123), "gaussian")
    other = Sketch.sample(params, 8, torch.Generator().manual_seed(124), "gaussian")
    for name, matrix in first.matrices.items():
        if matrix is None:
            assert second.matrices[name] is None
            continue
        assert torch.equal(matrix, second.matrices[name])
        assert not torch.equal(matrix, other.matrices[name])
    restored = Sketch.from_state_dict(list(params), first.state_dict())
    for name, matrix in first.matrices.items():
        assert (matrix is None and restored.matrices[name] is None) or torch.equal(
            matrix, restored.matrices[name]
        )
    with pytest.raises(ValueError):
        Sketch.sample(params, 0, torch.Generator())
    with pytest.raises(ValueError):
        random_matrix(4, 2, torch.Generator(), "uniform")


# ---------------------------------------------------------------------------------------------
# Hessian action
# ---------------------------------------------------------------------------------------------
def _mlp_problem(
    seed: int = 0, batch: int = 32, width: int = 32, classes: int = 5, weight_decay: float = 0.1
):
    """Cross-entropy of a tanh MLP 32-32-5 on a random batch plus (wd/2)‖θ‖², and a random v.

    The weight decay adds wd·I to H: a flatter spectrum makes the shared-probe bias
    (∝ tr(H)/r) clearly visible at a rank where the bi-probe mean converges in few draws."""
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(width, width, generator=gen) / math.sqrt(width),
        "b1": 0.1 * torch.randn(width, generator=gen),
        "w2": torch.randn(classes, width, generator=gen) / math.sqrt(width),
        "b2": 0.1 * torch.randn(classes, generator=gen),
    }
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.tanh(x @ p["w1"].T + p["b1"])
        decay = 0.5 * weight_decay * sum(t.pow(2).sum() for t in p.values())
        return F.cross_entropy(hidden @ p["w2"].T + p["b2"], y) + decay

    v = {name: torch.randn(t.shape, generator=gen) for name, t in params.items()}
    return loss, params, v


def test_exact_hessian_action_matches_torch_hvp():
    # probes=0 against torch.autograd.functional.hvp (float32: rtol 1e-5, measured ~1e-7); the
    # finite-difference exact action against autograd (O(ε²) bias + float32 round-off: 1e-3,
    # measured 7.7e-5).
    loss, params, v = _mlp_problem()
    names = list(params)
    _, reference = torch.autograd.functional.hvp(
        lambda *tensors: loss(dict(zip(names, tensors, strict=True))),
        tuple(params.values()),
        tuple(v[n] for n in names),
    )
    reference = dict(zip(names, reference, strict=True))
    exact = hessian_action(loss, params, v, probes=0)
    assert _rel_err(exact, reference) < 1e-5
    exact_fd = hessian_action(loss, params, v, probes=0, mode="finite_difference")
    assert _rel_err(exact_fd, reference) < 1e-3


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_bi_probe_hessian_action_is_unbiased_and_shared_probe_is_not(mode):
    # Rank 16 on 32-wide layers (n/r = 2; biases stay full space), weight decay 0.1. Mean of 1500
    # bi-probe estimates S_P H S_Q v: relative error < 0.1 (measured 0.069 in both modes; the
    # Monte-Carlo error decreases like 1/√draws: 0.086 at 1000, 0.060-0.064 at 2000 draws for
    # generator seeds 1-3). Shared probe S_P H S_P v, 300 draws: biased, relative error > 0.5
    # (measured 0.97-0.98 for seeds 1-3 in both modes; the bias, (H + tr(H) I − 2 diag H)/r,
    # does not average out). Without weight decay and at rank 8, 4000 draws were needed (0.077)
    # for a shared-probe bias of 0.70.
    loss, params, v = _mlp_problem()
    exact = hessian_action(loss, params, v, probes=0)

    def mean_estimate(probes: int, draws: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for _ in range(draws):
            estimate = hessian_action(loss, params, v, probes=probes, rank=16, generator=gen, mode=mode)
            for name in total:
                total[name] += estimate[name]
        return {name: t / draws for name, t in total.items()}

    assert _rel_err(mean_estimate(2, 1500), exact) < 0.1
    assert _rel_err(mean_estimate(1, 300), exact) > 0.5


def test_single_bi_probe_estimate_matches_between_modes():
    # Same generator seed → same sketches: one finite-difference estimate equals the autograd one
    # up to the O(ε²) bias and float32 round-off (rtol 1e-3, measured ~1e-4).
    loss, params, v = _mlp_problem()
    for seed in range(3):
        kwargs = {"probes": 2, "rank": 8}
        auto = hessian_action(loss, params, v, generator=torch.Generator().manual_seed(seed), **kwargs)
        fd = hessian_action(
            loss, params, v, generator=torch.Generator().manual_seed(seed), mode="finite_difference", **kwargs
        )
        assert _rel_err(fd, auto) < 1e-3


# ---------------------------------------------------------------------------------------------
# Cross term
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_term_matches_plain_autograd(dtype):
    # ∂_λ ⟨∇_θ g(λ, θ), v⟩ for sample-weighted cross-entropy (+ a λ-dependent L2 term so every
    # entry of λ matters), against double backward in plain torch.autograd.
    # Tolerances: autograd rtol 1e-5 (float32) / 1e-10 (float64) (measured 0); finite differences
    # with the default fd_eps_cross = 5e-3: 1e-3 (float32, measured 1.1e-5) / 1e-5 (float64, O(ε²)
    # bias only: measured 1.2e-6); in float64 the bias must shrink like ε²: ε = 5e-4 gives less than
    # 1/20 of the ε = 5e-3 error (measured 1/100).
    gen = torch.Generator().manual_seed(0)
    n, d, c = 6, 4, 3
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    lam = torch.randn(n, generator=gen, dtype=dtype)
    params = {
        "w": torch.randn(c, d, generator=gen, dtype=dtype),
        "b": torch.randn(c, generator=gen, dtype=dtype),
    }
    v = {k: torch.randn(p.shape, generator=gen, dtype=dtype) for k, p in params.items()}

    def lower(lam_: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = F.cross_entropy(x @ p["w"].T + p["b"], y, reduction="none")
        return (torch.sigmoid(lam_) * losses).mean() + 0.5 * torch.exp(lam_.mean()) * p["w"].pow(2).sum()

    lam_leaf = lam.clone().requires_grad_(True)
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(lower(lam_leaf, leaves), list(leaves.values()), create_graph=True)
    inner = sum((g * v[k]).sum() for g, k in zip(grads, leaves, strict=True))
    (reference,) = torch.autograd.grad(inner, [lam_leaf])

    tight = 1e-5 if dtype == torch.float32 else 1e-10
    loose = 1e-3 if dtype == torch.float32 else 1e-5
    auto = cross_term(lower, lam, params, v, mode="autograd")
    fd = cross_term(lower, lam, params, v, mode="finite_difference")
    assert auto.shape == lam.shape
    assert float((auto - reference).norm() / reference.norm()) < tight
    fd_err = float((fd - reference).norm() / reference.norm())
    assert fd_err < loose
    if dtype == torch.float64:
        fd_small = cross_term(lower, lam, params, v, mode="finite_difference", fd_eps=2e-4)
        assert float((fd_small - reference).norm() / reference.norm()) < fd_err / 20


# ---------------------------------------------------------------------------------------------
# Convergence on a bilevel problem with a closed form
# ---------------------------------------------------------------------------------------------
class _LogRegularisation(UpperVariable):
    """A single continuous upper variable λ (the log ridge strength); weights() are the logits."""

    def weights(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits if logits is None else logits

    def coefficients(self, keys, logits=None):  # unused: the lower loss reads λ directly
        raise NotImplementedError


class _RidgeProblem:
    """Ridge regression, upper variable λ = log μ:

        g(λ, θ) = (1/2N)‖Xθ − y‖² + (e^λ/2)‖θ‖²,   θ*(λ) = (XᵀX/N + e^λ I)⁻¹ Xᵀy/N
        f(θ)    = (1/2M)‖X_v θ − y_v‖²,             y_v = X_v θ*(λ*), λ* = −1

    The validation targets are produced by the ridge solution at λ*, so F(λ) = f(θ*(λ)) has its
    unique minimum 0 at λ* (θ* is injective in μ), and at the solution ∇f = 0, z* = 0: the
    randomness of the sketches dies out and the iterates converge, not just hover.
    True hypergradient: F'(λ) = −e^λ θ*ᵀ H⁻¹ ∇f(θ*), H = XᵀX/N + e^λ I (float64 closed form).
    θ is a [1, 64] matrix, so BROS with rank 8 sketches it (n = 64 > r).
    """

    lam_star = -1.0

    def __init__(self, dim: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.dim, n, m = dim, 4 * dim, 2 * dim
        theta_true = torch.randn(dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        self.x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        self.y = self.x @ theta_true + torch.randn(n, generator=gen, dtype=torch.float64)
        self.xv = torch.randn(m, dim, generator=gen, dtype=torch.float64)
        self.yv = self.xv @ self.theta_star(self.lam_star)[0]
        self.x32, self.y32, self.xv32, self.yv32 = (t.float() for t in (self.x, self.y, self.xv, self.yv))

    def theta_star(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.x.shape[0]
        hessian = self.x.T @ self.x / n + math.exp(lam) * torch.eye(self.dim, dtype=torch.float64)
        return torch.linalg.solve(hessian, self.x.T @ self.y / n), hessian

    def true_hypergradient(self, lam: float) -> float:
        theta, hessian = self.theta_star(lam)
        grad_f = self.xv.T @ (self.xv @ theta - self.yv) / self.xv.shape[0]
        return float(-math.exp(lam) * theta @ torch.linalg.solve(hessian, grad_f))

    def lower(self, lam: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        theta = p["theta"][0]
        return (
            0.5 * (self.x32 @ theta - self.y32).pow(2).mean() + 0.5 * torch.exp(lam[0]) * theta.pow(2).sum()
        )

    def upper(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * (self.xv32 @ p["theta"][0] - self.yv32).pow(2).mean()


@pytest.mark.parametrize("method", ["masoba", "bros"])
def test_bilevel_ridge_converges_to_closed_form(method):
    # Same step sizes for both methods: β = 0.08 (lower SGD), γ = 0.08 (aux; BROS scales it by
    # r/n = 8/64 on θ), α = 0.3 (upper), ρ = 0.5, full-batch steps from λ₀ = 1 (2000 BROS, 1000 MA-SOBA).
    # Mean-square stability of the sketched aux step needs roughly γ·r/n < 2 λ_min(H) r² / (n tr H²)
    # ≈ 0.013 here: γ = 0.3 diverged, γ = 0.08 converges.
    # Tolerances: |λ − λ*| ≤ 0.05 = 5 % of |λ*| (measured: MA-SOBA 0; BROS ≤ 0.0034 over seeds 0-9);
    # |F'(λ_final)| ≤ 1 % of |F'(λ₀)| = 1.5e-3 (measured: MA-SOBA 0; BROS ≤ 2.4e-4 over seeds 0-9).
    problem = _RidgeProblem()
    lam0 = 1.0
    upper = _LogRegularisation(1, init_logit=lam0)
    params = {"theta": torch.zeros(1, problem.dim)}
    hparams = BilevelHyperparameters(method=method, rank=8, aux_lr=0.08, upper_lr=0.3, ma_weight=0.5)
    engine = BilevelEngine(params, upper, hparams, seed=0)
    if method == "bros":
        assert engine.sketch_p.matrices["theta"] is not None  # θ is really sketched
        assert engine.aux_step_size("theta") == pytest.approx(0.08 * 8 / 64)
    for _ in range(2000 if method == "bros" else 1000):  # MA-SOBA is exact by step ~400
        stats = engine.step(problem.lower, problem.upper, 0.08)
        assert not stats.skipped
    lam = float(upper.logits[0])
    initial = abs(problem.true_hypergradient(lam0))
    assert initial > 0.1  # the problem is not trivially solved at the start (F'(1) ≈ 0.147)
    assert abs(lam - problem.lam_star) <= 0.05 * abs(problem.lam_star)
    assert abs(problem.true_hypergradient(lam)) <= 0.01 * initial
    # θ tracks θ*(λ): relative error below 1 % (measured < 1e-3).
    theta_star = problem.theta_star(lam)[0].float()
    assert float((params["theta"][0] - theta_star).norm() / theta_star.norm()) < 0.01


def test_engine_step_skips_when_any_term_is_non_finite():
    # f(θ) = Σ sqrt|θ| is finite at θ = 0 but its gradient is not: the step must be skipped (not only
    # when a loss or the lower gradient is non-finite), leaving z, λ, h and θ untouched.
    problem = _RidgeProblem()
    upper = _LogRegularisation(1, init_logit=1.0)
    params = {"theta": torch.zeros(1, problem.dim)}
    engine = BilevelEngine(
        params, upper, BilevelHyperparameters(rank=8, hessian_mode="finite_difference"), seed=0
    )
    stats = engine.step(problem.lower, lambda p: p["theta"].abs().sqrt().sum(), 0.08)
    assert stats.skipped and math.isfinite(stats.upper_loss)
    assert all(bool(torch.isfinite(z).all()) for z in engine.z.values())
    assert float(upper.logits[0]) == 1.0 and not bool(params["theta"].any())


def test_probes_are_fresh_every_step_and_the_lower_subspace_every_T_steps():
    # resample_every = T: P and Q (auxiliary probes) are redrawn at every step, U (lower update)
    # only at steps 0, T, 2T...; with T = 1, U is P itself. Resuming from a state_dict restores U.
    params = {"w": torch.zeros(4, 32)}
    hparams = BilevelHyperparameters(rank=4, resample_every=3)
    engine = BilevelEngine(params, _LogRegularisation(1), hparams, seed=0)
    seen_p, seen_u, changed = [], [], []
    for _ in range(7):
        changed.append(engine.begin_step())
        seen_p.append(engine.sketch_p.matrices["w"].clone())
        seen_u.append(engine.sketch_u.matrices["w"].clone())
        assert not torch.equal(engine.sketch_p.matrices["w"], engine.sketch_q.matrices["w"])
        engine.end_step()
    assert changed == [True, False, False, True, False, False, True]
    assert all(not torch.equal(a, b) for a, b in zip(seen_p, seen_p[1:], strict=False))
    assert [torch.equal(a, b) for a, b in zip(seen_u, seen_u[1:], strict=False)] == [
        True,
        True,
        False,
        True,
        True,
        False,
    ]

    restored = BilevelEngine(params, _LogRegularisation(1), hparams, seed=1)
    restored.load_state_dict(engine.state_dict())
    assert torch.equal(restored.sketch_u.matrices["w"], engine.sketch_u.matrices["w"])
    assert restored.begin_step() == engine.begin_step() is False
    assert torch.equal(restored.sketch_p.matrices["w"], engine.sketch_p.matrices["w"])

    state = engine.state_dict()
    assert all(state["z"][n].data_ptr() == z.data_ptr() for n, z in engine.z.items())  # CPU: no copy of z
    state["generator"] = state["generator"][:8]  # another generator type's state (CPU saved, CUDA resumed)
    with pytest.raises(ValueError, match="resume on the device type the run was saved on"):
        BilevelEngine(params, _LogRegularisation(1), hparams, seed=1).load_state_dict(state)

    every_step = BilevelEngine(params, _LogRegularisation(1), BilevelHyperparameters(rank=4), seed=0)
    assert every_step.begin_step() and every_step.sketch_u is every_step.sketch_p


# ---------------------------------------------------------------------------------------------
# Hyper-data cleaning on digits
# ---------------------------------------------------------------------------------------------
def test_noisy_digits_loader_and_detection_metrics():
    pytest.importorskip("sklearn")
    import numpy as np
    from digits import detection_metrics, load_noisy_digits

    data = load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=3)
    again = load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=3)
    assert np.array_equal(data.y_train, again.y_train) and np.array_equal(data.x_val, again.x_val)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert (data.num_train, len(data.y_val), len(data.y_test)) == (997, 300, 500)
    assert data.is_corrupted.sum() == round(0.4 * data.num_train)  # exactly, and always a different class
    assert np.array_equal(data.is_corrupted, data.y_train != data.y_train_clean)
    assert np.bincount(data.y_val, minlength=10).min() >= 25  # stratified: ~30 per class
    pair = load_noisy_digits(noise_rate=0.2, noise_kind="pair", seed=3)
    flipped = pair.is_corrupted
    assert np.array_equal(pair.y_train[flipped], (pair.y_train_clean[flipped] + 1) % 10)
    clean = load_noisy_digits(noise_rate=0.0, seed=3)
    assert not clean.is_corrupted.any()
    with pytest.raises(ValueError):
        load_noisy_digits(noise_kind="flip")

    corrupted = np.array([True, True, False, False, False])
    perfect = detection_metrics(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), corrupted)
    assert perfect["auroc"] == 1.0 and perfect["f1"] == 1.0
    assert perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    inverted = detection_metrics(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), corrupted)
    assert inverted["auroc"] == 0.0 and inverted["f1"] == 0.0


def test_hyper_cleaning_recipe_smoke(tmp_path):
    pytest.importorskip("sklearn")
    import importlib
    import json

    recipe = importlib.import_module("hyper_cleaning")  # recipes/ is on sys.path (tests/conftest.py)
    recipe.main(
        ["--output_dir", str(tmp_path), "--steps", "30", "--rank", "8", "--hessian_mode", "finite_difference"]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"masoba", "bros"}
    assert {"baseline", "oracle", "data", "args"} <= set(results)
    assert 0.0 <= results["methods"]["bros"]["auroc"] <= 1.0
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temporary file


def test_hyper_cleaning_bros_matches_full_space():
    # 40 % uniform label noise, 997 training / 300 clean validation / 500 test digits, linear
    # softmax model, default HyperCleaningConfig (1500 steps, batch 100, β = 1, wd 1e-3; the package's
    # upper and auxiliary defaults: normalised rule α = 0.25, γ = 0.05 scaled by r/n for BROS and limited by
    # aux_step_limit, ρ = 0.1, no warm-up, ‖z‖ ≤ 5), seed 0, BROS rank 16. Required: AUROC ≥ 0.95 for both and test
    # accuracies within 1.5 points. Measured: seed 0 AUROC MA-SOBA 0.975, BROS 0.974, both 94.2 %; seed 1
    # 0.963 / 0.972, 93.0 % / 93.6 %; plain training on the noisy labels 87.2 % / 82.8 %.
    pytest.importorskip("sklearn")
    from digits import HyperCleaningConfig, load_noisy_digits, run_hyper_cleaning

    data = load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=0)
    assert 0.39 < data.is_corrupted.mean() < 0.41
    results = {
        m: run_hyper_cleaning(data, HyperCleaningConfig(method=m, rank=16, seed=0))
        for m in ("masoba", "bros")
    }
    for result in results.values():
        assert result.skipped_steps == 0
        assert result.auroc >= 0.95
        assert result.test_accuracy >= 0.90
    assert abs(results["masoba"].test_accuracy - results["bros"].test_accuracy) <= 0.015


def test_core_needs_torch_only():
    """bros_hf.core is the method on plain tensors: importing it (and the package's core API) loads no
    transformers or datasets."""
    import subprocess
    import sys

    code = (
        "import sys, bros_hf.core.engine, bros_hf.core.lowrank\n"
        "from bros_hf import BilevelEngine, DomainMixture, lower_pass\n"
        "loaded = [m for m in ('transformers', 'datasets', 'accelerate') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h Wᵀ, y) with a hand-written backward computed without a graph, as fused kernels
    (e.g. Liger's fused linear cross-entropy) do: it has no double backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        ctx.save_for_backward(hidden, weight, labels)
        return torch.nn.functional.cross_entropy(hidden @ weight.T, labels)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels = ctx.saved_tensors
        with torch.no_grad():
            probs = torch.softmax(hidden @ weight.T, dim=-1)
            probs[torch.arange(len(labels)), labels] -= 1
            dlogits = grad * probs / len(labels)
            return dlogits @ weight, dlogits.T @ hidden, None


def test_missing_second_order_graph_is_an_error_not_zeros():
    """Autograd mode: a loss behind an op without double backward would give a zero Hessian action and cross
    term; instead the pass raises and names the fix (finite differences), which then works."""
    torch.manual_seed(0)
    params = {"first": torch.randn(16, 8) * 0.3, "head": torch.randn(3, 16) * 0.3}
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))

    def loss(p):
        return _FusedLinearCrossEntropy.apply(torch.tanh(x @ p["first"].T), p["head"], y)

    vectors = {n: torch.randn_like(p) for n, p in params.items()}
    with pytest.raises(RuntimeError, match=r"second-order graph is missing.*finite_difference"):
        hessian_action(loss, params, vectors, probes=0, mode="autograd")
    hv = hessian_action(loss, params, vectors, probes=0, mode="finite_difference")  # the advertised fix works
    assert float(hv["first"].abs().max()) > 0


def test_auxiliary_residual_gives_the_same_step():
    """Accumulating and all-reducing Pᵀ H S_Q z − Pᵀ∇f instead of both terms changes nothing in the step."""
    from bros_hf.core.engine import BilevelEngine, BilevelHyperparameters, Terms
    from bros_hf.core.upper import DomainMixture

    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(8, 20, generator=generator), "b": torch.randn(8, generator=generator)}

    def engine() -> BilevelEngine:
        hparams = BilevelHyperparameters(rank=4, upper_rule="normalized", upper_lr=0.3)
        return BilevelEngine({n: p.clone() for n, p in params.items()}, DomainMixture(["a", "b"]), hparams, seed=3)

    one, two = engine(), engine()
    coordinates = {n: torch.randn(one.sketch_p.coordinate_shape(n, p), generator=generator) for n, p in params.items()}
    terms = Terms(
        lower_loss=torch.tensor(1.0),
        upper_loss=torch.tensor(2.0),
        lower_grad={n: torch.randn_like(c) for n, c in coordinates.items()},
        hessian_action={n: torch.randn_like(c) for n, c in coordinates.items()},
        upper_grad={n: torch.randn_like(c) for n, c in coordinates.items()},
        cross=torch.tensor([0.3, -0.1]),
        aux_moments=torch.tensor([0.7, 0.2]),
    )
    halves = [terms.accumulation_share(0.5) for _ in range(2)]
    hessian_before = {n: h.clone() for n, h in terms.hessian_action.items()}
    whole = terms.accumulation_share(1.0)
    assert all(whole.lower_grad[n].data_ptr() == terms.lower_grad[n].data_ptr() for n in params)  # not copied
    for name, h in terms.hessian_action.items():  # ... but the residual is a new tensor
        assert torch.equal(h, hessian_before[name])
    three = engine()
    one.apply(terms, one.sgd(0.1))
    two.apply(halves[0] + halves[1], two.sgd(0.1))
    three.apply(halves[0].add_(halves[1]), three.sgd(0.1))
    for engine_ in (two, three):
        for name in params:
            torch.testing.assert_close(one.z[name], engine_.z[name])
            torch.testing.assert_close(one.params[name], engine_.params[name])
        torch.testing.assert_close(one.upper.logits, engine_.upper.logits)


@pytest.mark.parametrize("upper_grad_given", [True, False], ids=["both terms", "residual"])
@pytest.mark.parametrize("radius", [None, 0.5])
def test_auxiliary_step_is_the_formula(upper_grad_given, radius):
    """z ← Π_R(z − κ γ_n P (Pᵀ H S_Q z − Pᵀ∇f)) exactly, with P materialised: a sketched matrix (γ_n = γ r/n) and a
    full-space vector (P = I), the two terms or their residual (as the trainer accumulates it), with and without the
    projection on ‖z‖ ≤ R."""
    from bros_hf.core.engine import BilevelEngine, BilevelHyperparameters

    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(12, 40, generator=generator), "b": torch.randn(12, generator=generator)}
    hparams = BilevelHyperparameters(method="bros", rank=8, aux_lr=0.3, z_radius=radius)
    engine = BilevelEngine(params, _LogRegularisation(1), hparams, seed=0)
    sketch = engine.sketch_p
    assert sketch.matrices["w"] is not None and sketch.matrices["b"] is None
    start = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    action = {n: torch.randn(sketch.coordinate_shape(n, p), generator=generator) for n, p in params.items()}
    grad = {n: torch.randn_like(a) for n, a in action.items()}
    factor = torch.tensor(0.7)
    for name, z in engine.z.items():
        z.copy_(start[name])
    if upper_grad_given:
        engine.update_auxiliary(action, grad, factor)
    else:
        engine.update_auxiliary({n: action[n] - grad[n] for n in params}, {}, factor)

    expected = {}
    for name, p in params.items():
        gamma = 0.3 * (8 / 40 if name == "w" else 1.0)
        step = sketch.expand_one(name, action[name] - grad[name], p.shape)
        if name == "w":
            torch.testing.assert_close(step, (action[name] - grad[name]) @ sketch.matrices["w"].T)
        expected[name] = start[name] - 0.7 * gamma * step
    if radius is not None:
        norm = torch.sqrt(sum(e.pow(2).sum() for e in expected.values()))
        expected = {n: e * min(1.0, radius / float(norm)) for n, e in expected.items()}
        assert float(norm) > radius  # the projection is exercised
    for name in params:
        torch.testing.assert_close(engine.z[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z_dtype", [None, "bfloat16"])
def test_projection_is_the_identity_inside_the_ball_and_lands_on_the_sphere_outside(z_dtype):
    """Π_R: z with ‖z‖ < R is left as it is, not rewritten (on the CPU a factor of exactly 1 skips the multiply:
    z's version counters do not move); z with ‖z‖ > R is scaled onto ‖z‖ = R."""
    from bros_hf.core.engine import BilevelEngine, BilevelHyperparameters

    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(12, 40, generator=generator), "b": torch.randn(12, generator=generator)}
    radius = 2.0
    hparams = BilevelHyperparameters(method="bros", rank=8, aux_lr=0.3, z_radius=radius, z_dtype=z_dtype)
    engine = BilevelEngine(params, _LogRegularisation(1), hparams, seed=0)
    start = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    norm = torch.sqrt(sum(t.pow(2).sum() for t in start.values()))
    for scale in (0.5, 3.0):  # inside, outside
        for name, z in engine.z.items():
            z.copy_(start[name] * (scale * radius / norm))
        before = {n: z.clone() for n, z in engine.z.items()}
        versions = {n: z._version for n, z in engine.z.items()}
        engine._project_z()
        if scale < 1.0:
            assert all(engine.z[n]._version == versions[n] for n in engine.z)
            assert all(torch.equal(engine.z[n], before[n]) for n in engine.z)
        else:
            assert all(engine.z[n]._version > versions[n] for n in engine.z)
            after = torch.sqrt(sum(z.float().pow(2).sum() for z in engine.z.values()))
            assert float(after) == pytest.approx(radius, rel=1e-2 if z_dtype else 1e-6)


# ---------------------------------------------------------------------------------------------
# Auxiliary step limit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["masoba", "bros"])
def test_aux_moments_are_the_materialised_step_and_estimate_the_curvature(method):
    # (a, b) = (⟨z, u⟩, ‖u‖²_{G⁻¹}) for u = G P Pᵀ H S_Q z, against u formed in full (P·coordinates): rtol 1e-5
    # (float32; measured ≤ 1e-6). a is unbiased for the curvature ⟨z, H z⟩ (exact: torch's hvp path with identity
    # sketches): MA-SOBA exactly (rtol 1e-5), BROS at rank 16 on the 32-wide MLP as the mean of 400 draws within
    # 10 % (measured 0.6 %). MA-SOBA's b is γ‖H z‖² exactly.
    loss, params, v = _mlp_problem()
    exact = hessian_action(loss, params, v, probes=0)
    curvature = float(sum((v[n] * exact[n]).sum() for n in params))
    gamma = 0.1
    hparams = BilevelHyperparameters(method=method, rank=16, aux_lr=gamma, aux_step_limit=1.0)
    engine = BilevelEngine({n: p.clone() for n, p in params.items()}, _LogRegularisation(1), hparams, seed=1)
    for name, z in engine.z.items():
        z.copy_(v[name])

    def lower(lam: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss(p) * torch.exp(lam[0] - lam[0].detach())  # the value of loss(p); λ enters the graph

    draws = 1 if method == "masoba" else 400
    total = 0.0
    for _ in range(draws):
        engine.begin_step()
        action = engine.lower_terms(lower).hessian_action
        along, square = engine.aux_moments(action).tolist()
        step = {n: engine.aux_step_size(n) * engine.sketch_p.expand_one(n, action[n], params[n].shape) for n in params}
        materialised_along = float(sum((v[n] * step[n]).sum() / engine.aux_step_size(n) for n in params))
        materialised_square = float(sum(step[n].square().sum() / engine.aux_step_size(n) for n in params))
        assert along == pytest.approx(materialised_along, rel=1e-5)
        assert square == pytest.approx(materialised_square, rel=1e-5)
        total += along
        engine.end_step()
    if method == "masoba":
        assert total == pytest.approx(curvature, rel=1e-5)
        assert square == pytest.approx(gamma * float(sum(exact[n].square().sum() for n in params)), rel=1e-5)
    else:
        assert total / draws == pytest.approx(curvature, rel=0.1)


@pytest.mark.parametrize(("method", "gamma"), [("masoba", 2.0), ("bros", 1.0)])
def test_aux_step_limit_makes_a_diverging_gamma_converge(method, gamma):
    # The ridge problem of test_bilevel_ridge_converges_to_closed_form with an auxiliary step γ too large: for
    # MA-SOBA γ·ℓ_max > 2 (mean divergence), for BROS beyond the mean-square bound of the sketched step (both
    # measured to blow up: |λ| > 40, ‖z‖ from 2e3 to inf). With the package default aux_step_limit = 1 the
    # same runs meet that test's tolerances (|λ − λ*| ≤ 0.05; measured ≤ 4.7e-3 for MA-SOBA at γ = 2 and 10 and
    # BROS at γ = 0.3, 1 and 10), and κ went below 1 (measured minimum 0.13 for MA-SOBA at γ = 2, 0 for BROS at γ = 1).
    problem = _RidgeProblem()
    outcomes = {}
    for limit in (None, 1.0):
        upper = _LogRegularisation(1, init_logit=1.0)
        params = {"theta": torch.zeros(1, problem.dim)}
        hparams = BilevelHyperparameters(
            method=method, rank=8, aux_lr=gamma, upper_lr=0.3, ma_weight=0.5, aux_step_limit=limit
        )
        engine = BilevelEngine(params, upper, hparams, seed=0)
        factors = [float(engine.step(problem.lower, problem.upper, 0.08).aux_step_factor) for _ in range(
            1000 if method == "masoba" else 2000)]
        outcomes[limit] = (float(upper.logits[0]), min(factors))
    diverged_lambda, _ = outcomes[None]
    assert not abs(diverged_lambda - problem.lam_star) <= 1.0  # without the limit: far off (or NaN)
    lam, smallest_factor = outcomes[1.0]
    assert abs(lam - problem.lam_star) <= 0.05 * abs(problem.lam_star)
    assert abs(problem.true_hypergradient(lam)) <= 0.01 * abs(problem.true_hypergradient(1.0))
    assert smallest_factor < 0.5


def test_aux_step_limit_leaves_a_stable_step_and_resumes_exactly():
    # γ small enough that the step stays below the limit (MA-SOBA at γ = 0.08: κ = 1 on every step) gives the same
    # iterates as no limit; the running means are part of the state, so a run resumed from state_dict continues
    # bit-identically where κ < 1 (BROS at γ = 1).
    problem = _RidgeProblem()

    def engine(method: str, gamma: float, limit: float | None) -> BilevelEngine:
        hparams = BilevelHyperparameters(
            method=method, rank=8, aux_lr=gamma, upper_lr=0.3, ma_weight=0.5, aux_step_limit=limit
        )
        return BilevelEngine({"theta": torch.zeros(1, problem.dim)}, _LogRegularisation(1, init_logit=1.0), hparams)

    limited, free = engine("masoba", 0.08, 1.0), engine("masoba", 0.08, None)
    for _ in range(50):
        assert float(limited.step(problem.lower, problem.upper, 0.08).aux_step_factor) == 1.0
        free.step(problem.lower, problem.upper, 0.08)
    assert torch.equal(limited.z["theta"], free.z["theta"]) and torch.equal(limited.params["theta"], free.params["theta"])

    first = engine("bros", 1.0, 1.0)
    factors = [float(first.step(problem.lower, problem.upper, 0.08).aux_step_factor) for _ in range(20)]
    assert min(factors) < 1.0
    resumed = engine("bros", 1.0, 1.0)
    resumed.load_state_dict(first.state_dict())
    resumed.params["theta"].copy_(first.params["theta"])
    for _ in range(10):
        one = first.step(problem.lower, problem.upper, 0.08).aux_step_factor
        two = resumed.step(problem.lower, problem.upper, 0.08).aux_step_factor
        assert torch.equal(one, two)
    assert torch.equal(first.z["theta"], resumed.z["theta"]) and torch.equal(first.upper.logits, resumed.upper.logits)
