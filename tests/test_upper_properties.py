"""Property tests (hypothesis) for the upper-level variables: DomainMixture and SampleWeights.

After any sequence of MA-SOBA updates with finite hypergradients D, learning rates α and moving-
average weights ρ, interleaved with non-finite D (which must be rejected without touching the
state):

- domain mode: weights finite, on the simplex (sum 1 within 1e-5), each ≥ ε/K − 1e-6;
- sample mode: weights finite and strictly inside (0, 1), logits within the documented ±15 bound;
- ``state_dict`` → ``load_state_dict`` round-trips exactly (torch.equal) and the restored object
  continues bit-identically.

Finite inputs are drawn from a wide but bounded range (|D| ≤ 1e6, α ≤ 1e3, at most 25 updates):
near the float32 overflow threshold DomainMixture loses finiteness, see
``test_domain_mixture_survives_overflowing_steps`` (logits are clamped to ±DOMAIN_LOGIT_BOUND before re-centring).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bros_hf.core.upper import SAMPLE_LOGIT_BOUND, DomainMixture, SampleWeights

SETTINGS = settings(max_examples=60, deadline=None)
NON_FINITE = [math.nan, math.inf, -math.inf]


@st.composite
def update_sequences(draw, size: int, max_updates: int = 25):
    """A list of (D, α, ρ, is_finite): D of length ``size``; a non-finite D has ≥ 1 nan/±inf entry."""
    updates = []
    for _ in range(draw(st.integers(0, max_updates))):
        values = draw(
            st.lists(
                st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
                min_size=size,
                max_size=size,
            )
        )
        finite = draw(st.integers(0, 4)) > 0  # about one update in five is poisoned
        if not finite:
            for index in draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True)):
                values[index] = draw(st.sampled_from(NON_FINITE))
        lr = draw(st.floats(0.0, 1e3, allow_nan=False))
        rho = draw(st.floats(1e-3, 1.0, allow_nan=False))
        updates.append((torch.tensor(values, dtype=torch.float32), lr, rho, finite))
    return updates


def _snapshot(upper) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in upper.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _apply_and_check(upper, updates, check) -> None:
    """Apply updates; non-finite D must be rejected with the state untouched; ``check`` after each."""
    for hypergradient, lr, rho, finite in updates:
        before = _snapshot(upper)
        accepted = upper.update(hypergradient, lr=lr, ma_weight=rho)
        assert accepted == finite
        after = _snapshot(upper)
        if finite:
            assert int(after["num_updates"]) == int(before["num_updates"]) + 1
        else:
            _assert_same_state(before, after)
        assert torch.isfinite(upper.logits).all()
        assert torch.isfinite(upper.momentum).all()
        check(upper)


def _round_trip(make, upper, remaining) -> None:
    """state_dict → fresh object → load_state_dict: equal state, then identical continuation."""
    state = upper.state_dict()
    frozen = {k: v.clone() for k, v in state.items()}
    restored = make()
    restored.load_state_dict(state)
    _assert_same_state(upper.state_dict(), restored.state_dict())
    assert torch.equal(upper.weights(), restored.weights())
    assert torch.equal(upper.average_weights(), restored.average_weights())
    for hypergradient, lr, rho, _ in remaining:
        assert upper.update(hypergradient, lr=lr, ma_weight=rho) == restored.update(
            hypergradient, lr=lr, ma_weight=rho
        )
        _assert_same_state(upper.state_dict(), restored.state_dict())
    # state_dict returned copies: the updates above did not leak into it.
    _assert_same_state(frozen, state)


# ---------------------------------------------------------------------------------------------
# Domain mode
# ---------------------------------------------------------------------------------------------
@st.composite
def domain_cases(draw):
    k = draw(st.integers(1, 6))
    floor = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5, allow_nan=False)))
    updates = draw(update_sequences(k))
    split = draw(st.integers(0, len(updates)))
    return k, floor, updates, split


@SETTINGS
@given(domain_cases())
def test_domain_mixture_stays_on_simplex_and_round_trips(case):
    k, floor, updates, split = case
    names = [f"d{i}" for i in range(k)]

    def make() -> DomainMixture:
        return DomainMixture(names, floor=floor)

    def check(mixture: DomainMixture) -> None:
        for weights in (mixture.weights(), mixture.average_weights()):
            assert weights.shape == (k,)
            assert torch.isfinite(weights).all()
            assert abs(float(weights.double().sum()) - 1.0) <= 1e-5
            assert float(weights.min()) >= floor / k - 1e-6
        # Coefficients are K·w_d (the uniform mixture gives coefficient 1).
        assert torch.allclose(mixture.coefficients(torch.arange(k)), k * mixture.weights())
        # Logits stay centred (softmax is shift-invariant), up to float32 round-off of the mean.
        scale = max(1.0, float(mixture.logits.abs().max()))
        assert abs(float(mixture.logits.double().mean())) <= 1e-5 * scale

    mixture = make()
    check(mixture)
    _apply_and_check(mixture, updates[:split], check)
    _round_trip(make, mixture, updates[split:])
    _apply_and_check(mixture, [], check)
    assert set(mixture.as_dict()) == set(names)
    # The exported mixtures sum to 1 in float64 (numpy's sampling, behind interleave_datasets, needs 1e-8).
    for exported in (mixture.as_dict(), mixture.as_dict(mixture.average_weights())):
        assert abs(math.fsum(exported.values()) - 1.0) <= 1e-12


# ---------------------------------------------------------------------------------------------
# Sample mode
# ---------------------------------------------------------------------------------------------
@st.composite
def sample_cases(draw):
    n = draw(st.integers(1, 12))
    init = draw(st.floats(-SAMPLE_LOGIT_BOUND, SAMPLE_LOGIT_BOUND, allow_nan=False))
    updates = draw(update_sequences(n))
    split = draw(st.integers(0, len(updates)))
    keys = torch.tensor(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)), dtype=torch.int64)
    return n, init, updates, split, keys


@SETTINGS
@given(sample_cases())
def test_sample_weights_stay_in_open_unit_interval_and_round_trip(case):
    n, init, updates, split, keys = case

    def make() -> SampleWeights:
        return SampleWeights(n, init_logit=init)

    def check(sample: SampleWeights) -> None:
        assert float(sample.logits.abs().max()) <= SAMPLE_LOGIT_BOUND
        for weights in (sample.weights(), sample.average_weights()):
            assert weights.shape == (n,)
            assert torch.isfinite(weights).all()
            assert bool((weights > 0).all()) and bool((weights < 1).all())
        coefficients = sample.coefficients(keys)
        assert torch.equal(coefficients, sample.weights()[keys])

    sample = make()
    check(sample)
    _apply_and_check(sample, updates[:split], check)
    _round_trip(make, sample, updates[split:])


# ---------------------------------------------------------------------------------------------
# Deterministic edge cases
# ---------------------------------------------------------------------------------------------
def test_load_state_dict_rejects_a_different_size():
    source = SampleWeights(5)
    with pytest.raises(ValueError, match="5 variables"):
        SampleWeights(4).load_state_dict(source.state_dict())
    with pytest.raises(ValueError):
        DomainMixture(["a", "b"]).load_state_dict(DomainMixture(["a", "b", "c"]).state_dict())


def test_constructor_validation():
    with pytest.raises(ValueError):
        DomainMixture([])
    with pytest.raises(ValueError):
        DomainMixture(["a", "a"])
    with pytest.raises(ValueError):
        DomainMixture(["a", "b"], floor=1.0)
    with pytest.raises(ValueError):
        SampleWeights(3, init_logit=SAMPLE_LOGIT_BOUND + 1)


def test_domain_mixture_survives_overflowing_steps():
    mixture = DomainMixture(["a", "b", "c"])
    assert mixture.update(torch.tensor([1e30, -1e30, 0.0]), lr=1e10, ma_weight=1.0)
    assert torch.isfinite(mixture.logits).all()
    assert torch.isfinite(mixture.weights()).all()
