"""LowRankPerturber (forward hooks) must give the same derivatives as materialised θ + P a."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel

from bros_hf import DomainMixture, Sketch, lower_pass
from bros_hf.estimators import SubspaceVector
from bros_hf.losses import per_example_losses
from bros_hf.lowrank import LowRankPerturber


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors.values()])


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_hooks_match_materialised_perturbation(mode):
    """GPT-2 has Conv1D, tied Embedding/Linear and full-space norms/biases: all three paths."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (4, 16))
    keys = torch.tensor([0, 1, 0, 1])
    upper = DomainMixture(["A", "B"])

    def lower_loss(lam, p):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids})
        return (upper.coefficients(keys, lam) * per_example_losses(logits, ids)).mean()

    generator = torch.Generator().manual_seed(0)
    sketch_p, sketch_q = Sketch.sample(params, 8, generator), Sketch.sample(params, 8, generator)
    z = {n: torch.randn_like(p) * 0.01 for n, p in params.items()}
    hooks = LowRankPerturber(model)
    assert "transformer.wte.weight" in hooks.modules and len(hooks.modules["transformer.wte.weight"]) == 2
    results = []
    with sdpa_kernel(SDPBackend.MATH):
        for perturber in (None, hooks):
            results.append(
                lower_pass(
                    lower_loss,
                    upper.logits,
                    params,
                    sketch_p,
                    direction=SubspaceVector(sketch_q, sketch_q.reduce(z)),
                    cross_vector=SubspaceVector(sketch_p, sketch_p.reduce(z)),
                    mode=mode,
                    perturber=perturber,
                )
            )
    materialised, hooked = results
    # Same math, different float32 summation order: gradients to 1e-5, FD Hessian action to 1e-3.
    torch.testing.assert_close(flat(hooked.grad), flat(materialised.grad), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        flat(hooked.hessian_action), flat(materialised.hessian_action), rtol=1e-3, atol=1e-5
    )
    torch.testing.assert_close(hooked.cross, materialised.cross, rtol=1e-3, atol=1e-6)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
