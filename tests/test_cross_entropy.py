"""token_cross_entropy against torch's cross-entropy: values, gradients, second derivatives, what it keeps."""

import pytest
import torch
import torch.nn.functional as F

import bros_hf.cross_entropy as cross_entropy_module
from bros_hf.cross_entropy import gradient_in_logits, token_cross_entropy
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


class _GradientPointer(torch.autograd.Function):
    """x ↦ a copy of x (a new non-leaf tensor, as a head's output is); records where the gradient it receives lives."""

    pointers: list[int] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _GradientPointer.pointers.append(grad.data_ptr())
        return grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elements", [1 << 22, 100])
def test_gradient_in_logits_overwrites_them_with_the_same_gradient(monkeypatch, dtype, block_elements):
    """Inside ``gradient_in_logits`` the backward writes the gradient into the logits' own memory (the head's output:
    a non-leaf tensor) instead of a new buffer, block by block, with the same values as outside it."""
    monkeypatch.setattr(cross_entropy_module, "BLOCK_ELEMENTS", block_elements)
    logits, labels = _batch(dtype=dtype)
    upstream = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(1))
    grads, pointers, overwritten = [], [], []
    for inside in (False, True):
        source = logits.clone().requires_grad_()
        head_output = _GradientPointer.apply(source)  # what a head returns: a non-leaf tensor
        pointer = head_output.data_ptr()
        context = gradient_in_logits() if inside else torch.enable_grad()
        with context:
            losses = token_cross_entropy(head_output, labels, IGNORE, 0.1)
        (losses * upstream).sum().backward()
        grads.append(source.grad)
        pointers.append(_GradientPointer.pointers.pop() == pointer)
        overwritten.append(not torch.equal(head_output.detach(), logits))
    assert pointers == [False, True] and overwritten == [False, True]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_gradient_in_logits_leaves_leaves_and_noncontiguous_logits_alone():
    """A leaf (the caller's own tensor) and a non-contiguous view are never overwritten."""
    logits, labels = _batch()
    leaf = logits.clone().requires_grad_()
    transposed_source = logits.T.contiguous().requires_grad_()
    with gradient_in_logits():
        token_cross_entropy(leaf, labels, IGNORE).sum().backward()
        strided = _GradientPointer.apply(transposed_source).T
        token_cross_entropy(strided, labels, IGNORE).sum().backward()
    _GradientPointer.pointers.clear()
    assert torch.equal(leaf.detach(), logits) and torch.equal(strided.detach(), logits)
    torch.testing.assert_close(leaf.grad, transposed_source.grad.T, rtol=1e-5, atol=1e-6)


def test_gradient_in_logits_is_never_silently_wrong_for_another_reader():
    """Another autograd node that saved the logits for its own backward (here a square, recorded before or after
    the loss) either runs before the overwrite, and the gradient is right, or sees it through autograd's version
    check and raises: never a silently wrong gradient."""
    logits, labels = _batch()
    outcomes = []
    for square_first in (False, True):
        grads = []
        for inside in (False, True):
            source = logits.clone().requires_grad_()
            head_output = _GradientPointer.apply(source)
            with gradient_in_logits() if inside else torch.enable_grad():
                # Autograd runs the later-recorded of two ready nodes first: the square's backward before or after
                # the loss's.
                square = 1e-3 * head_output.pow(2).sum() if square_first else None
                cross_entropy = token_cross_entropy(head_output, labels, IGNORE).sum()
                if square is None:
                    square = 1e-3 * head_output.pow(2).sum()
                loss = square + cross_entropy
            try:
                loss.backward()
            except RuntimeError as error:
                assert inside and "modified by an inplace operation" in str(error)
                outcomes.append("raised")
                continue
            grads.append(source.grad)
        if len(grads) == 2:
            torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
            outcomes.append("right")
    _GradientPointer.pointers.clear()
    assert "raised" in outcomes, outcomes  # the check is exercised, not only the lucky order


def test_shapes_are_checked():
    logits, labels = _batch()
    with pytest.raises(ValueError, match=r"logits \[N, V\] and labels \[N\]"):
        token_cross_entropy(logits[None], labels, IGNORE)
    with pytest.raises(ValueError, match=r"logits \[N, V\] and labels \[N\]"):
        token_cross_entropy(logits, labels[:-1], IGNORE)
