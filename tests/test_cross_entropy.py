"""token_cross_entropy against torch's cross-entropy: values, gradients, second derivatives, what it keeps."""

import pytest
import torch
import torch.nn.functional as F

import bros_hf.cross_entropy as cross_entropy_module
from bros_hf.cross_entropy import token_cross_entropy
from bros_hf.losses import causal_lm_losses
from tests.saved_bytes import saved_for_backward_bytes

IGNORE = -100


def _batch(rows: int = 37, vocabulary: int = 53, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocabulary, generator=generator)).to(dtype)
    labels = torch.randint(0, vocabulary, (rows,), generator=generator)
    labels[::5] = IGNORE
    return logits, labels


def _reference(logits, labels, smoothing):
    """torch's loss, computed in float32 (float64 for float64 logits), as the token loss promises."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none", label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [1 << 22, 100])  # one block; many, the last one partial
def test_values_and_gradients_equal_torch(monkeypatch, smoothing, block_elements):
    monkeypatch.setattr(cross_entropy_module, "BLOCK_ELEMENTS", block_elements)
    logits, labels = _batch()
    upstream = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(1))
    ours_in, torch_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, reference = token_cross_entropy(ours_in, labels, IGNORE, smoothing), _reference(torch_in, labels, smoothing)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch.all(ours[labels == IGNORE] == 0)
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours_in.grad, torch_in.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(ours_in.grad[labels == IGNORE] == 0)


def test_bfloat16_logits_keep_their_dtype_and_match_the_float32_computation():
    logits, labels = _batch(dtype=torch.bfloat16)
    ours_in, torch_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, reference = token_cross_entropy(ours_in, labels, IGNORE, 0.1), _reference(torch_in, labels, 0.1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)  # both computed in float32 from the same logits
    ours.sum().backward()
    reference.sum().backward()
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad, torch_in.grad, rtol=1e-2, atol=1e-3)  # one bfloat16 rounding each


def test_second_derivatives_are_exact():
    """hessian_mode='autograd' differentiates the gradient again: Hessian-vector products (with an upstream weight, as
    the λ-weighted loss has) equal those through torch's loss, in float64."""
    logits, labels = _batch(rows=6, vocabulary=7)
    generator = torch.Generator().manual_seed(2)
    upstream = torch.randn(6, generator=generator, dtype=torch.float64)
    vector = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    for smoothing in (0.0, 0.2):
        grads, products = [], []
        for ours in (True, False):
            x = logits.double().requires_grad_()
            losses = token_cross_entropy(x, labels, IGNORE, smoothing) if ours else _reference(x, labels, smoothing)
            (grad,) = torch.autograd.grad((losses * upstream).sum(), x, create_graph=True)
            grads.append(grad.detach())
            products.append(torch.autograd.grad((grad * vector).sum(), x)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)  # the gradient of that path too
        assert products[0].abs().max() > 0.01
        torch.testing.assert_close(products[0], products[1], rtol=1e-10, atol=1e-12)
        x = logits.double().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, s=smoothing: token_cross_entropy(x, labels, IGNORE, s), (x,))


def test_keeps_only_the_logits_for_backward():
    """Saved for backward: the logits themselves (bfloat16 here) and a few per-token numbers; torch's loss keeps a
    float32 copy and its log-probabilities, four times the bfloat16 logits."""
    logits, labels = _batch(rows=64, vocabulary=4000, dtype=torch.bfloat16)
    logits.requires_grad_()
    logits_bytes = logits.numel() * logits.element_size()

    ours = saved_for_backward_bytes(lambda: token_cross_entropy(logits, labels, IGNORE))
    # The per-example loss of the bilevel passes goes through it.
    per_example = saved_for_backward_bytes(lambda: causal_lm_losses(logits.view(4, 16, -1), labels.view(4, 16)))
    reference = saved_for_backward_bytes(lambda: _reference(logits, labels, 0.0))
    assert ours <= logits_bytes + 64 * 32
    assert per_example <= logits_bytes + 64 * 32
    assert reference >= 2 * logits_bytes


def test_shapes_are_checked():
    logits, labels = _batch()
    with pytest.raises(ValueError, match=r"logits \[N, V\] and labels \[N\]"):
        token_cross_entropy(logits[None], labels, IGNORE)
    with pytest.raises(ValueError, match=r"logits \[N, V\] and labels \[N\]"):
        token_cross_entropy(logits, labels[:-1], IGNORE)
