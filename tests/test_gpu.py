"""On one CUDA device: BROSTrainer steps of a tiny Llama in bf16 mixed precision, and the low-rank hooks'
derivatives against materialised θ + P a in float32.

Marked ``gpu``: the default run leaves them out (``addopts`` in pyproject.toml); ``pytest -m gpu`` (or
``python -m benchmarks.gpu_check``) runs them, and without CUDA every one is skipped with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from bros_hf import BROSConfig, BROSTrainer, DomainMixture, Sketch
from bros_hf.losses import per_example_losses
from bros_hf.modules import model_perturber
from tests.parity import materialised_and_hooked
from tests.test_model_families import FAMILIES, _inputs
from tests.test_trainer_lm import tiny_llama, token_domains

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]


@pytest.mark.parametrize(
    ("method", "mode"),
    [("bros", "autograd"), ("bros", "finite_difference"), ("masoba", "autograd")],
)
def test_tiny_llama_trains_in_bf16_on_cuda(tmp_path, method, mode):
    """A few optimizer steps under bf16 autocast on CUDA: everything the run keeps lives on the GPU, θ stays
    fp32 and finite, z is finite and non-zero (the Hessian-action path ran), λ is finite and moved."""
    train, target = token_domains()
    model = tiny_llama()
    args = BROSConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3,
        subspace_rank=8, bilevel_method=method, hessian_mode=mode, bf16=True, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=target)
    trainer.train()

    assert trainer.state.global_step == 4
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.engine.hparams.hessian_mode == mode
    params = list(model.parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in params), "θ on the GPU, fp32 master weights"
    assert all(torch.isfinite(p).all() for p in params), "θ finite"
    z = trainer.engine.z
    assert z and all(v.is_cuda and torch.isfinite(v).all() for v in z.values()), "z on the GPU and finite"
    assert float(sum(v.float().norm() for v in z.values())) > 0, "z ≠ 0: the Hessian-action path ran"
    logits = trainer.upper.logits
    assert torch.isfinite(logits).all() and float(logits.abs().max()) > 0, "λ finite and updated"
    weights = trainer.mixture_weights()
    assert all(math.isfinite(w) for w in weights.values()) and math.isclose(
        sum(weights.values()), 1.0, abs_tol=1e-5
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooks_match_materialised_perturbation_on_cuda(family):
    """As tests/test_model_families.py::test_hooks_match_materialised_perturbation, on "cuda" in float32
    (TF32 off, math attention for double backward): gradient, Hessian action and cross term through the
    hooks equal those through θ + P a formed in full."""
    device = "cuda"
    torch.manual_seed(0)
    model = FAMILIES[family]().eval().to(device)
    batch = {k: v.to(device) for k, v in _inputs(model, torch.Generator().manual_seed(1)).items()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = torch.tensor([0, 1, 0, 1], device=device)
    upper = DomainMixture(["A", "B"]).to(device)
    upper.logits.copy_(torch.tensor([0.3, -0.3]))
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def lower_loss(lam, p):
        outputs = functional_call(model, p, args=(), kwargs=inputs)
        return (upper.coefficients(keys, lam) * per_example_losses(outputs, batch["labels"])).mean()

    generator = torch.Generator().manual_seed(0)
    sketch_p, sketch_q = Sketch.sample(params, 8, generator), Sketch.sample(params, 8, generator)
    z = {n: (torch.randn(p.shape, generator=generator) * 0.05).to(device) for n, p in params.items()}
    hooks = model_perturber(model)
    assert hooks.modules, "some layers must be hooked, or the comparison is vacuous"
    assert all(m is not None and m.is_cuda for m in sketch_p.matrices.values() if m is not None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        materialised, hooked = materialised_and_hooked(lower_loss, upper.logits, params, sketch_p, sketch_q, z, hooks)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for name in params:
        assert hooked.grad[name].is_cuda, name
        torch.testing.assert_close(hooked.grad[name], materialised.grad[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(
            hooked.hessian_action[name], materialised.hessian_action[name], rtol=1e-3, atol=1e-5, msg=name
        )
    torch.testing.assert_close(hooked.cross, materialised.cross, rtol=1e-3, atol=1e-6)
    assert float(materialised.cross.abs().max()) > 0, "the cross term is not trivially zero"
