"""LowRankPerturber (forward hooks) must give the same derivatives as materialised θ + P a."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from bros_hf import DomainMixture, Sketch, lower_pass
from bros_hf.core.estimators import SubspaceVector, _CommonRandomNumbers, _first_order
from bros_hf.losses import per_example_losses
from bros_hf.modules import model_perturber
from tests.parity import materialised_and_hooked
from tests.saved_bytes import saved_for_backward_bytes
from tests.toy import tiny_llama


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors.values()])


@pytest.mark.parametrize("separate_lower", [False, True], ids=["U=P", "U!=P"])
@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_hooks_match_materialised_perturbation(mode, separate_lower):
    """GPT-2 has Conv1D, tied Embedding/Linear and full-space norms/biases: all three paths, with the
    lower gradient in P's subspace or in its own U (two probes, fused into one node for Linear)."""
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
    sketch_u = Sketch.sample(params, 8, generator) if separate_lower else None
    z = {n: torch.randn_like(p) * 0.01 for n, p in params.items()}
    hooks = model_perturber(model)
    assert "transformer.wte.weight" in hooks.modules and len(hooks.modules["transformer.wte.weight"]) == 2
    materialised, hooked = materialised_and_hooked(
        lower_loss, upper.logits, params, sketch_p, sketch_q, z, hooks, mode=mode, lower_sketch=sketch_u
    )
    # Same math, different float32 summation order: gradients to 1e-5 (FD: the mean of the ±δ
    # passes, 1e-4), FD Hessian action to 1e-3; the FD cross term differences loss values, so the
    # round-off of the two summation orders is amplified by 1/δ: 5e-3 (measured 1.3e-3).
    grad_rtol = 1e-5 if mode == "autograd" else 1e-4
    torch.testing.assert_close(flat(hooked.grad), flat(materialised.grad), rtol=grad_rtol, atol=1e-7)
    torch.testing.assert_close(
        flat(hooked.hessian_action), flat(materialised.hessian_action), rtol=1e-3, atol=1e-5
    )
    torch.testing.assert_close(hooked.cross, materialised.cross, rtol=5e-3, atol=1e-6)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


@pytest.mark.parametrize("rank", [16, None])
def test_finite_difference_pass_matches_double_backward(rank):
    """The two ±δd passes give gradient, Hessian action and cross term at once, each close to autograd.

    2-layer Llama (SwiGLU, RMSNorm, rotary), float32, default fd_eps = 2e-3; rank 16 and full space.
    Tolerances: gradient and Hessian action 1e-3 (measured ≤ 1.5e-4: the O(δ²) bias), cross term
    2e-2 (measured 0.9e-3-2.1e-3; it differences loss values, so float32 round-off / δ dominates).
    """
    model = tiny_llama(vocab=256, hidden=64, layers=2, heads=4, kv_heads=4).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (6, 32))
    keys = torch.tensor([0, 1, 2] * 2)
    upper = DomainMixture(["A", "B", "C"])
    upper.logits.copy_(torch.tensor([0.5, -0.2, -0.3]))

    def lower_loss(lam, p):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids})
        return (upper.coefficients(keys, lam) * per_example_losses(logits, ids)).mean()

    generator = torch.Generator().manual_seed(0)
    if rank is None:
        sketch_p = sketch_q = Sketch.identity(params)
    else:
        sketch_p, sketch_q = Sketch.sample(params, rank, generator), Sketch.sample(params, rank, generator)
    z = {n: torch.randn_like(p) for n, p in params.items()}
    direction = SubspaceVector(sketch_q, sketch_q.reduce(z))
    perturber = model_perturber(model)
    with sdpa_kernel(SDPBackend.MATH):
        exact, fd = (
            lower_pass(
                lower_loss,
                upper.logits,
                params,
                sketch_p,
                direction=direction,
                with_cross=True,
                mode=mode,
                perturber=perturber,
            )
            for mode in ("autograd", "finite_difference")
        )
        assert _relative_error(flat(fd.grad), flat(exact.grad)) < 1e-3
        assert _relative_error(flat(fd.hessian_action), flat(exact.hessian_action)) < 1e-3
        assert _relative_error(fd.cross, exact.cross) < 2e-2
        assert abs(float(fd.loss - exact.loss)) < 1e-4


def test_first_order_pass_saves_no_more_than_a_plain_training_step():
    """A hooked gradient pass (probe coordinates U and P, plus the ±δd shift) keeps the activations of a
    plain forward with trainable weights, not more: the probes save x B ([tokens, r]), never x.

    Llama 2 × 128 (SwiGLU), batch 4 × 64. Measured: plain 5.89 MB, hooked pass 5.57 MB; saving x
    for every probed Linear instead (a first version of the probe) measured 7.29 MB at a slightly
    wider MLP where plain was 6.64 MB.
    """
    model = tiny_llama(vocab=512, hidden=128, layers=2, heads=4, kv_heads=4)
    ids = torch.randint(0, 512, (4, 64))
    params = {n: p.detach() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    sketch_u, sketch_p, sketch_q = (Sketch.sample(params, 16, generator) for _ in range(3))
    z = {n: torch.randn_like(p) for n, p in params.items()}
    upper = DomainMixture(["A", "B"])
    keys = torch.tensor([0, 1, 0, 1])

    def lower_loss(lam, p):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids})
        return (upper.coefficients(keys, lam) * per_example_losses(logits, ids)).mean()

    def plain_step():
        per_example_losses(model(input_ids=ids), ids).mean()

    def hooked_pass():
        shift = [(1e-3, sketch_q, sketch_q.reduce(z))]
        _first_order(
            lower_loss,
            upper.logits,
            params,
            [sketch_u, sketch_p],
            shift,
            model_perturber(model),
            _CommonRandomNumbers(),
            True,
        )

    with sdpa_kernel(SDPBackend.MATH):
        plain = saved_for_backward_bytes(plain_step, params.values())
        hooked = saved_for_backward_bytes(hooked_pass, params.values())
    assert hooked <= plain, (hooked / 2**20, plain / 2**20)


def test_constant_shift_is_added_in_place_into_the_layer_output():
    """First-order passes add c·Δy of the direction inside the layer's own output tensor (no output-sized Δy or
    y + Δy: at a 50k-token vocabulary each is a logits-sized buffer), with the same values and the same
    gradient to x as adding Δy out of place; views and leaves get a new tensor (the first term added out of place,
    no copy of the output first), and an output with nothing to add (the upper pass: probes only) is not copied."""
    from bros_hf.core.lowrank import _LowRankTerms

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 40, bias=False)
    x = torch.randn(3, 5, 12, requires_grad=True)
    basis, coords = torch.randn(12, 4), torch.randn(40, 4)
    probe_basis, probe = torch.randn(12, 4), torch.zeros(40, 4, requires_grad=True)

    output = layer(x)
    pointer = output.data_ptr()
    shifted = _LowRankTerms.apply(output, x, layer, [probe_basis, basis], [0.5 * coords], probe)
    assert shifted.data_ptr() == pointer
    grad_out = torch.randn_like(shifted)
    grad_x, grad_probe = torch.autograd.grad(shifted, (x, probe), grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    probe_ref = torch.zeros(40, 4, requires_grad=True)
    weight = layer.weight.detach() + 0.5 * coords @ basis.T + probe_ref @ probe_basis.T
    reference = torch.nn.functional.linear(x_ref, weight)
    torch.testing.assert_close(shifted.detach(), reference.detach())
    ref_x, ref_probe = torch.autograd.grad(reference, (x_ref, probe_ref), grad_out)
    torch.testing.assert_close(grad_probe, ref_probe)
    # x's gradient through the layer itself (W) is autograd's; the shift's part is the node's.
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-5, atol=1e-5)

    view = layer(x).view(15, 40)
    assert _LowRankTerms.apply(view, x, layer, [basis], [coords]).data_ptr() != view.data_ptr()
    probe_only = _LowRankTerms.apply(view, x, layer, [probe_basis], [], probe)
    assert probe_only.data_ptr() == view.data_ptr() and torch.equal(probe_only, view)
    (grad_probe_only,) = torch.autograd.grad(probe_only, probe, grad_out.view(15, 40))
    torch.testing.assert_close(grad_probe_only, ref_probe)
    # Views (a linear layer with a bias on 3-d input returns one), outputs whose memory is not row-major (a transposed
    # view, a strided tensor of its own), and two shifts: the same values.
    plain_x = x.detach()
    unshifted = plain_x @ layer.weight.detach().T
    expected = unshifted + (plain_x @ basis) @ coords.T
    biased = torch.nn.functional.linear(plain_x, layer.weight.detach(), torch.zeros(40))
    assert biased._is_view()
    transposed = (layer.weight.detach() @ plain_x.transpose(1, 2)).transpose(1, 2)  # a view, not row-major
    strided = torch.empty_strided((3, 5, 40), (1, 3, 15)).copy_(unshifted)  # its own memory, not row-major
    for output in (biased, transposed, strided):
        shifted = _LowRankTerms.apply(output, plain_x, layer, [basis], [coords])
        torch.testing.assert_close(shifted, expected)
        halves = _LowRankTerms.apply(output, plain_x, layer, [basis, basis], [0.5 * coords, 0.5 * coords])
        torch.testing.assert_close(halves, expected)
        assert halves.data_ptr() != output.data_ptr()


def _shifted_layer_pass(layer, x, params, sketch_p, shifts, probe, grad_out):
    """One first-order pass through ``layer`` with constant ``shifts`` and a zero probe P a: (output, name of its
    autograd node, ∂g/∂x, ∂g/∂b, ∂g/∂a)."""
    from bros_hf.core.lowrank import LowRankPerturber

    perturber = LowRankPerturber(layer, transposed_linear=(Conv1D,))
    with perturber(params, shifts, probes=[(sketch_p, {"weight": probe})]):
        output = layer(x)
        grads = torch.autograd.grad(output, (x, params["bias"], probe), grad_out)
    return output.detach(), type(output.grad_fn).__name__, *grads


@pytest.mark.parametrize("in_out", [(12, 6), (6, 12)], ids=["narrowing", "widening"])
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "probe-only"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_shift_in_the_weight_is_the_layer_at_the_shifted_weight(monkeypatch, kind, with_shift, in_out):
    """Where the weight has no more entries than the layer's input (out ≤ tokens) or is small, a float32 first-order
    pass puts the constant shift into the weight (``_ShiftedLayer``) instead of adding c (x B) wᵀ to the output;
    without a shift (the upper pass) the layer and its probe are one node at any size. Output, ∂g/∂x, ∂g/∂b and the
    probe's ∂g/∂a must be those of the layer at W + ½ Q w + P a (materialised, a = 0); with a shift and fewer tokens
    than outputs (the size rule made strict here), under bfloat16 autocast or with a weight that takes a gradient,
    the output terms are used instead."""
    import bros_hf.core.lowrank as lowrank
    from bros_hf.core.lowrank import _fuses_shift_into_weight

    monkeypatch.setattr(lowrank, "SMALL_WEIGHT_ENTRIES", 0)  # these layers are small: test the rule on tokens
    torch.manual_seed(0)
    width_in, width_out = in_out
    layer = torch.nn.Linear(width_in, width_out) if kind == "linear" else Conv1D(width_out, width_in)  # Conv1D(nf, nx)
    weight = layer.weight.detach()
    generator = torch.Generator().manual_seed(0)
    sketch_p, sketch_q = (Sketch.sample({"weight": weight}, 4, generator) for _ in range(2))
    shift = 0.1 * torch.randn(sketch_q.coordinate_shape("weight", weight))
    shifted_weight = weight + 0.5 * sketch_q.expand_one("weight", shift, weight.shape) if with_shift else weight
    shifts = [(0.5, sketch_q, {"weight": shift})] if with_shift else []
    few_tokens_node = "_LowRankTermsBackward" if with_shift else "_ShiftedLayerBackward"

    for tokens, expected_node in ((12, "_ShiftedLayerBackward"), (4, few_tokens_node)):
        x = torch.randn(2, tokens // 2, width_in, requires_grad=True)
        grad_out = torch.randn(2, tokens // 2, width_out)
        params = {"weight": weight, "bias": layer.bias.detach().clone().requires_grad_(True)}
        probe = torch.zeros(sketch_p.coordinate_shape("weight", weight), requires_grad=True)
        output, node, grad_x, grad_bias, grad_probe = _shifted_layer_pass(
            layer, x, params, sketch_p, shifts, probe, grad_out
        )
        assert node == expected_node, (tokens, node)

        x_ref = x.detach().clone().requires_grad_(True)
        bias_ref = layer.bias.detach().clone().requires_grad_(True)
        probe_ref = torch.zeros_like(probe, requires_grad=True)
        weight_ref = shifted_weight + sketch_p.expand_one("weight", probe_ref, weight.shape)
        reference = functional_call(layer, {"weight": weight_ref, "bias": bias_ref}, (x_ref,))
        references = torch.autograd.grad(reference, (x_ref, bias_ref, probe_ref), grad_out)
        torch.testing.assert_close(output, reference.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip((grad_x, grad_bias, grad_probe), references, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(layer) and not layer._forward_hooks, "the pass left its forward or hook behind"

    x = torch.randn(2, 6, width_in)
    layer.weight.requires_grad_(False)  # as in a pass, where the weight installed is θ detached
    assert _fuses_shift_into_weight(layer, x)
    few = torch.randn(2, 2, width_in)
    assert not _fuses_shift_into_weight(layer, few)
    between = torch.randn(2, 4, width_in)  # 8 tokens: more than the widening layer's inputs, fewer than its outputs
    assert _fuses_shift_into_weight(layer, between) == (width_out <= 8), "out > tokens keeps the terms (a head)"
    monkeypatch.setattr(lowrank, "SMALL_WEIGHT_ENTRIES", width_in * width_out)
    assert _fuses_shift_into_weight(layer, few), "a small weight takes the node at any number of tokens"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fuses_shift_into_weight(layer, x), "bfloat16: the weight's rounding would be every token's"
    assert not _fuses_shift_into_weight(layer, x.bfloat16())
    layer.weight.requires_grad_(True)
    assert not _fuses_shift_into_weight(layer, x), "a weight taking a gradient keeps the layer's own node"
