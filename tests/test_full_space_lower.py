"""Full-space lower updates for chosen tensors (U = I there, P and Q random): estimators, engine,
module-name resolution, config and the Trainer's optimizer variables."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

from bros_hf import BROSConfig, BROSTrainer, DomainMixture, Sketch, lower_pass
from bros_hf.core.engine import BilevelEngine, BilevelHyperparameters
from bros_hf.core.estimators import DEFAULT_FD_EPS, SubspaceVector, _Coordinates, global_norm
from bros_hf.modules import full_space_parameter_names, model_perturber
from tests import test_trainer_lm as lm
from tests.toy import tiny_llama

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# Embedding (input), Linear (output) and an inner Linear in full space; the rest stays sketched.
FULL = {EMBED, HEAD, DOWN}
RANK = 4


def _problem():
    """A float64 1-layer Llama and g(λ, θ) = mean_i 3 softmax(λ)[k_i] ℓ_i(θ), ℓ the causal-LM loss
    computed in float64 (bros_hf.losses casts logits to float32)."""
    model = tiny_llama(vocab=32, hidden=16).double().eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (3, 10), generator=generator)
    keys = torch.tensor([0, 1, 2])
    lam = torch.tensor([0.3, -0.1, -0.2], dtype=torch.float64)

    def lower_loss(lam, params):
        logits = functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(3, -1)
        return (3 * torch.softmax(lam, 0)[keys] * losses.mean(1)).mean()

    return model, lower_loss, lam


def _exact(lower_loss, lam, params, direction):
    """(∇_θ g, H d, ∂_λ⟨∇_θ g, d⟩) by plain double backward in float64."""
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    lam_leaf = lam.detach().clone().requires_grad_(True)
    loss = lower_loss(lam_leaf, theta)
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
    inner = sum((g * direction[n]).sum() for g, n in zip(grads, theta, strict=True))
    second = torch.autograd.grad(inner, [*theta.values(), lam_leaf])
    full_grad = {n: g.detach() for n, g in zip(theta, grads, strict=True)}
    hess_d = dict(zip(theta, second[:-1], strict=True))
    return full_grad, hess_d, second[-1]


def _sketches(params):
    generator = torch.Generator().manual_seed(0)
    sketch_p = Sketch.sample(params, RANK, generator)
    sketch_q = Sketch.sample(params, RANK, generator)
    return sketch_p, sketch_q, sketch_p.with_identity(FULL)


def _full_space_pass(lower_loss, lam, params, sketches, w, mode, perturber=None):
    """``lower_pass`` with U = ``sketches[2]`` (P with FULL in full space) along d = Q w, cross term included."""
    sketch_p, sketch_q, sketch_u = sketches
    return lower_pass(
        lower_loss,
        lam,
        params,
        sketch_p,
        direction=SubspaceVector(sketch_q, w),
        with_cross=True,
        lower_sketch=sketch_u,
        mode=mode,
        perturber=perturber,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Finite differences at the default fd_eps (2e-3): the error is the O(δ²) bias of central
# differences. Measured worst relative error over tensors: gradient 9.0e-4, Hessian action 6.1e-4,
# cross term 1.8e-4, each dropping ~4x when fd_eps halves (O(δ²); LlamaRMSNorm's float32 internals
# floor the cross term at ~5e-5). 3e-3 still fails on any O(1) slip (a doubled or missing term).
FD_RTOL = 3e-3
# Where U = I but P is sketched (FULL here), the finite-difference lower gradient is ∇g(θ − δd) from one
# pass (estimators._one_sided): it must equal that gradient to round-off and ∇g(θ) to O(δ) (measured 1.5e-2
# here, at δ‖d‖ = 2e-3 ‖θ‖).
ONE_SIDED_RTOL = 5e-2


@pytest.mark.parametrize("hooks", [False, True], ids=["materialised", "lowrank"])
@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_lower_pass_full_space_tensors_get_the_exact_gradient(mode, hooks):
    """U = P.with_identity(FULL): grad = ∇_θ g for FULL (and 1-D) tensors, Pᵀ∇g for the others (the
    leaf U and P share is counted once); Hessian action = Pᵀ H S_Q z for every tensor, P random for
    FULL too; cross term = ∂_λ⟨∇g, S_Q z⟩."""
    model, lower_loss, lam = _problem()
    params = {n: p.detach() for n, p in model.named_parameters()}
    sketch_p, sketch_q, sketch_u = _sketches(params)
    assert all(sketch_p.matrices[n] is not None and sketch_u.matrices[n] is None for n in FULL)
    z = {
        n: torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2))
        for n, p in params.items()
    }
    w = sketch_q.reduce(z)
    direction = sketch_q.expand(w, params)
    delta = DEFAULT_FD_EPS * max(float(global_norm(params)), 1.0) / float(global_norm(direction))
    with sdpa_kernel(SDPBackend.MATH):
        full_grad, hess_d, cross = _exact(lower_loss, lam, params, direction)
        shifted = {n: p - delta * direction[n] for n, p in params.items()}
        shifted_grad = _exact(lower_loss, lam, shifted, direction)[0]
        perturber = model_perturber(model) if hooks else None
        result = _full_space_pass(lower_loss, lam, params, (sketch_p, sketch_q, sketch_u), w, mode, perturber)
    assert set(result.grad) == set(result.hessian_action) == set(params)
    for name in params:
        expected_grad = sketch_u.reduce_one(name, full_grad[name])
        expected_hess = sketch_p.reduce_one(name, hess_d[name])
        if name in FULL or params[name].dim() == 1:
            assert result.grad[name].shape == params[name].shape, name
        else:
            assert result.grad[name].shape == (params[name].shape[0], RANK), name
        assert result.hessian_action[name].shape == expected_hess.shape, name
        if mode == "autograd":
            torch.testing.assert_close(result.grad[name], expected_grad, rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(
                result.hessian_action[name], expected_hess, rtol=1e-9, atol=1e-12, msg=name
            )
        elif name in FULL:
            # ∇g(θ − δd) up to LlamaRMSNorm's float32 internals (~3e-9 relative)
            assert _rel(result.grad[name], shifted_grad[name]) < 1e-6, name
            assert _rel(result.grad[name], expected_grad) < ONE_SIDED_RTOL, name
            assert _rel(result.hessian_action[name], expected_hess) < FD_RTOL, name
        else:
            assert _rel(result.grad[name], expected_grad) < FD_RTOL, name
            assert _rel(result.hessian_action[name], expected_hess) < FD_RTOL, name
    if mode == "autograd":
        torch.testing.assert_close(result.cross, cross, rtol=1e-9, atol=1e-12)
    else:
        assert _rel(result.cross, cross) < FD_RTOL


def test_coordinates_full_space_leaf_is_theta_and_shared_matrices_give_one_leaf():
    model = tiny_llama(vocab=32, hidden=16)
    params = dict(model.named_parameters())
    sketch_p, sketch_q, sketch_u = _sketches(params)
    coords = _Coordinates(params, [sketch_u, sketch_p, sketch_q])
    target_ids = [id(t) for t in coords.targets]
    assert len(target_ids) == len(set(target_ids))
    count = {n: len({id(group[n]) for group in coords.leaves}) for n in params}
    assert {id(group[n]) for group in coords.leaves for n in params} == set(target_ids)
    for name, p in params.items():
        u_leaf, p_leaf, q_leaf = (group[name] for group in coords.leaves)
        if name in FULL:
            # θ itself: same storage, a leaf of its own (no zero copy); P and Q keep r-dim zeros.
            assert u_leaf is coords.base[name]
            assert u_leaf.data_ptr() == p.data_ptr() and u_leaf.shape == p.shape
            assert u_leaf.is_leaf and u_leaf.requires_grad and u_leaf is not p
            assert p_leaf.shape == q_leaf.shape == (p.shape[0], RANK) and not p_leaf.any()
            assert p_leaf is not q_leaf and count[name] == 3
        elif p.dim() == 1:
            assert u_leaf is p_leaf is q_leaf is coords.base[name] and count[name] == 1
            assert u_leaf.data_ptr() == p.data_ptr()
        else:
            # U and P hold the same matrix object: one leaf; Q is independent: its own leaf.
            assert sketch_u.matrices[name] is sketch_p.matrices[name]
            assert u_leaf is p_leaf and u_leaf is not q_leaf and count[name] == 2
            assert u_leaf.shape == (p.shape[0], RANK) and not u_leaf.any()
    # Each sketched leaf is perturbed by exactly one probe.
    probed = [id(c) for _, fresh in coords.probes for c in fresh.values()]
    sketched = [id(t) for t in coords.targets if all(t is not b for b in coords.base.values())]
    assert sorted(probed) == sorted(sketched)
    # Sketches equal in value but distinct objects are not merged.
    copy = Sketch({n: None if m is None else m.clone() for n, m in sketch_p.matrices.items()})
    n_sketched = sum(m is not None for m in sketch_p.matrices.values())
    once = len(_Coordinates(params, [sketch_p, sketch_p]).targets)
    assert once == len(_Coordinates(params, [sketch_p]).targets)
    assert len(_Coordinates(params, [sketch_p, copy]).targets) == once + n_sketched


@pytest.mark.parametrize("as_parameters", [True, False], ids=["nn.Parameter", "detached"])
@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_lower_pass_leaves_theta_untouched(mode, as_parameters):
    model, lower_loss, lam = _problem()
    params = (
        dict(model.named_parameters())
        if as_parameters
        else {n: p.detach() for n, p in model.named_parameters()}
    )
    before = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    sketches = _sketches(params)
    w = sketches[1].reduce({n: torch.ones_like(p) for n, p in params.items()})
    with sdpa_kernel(SDPBackend.MATH):
        result = _full_space_pass(lower_loss, lam, params, sketches, w, mode)
    assert all(float(result.grad[n].norm()) > 0 for n in FULL)
    for name, p in params.items():
        assert torch.equal(p, before[name]), name
        assert p.requires_grad == flags[name] and p.grad is None, name


def _engine(resample_every: int, full=(HEAD,), seed: int = 0) -> BilevelEngine:
    params = dict(tiny_llama(vocab=32, hidden=16).named_parameters())
    hparams = BilevelHyperparameters(rank=RANK, resample_every=resample_every, lower_full_space=full)
    return BilevelEngine(params, DomainMixture(["A", "B"]), hparams, seed=seed)


def _check_engine_sketches(engine: BilevelEngine, resample_every: int) -> None:
    assert engine.sketch_u.matrices[HEAD] is None
    assert engine.sketch_p.matrices[HEAD] is not None and engine.sketch_q.matrices[HEAD] is not None
    assert engine.sketch_u.matrices[EMBED] is not None
    if resample_every == 1:
        assert engine.sketch_u.matrices[EMBED] is engine.sketch_p.matrices[EMBED]
    else:
        assert not torch.equal(engine.sketch_u.matrices[EMBED], engine.sketch_p.matrices[EMBED])


@pytest.mark.parametrize("resample_every", [1, 40])
def test_engine_lower_sketch_is_identity_for_full_space_names(resample_every):
    engine = _engine(resample_every)
    assert engine.hparams.lower_full_space == (HEAD,)
    _check_engine_sketches(engine, resample_every)
    for _ in range(45):  # past a redraw of U at step 40
        engine.begin_step()
        _check_engine_sketches(engine, resample_every)
        engine.end_step()
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    buffer.seek(0)
    restored = _engine(resample_every, seed=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    _check_engine_sketches(restored, resample_every)
    for name in (EMBED, Q_PROJ):
        torch.testing.assert_close(
            restored.sketch_u.matrices[name], engine.sketch_u.matrices[name], rtol=0, atol=0
        )
    torch.testing.assert_close(
        restored.sketch_p.matrices[HEAD], engine.sketch_p.matrices[HEAD], rtol=0, atol=0
    )
    # A checkpoint written with other full-space tensors is refused.
    with pytest.raises(ValueError, match="lower_full_space"):
        _engine(resample_every, full=()).load_state_dict(engine.state_dict())


def test_engine_rejects_unknown_full_space_name():
    with pytest.raises(ValueError, match="not_a.weight"):
        _engine(1, full=(HEAD, "not_a.weight"))


def test_engine_full_space_step_moves_theta_by_the_full_gradient():
    """Engine SGD step: ΔW = −β ∇_W g for a full-space tensor (rank > r), −β U Uᵀ∇g for the others."""
    model, lower_loss, lam = _problem()
    params = dict(model.named_parameters())
    hparams = BilevelHyperparameters(rank=RANK, lower_full_space=(HEAD,), hessian_mode="autograd")
    engine = BilevelEngine(params, DomainMixture(["A", "B", "C"]), hparams, seed=0)
    engine.upper.logits.copy_(lam)
    lam = engine.upper.logits.detach()
    before = {n: p.detach().clone() for n, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        engine.begin_step()
        full_grad, _, _ = _exact(lower_loss, lam, params, {n: torch.zeros_like(p) for n, p in params.items()})
        lower = engine.lower_terms(lower_loss, need_upper=False)
        engine.apply_coordinates({n: -0.1 * g for n, g in lower.grad.items()})
    torch.testing.assert_close(params[HEAD] - before[HEAD], -0.1 * full_grad[HEAD], rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(params[HEAD] - before[HEAD]) > RANK
    step = params[EMBED] - before[EMBED]
    torch.testing.assert_close(step, -0.1 * engine.sketch_u.project({EMBED: full_grad[EMBED]})[EMBED])
    assert torch.linalg.matrix_rank(step) <= RANK


def test_full_space_parameter_names_resolves_modules():
    model = tiny_llama(vocab=32, hidden=16, layers=2)
    params = dict(model.named_parameters())
    assert full_space_parameter_names(model, ["embeddings"], params) == [EMBED, HEAD]
    assert full_space_parameter_names(model, ["lm_head"], params) == [HEAD]
    assert full_space_parameter_names(model, ["down_proj"], params) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert full_space_parameter_names(model, ["layers.1.mlp.down_proj", "lm_head"], params) == [
        "model.layers.1.mlp.down_proj.weight",
        HEAD,
    ]
    assert full_space_parameter_names(model, ["embeddings", "lm_head"], params) == [EMBED, HEAD]
    assert full_space_parameter_names(model, ["none"], params) == []
    assert full_space_parameter_names(model, [], params) == []
    assert full_space_parameter_names(model, None, params) == []
    for entry in ("proj", "not_a_module"):  # 'proj' is neither a name nor a dotted suffix
        with pytest.raises(ValueError, match=entry):
            full_space_parameter_names(model, ["lm_head", entry], params)


def test_full_space_parameter_names_tied_gpt2_gives_one_name():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert model.lm_head.weight is model.transformer.wte.weight
    params = dict(model.named_parameters())
    assert full_space_parameter_names(model, ["embeddings"], params) == ["transformer.wte.weight"]
    assert full_space_parameter_names(model, ["lm_head"], params) == ["transformer.wte.weight"]


def test_full_space_parameter_names_skips_frozen_peft_embeddings():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(vocab=32, hidden=16), LoraConfig(target_modules=["q_proj", "v_proj"], r=2)
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert full_space_parameter_names(model, ["embeddings"], trainable) == []
    # The embeddings are found; only their being frozen leaves them out.
    everything = dict(model.named_parameters())
    assert len(full_space_parameter_names(model, ["embeddings"], everything)) == 2
    assert full_space_parameter_names(model, ["q_proj"], trainable) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
    ]


def test_config_lower_full_space_modules(tmp_path):
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert BROSConfig(**common).lower_full_space_modules == ["embeddings"]
    with pytest.raises(ValueError, match="none"):
        BROSConfig(**common, lower_full_space_modules=["none", "lm_head"])
    parser = HfArgumentParser(BROSConfig)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    (parsed,) = parser.parse_args_into_dataclasses(base + ["--lower_full_space_modules", "none"])
    assert parsed.lower_full_space_modules == ["none"]
    (parsed,) = parser.parse_args_into_dataclasses(
        base + ["--lower_full_space_modules", "embeddings", "o_proj"]
    )
    assert parsed.lower_full_space_modules == ["embeddings", "o_proj"]
    (parsed,) = parser.parse_args_into_dataclasses(base)
    assert parsed.lower_full_space_modules == ["embeddings"]


def _train(tmp_path, **overrides) -> tuple[BROSTrainer, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = lm.tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = lm.lm_args(
        tmp_path, max_steps=3, subspace_rank=2, sketch_resample_interval=100, learning_rate=1e-2, **overrides
    )
    train, target = lm.token_domains()
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=target)
    trainer.train()
    after = dict(model.named_parameters())
    return trainer, {n: (after[n] - before[n]).detach() for n in before}, after


def _rank(delta: torch.Tensor) -> int:
    # Singular values relative to the largest, measured: rank-2 updates ≤ 4e-8 beyond the 2nd
    # (float32 round-off); full-space Adam updates ≥ 0.8 for the 3rd-5th. rtol 1e-4 splits them.
    return int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4))


def test_trainer_updates_embeddings_in_full_space(tmp_path):
    trainer, delta, params = _train(tmp_path)
    assert trainer.engine.hparams.lower_full_space == (EMBED, HEAD)
    for name in (EMBED, HEAD):
        assert trainer._coordinates[name] is params[name]
        assert any(p is params[name] for group in trainer.optimizer.param_groups for p in group["params"])
        assert trainer.optimizer.state[params[name]]["exp_avg"].shape == params[name].shape
        assert _rank(delta[name]) > 2, name
        # Adam moves each entry by about lr_t per step (measured max 2.002 lr over the linear
        # schedule's Σ lr_t = 2 lr); θ folded into itself again would move it by ~‖θ‖∞ ≈ 8 lr.
        assert float(delta[name].abs().max()) < 2.5e-2, name
    sketched = [n for n, m in trainer.engine.sketch_u.matrices.items() if m is not None]
    assert Q_PROJ in sketched and EMBED not in sketched and HEAD not in sketched
    for name in sketched:
        assert trainer._coordinates[name] is not params[name]
        assert trainer._coordinates[name].shape == (params[name].shape[0], 2)
        assert not trainer._coordinates[name].any(), "sketched coordinates are folded into θ and zeroed"
        assert 1 <= _rank(delta[name]) <= 2, name


def test_trainer_none_sketches_every_matrix(tmp_path):
    trainer, delta, params = _train(tmp_path, lower_full_space_modules=["none"])
    assert trainer.engine.hparams.lower_full_space == ()
    assert trainer._coordinates[HEAD] is not params[HEAD]
    for name in (EMBED, HEAD, Q_PROJ):
        assert 1 <= _rank(delta[name]) <= 2, name
