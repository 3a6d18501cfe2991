"""z_dtype="bfloat16": z stored in bfloat16, updated in float32 and stochastically rounded back. Unbiased rounding,
the float32 step, the ridge problem's closed-form answer, exact resume through the Trainer, and the config."""

from __future__ import annotations

import pytest
import torch

from bros_hf import BilevelEngine, BilevelHyperparameters, BROSConfig, BROSTrainer
from bros_hf.core import engine as engine_module
from bros_hf.core.engine import stochastic_round
from tests.test_math_core import _LogRegularisation, _RidgeProblem
from tests.test_trainer import make_args, train
from tests.toy import TinyClassifier, three_domain_toy


def test_stochastic_rounding_is_unbiased_and_keeps_small_steps():
    generator = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2**-9, -3.0 - 3 * 2**-8, 1e-3 + 1e-7, 0.0], dtype=torch.float32)
    draws = torch.stack([stochastic_round(x, torch.bfloat16, generator).float() for _ in range(4000)])
    assert set(torch.unique(draws[:, 0]).tolist()) == {1.0, 1.0 + 2**-7}  # only the two neighbours of 1 + 2⁻⁹
    assert torch.all((draws - x).abs() < 2.0 ** (torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7) + 1e-30)
    torch.testing.assert_close(draws.mean(0), x, rtol=2e-4, atol=1e-9)  # E = x (σ/√4000 ≈ 0.4 % of a spacing)
    # 1000 steps of 1e-4 on 1.0: round-to-nearest loses every one (spacing 2⁻⁷ ≈ 7.8e-3), stochastic keeps them.
    nearest, stochastic = torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16)
    for _ in range(1000):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
        stochastic = stochastic_round(stochastic.float() + 1e-4, torch.bfloat16, generator)
    assert float(nearest) == 1.0
    assert float(stochastic) == pytest.approx(1.1, abs=0.02)


@pytest.mark.parametrize("method", ["masoba", "bros"])
def test_one_auxiliary_step_is_the_float32_step_rounded(method, monkeypatch):
    """Same z, same terms: the bfloat16 update is the float32 one up to one bfloat16 spacing, in blocks of rows
    (a tiny block size forces several blocks per tensor)."""
    monkeypatch.setattr(engine_module, "Z_UPDATE_BLOCK", 48)
    params = {"w": torch.randn(12, 40, generator=torch.Generator().manual_seed(1)), "b": torch.randn(12)}
    engines = {}
    for dtype in (None, "bfloat16"):
        hparams = BilevelHyperparameters(method=method, rank=8, aux_lr=0.3, z_radius=None, z_dtype=dtype)
        engines[dtype] = BilevelEngine(params, _LogRegularisation(1), hparams, seed=0)
    start = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for n, p in params.items()}
    sketch = engines[None].sketch_p
    action = {n: torch.randn(sketch.coordinate_shape(n, p), generator=torch.Generator().manual_seed(3))
              for n, p in params.items()}
    grad = {n: torch.randn_like(a) for n, a in action.items()}
    factor = torch.tensor(0.7)
    for engine in engines.values():
        for name, z in engine.z.items():
            z.copy_(start[name].to(z.dtype))
        engine.update_auxiliary(action, grad, factor)
    for name, z in engines[None].z.items():
        low = engines["bfloat16"].z[name]
        assert low.dtype == torch.bfloat16
        spacing = 2.0 ** (torch.floor(torch.log2(z.abs().clamp_min(1e-30))) - 7)
        assert torch.all((low.float() - z).abs() <= 2 * spacing + 2 * 2.0**-9 * start[name].abs()), name


@pytest.mark.parametrize("method", ["masoba", "bros"])
def test_ridge_problem_reaches_its_closed_form_with_a_bfloat16_z(method):
    """test_math_core's ridge problem (λ* known in closed form) with z in bfloat16: the same tolerances as float32."""
    problem = _RidgeProblem()
    upper = _LogRegularisation(1, init_logit=1.0)
    params = {"theta": torch.zeros(1, problem.dim)}
    hparams = BilevelHyperparameters(method=method, rank=8, aux_lr=0.08, upper_lr=0.3, ma_weight=0.5,
                                     z_dtype="bfloat16")
    engine = BilevelEngine(params, upper, hparams, seed=0)
    for _ in range(2000 if method == "bros" else 1000):
        assert not engine.step(problem.lower, problem.upper, 0.08).skipped
    assert engine.z["theta"].dtype == torch.bfloat16
    lam = float(upper.logits[0])
    assert abs(lam - problem.lam_star) <= 0.05 * abs(problem.lam_star)
    assert abs(problem.true_hypergradient(lam)) <= 0.01 * abs(problem.true_hypergradient(1.0))


def test_trainer_with_bfloat16_z_resumes_exactly(tmp_path):
    """The rounding draws come from the engine's saved generator: a resumed run is the uninterrupted one, bit for bit;
    the checkpoint holds z in bfloat16 (half the bytes), and a float32 run refuses it."""
    toy = three_domain_toy()
    common = dict(max_steps=12, save_strategy="steps", save_steps=6, z_dtype="bfloat16")
    full = train(make_args(tmp_path / "full", **common), *toy)
    assert all(z.dtype == torch.bfloat16 for z in full.engine.z.values())
    checkpoint = tmp_path / "full" / "out" / "checkpoint-6"
    state = torch.load(checkpoint / "bros_state_rank0.pt", weights_only=True)
    assert all(z.dtype == torch.bfloat16 for z in state["engine"]["z"].values())
    resumed = _resume(make_args(tmp_path / "resumed", **common), toy, checkpoint)
    for name, z in full.engine.z.items():
        assert torch.equal(resumed.engine.z[name], z), name
    assert torch.equal(resumed.upper.logits, full.upper.logits)
    with pytest.raises(ValueError, match="z_dtype"):
        _resume(make_args(tmp_path / "fp32", max_steps=12, save_strategy="no"), toy, checkpoint)


def _resume(args, data, checkpoint) -> BROSTrainer:
    trainer = BROSTrainer(model=TinyClassifier(), args=args, train_dataset=data[0], upper_dataset=data[1])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_config_names_the_choices():
    with pytest.raises(ValueError, match="z_dtype must be 'float32' or 'bfloat16'"):
        BROSConfig(output_dir="out", max_steps=10, z_dtype="float16")
    assert BROSConfig(output_dir="out", max_steps=10).bilevel_hyperparameters().z_dtype is None
    assert BROSConfig(output_dir="out", max_steps=10, z_dtype="bfloat16").bilevel_hyperparameters().z_dtype == "bfloat16"


def test_a_transposed_parameter_gets_a_contiguous_bfloat16_z():
    """θ stored transposed (non-contiguous strides): the blockwise update still writes z, as for a contiguous θ."""
    base = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    hparams = BilevelHyperparameters(method="masoba", aux_lr=0.3, z_radius=None, z_dtype="bfloat16")
    engine = BilevelEngine({"w": base.t()}, _LogRegularisation(1), hparams, seed=0)
    assert engine.z["w"].is_contiguous()
    update = torch.randn(12, 40, generator=torch.Generator().manual_seed(2))
    engine.update_auxiliary({"w": torch.zeros(12, 40)}, {"w": update})
    torch.testing.assert_close(engine.z["w"].float(), 0.3 * update, rtol=2**-7, atol=0)
