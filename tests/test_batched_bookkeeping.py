"""The per-step bookkeeping that batches its work over tensors (fewer kernels per step) must give what the
per-tensor computation gives, and installing a pass's tensors must leave the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bros_hf.core.engine import BATCHED_DOT_LIMIT, _sum_of_float32_dots, _times_scalar
from bros_hf.core.lowrank import LowRankPerturber, _installed, _owners
from bros_hf.core.sketch import Sketch


def _mixed_params() -> dict[str, torch.Tensor]:
    """Same-shape tensors (batched together), other shapes, a 4-d tensor, and full-space vectors."""
    torch.manual_seed(0)
    return {
        "q": torch.randn(24, 20),
        "k": torch.randn(24, 20),
        "v": torch.randn(24, 20),
        "up": torch.randn(40, 20),
        "conv": torch.randn(6, 3, 2, 2),
        "norm": torch.randn(20),
        "bias": torch.randn(24),
    }


def test_batched_expanded_norms_are_the_materialised_norms():
    """Σ_n w_n ‖P a_n‖² from batched Gram products equals the sum of ‖P a_n‖² with P a_n formed, with weights that
    differ between tensors of one shape (they must not be batched under one weight) and full-space tensors in
    bfloat16 (their norm in their own dtype, as before)."""
    params = _mixed_params()
    sketch = Sketch.sample(params, 4, torch.Generator().manual_seed(1))
    assert sketch.matrices["conv"] is not None and sketch.matrices["norm"] is None
    coords = {n: torch.randn(sketch.coordinate_shape(n, p)) for n, p in params.items()}
    coords["bias"] = coords["bias"].bfloat16()
    weights = {"q": 0.5, "k": 0.5, "v": 2.0, "up": 1.5, "conv": 3.0, "norm": 0.25, "bias": 4.0}

    def materialised(weight_of):
        total = 0.0
        for name, a in coords.items():
            sketched = sketch.matrices[name] is not None
            full = sketch.expand_one(name, a.float() if sketched else a, params[name].shape)
            total += weight_of(name) * float(torch.linalg.vector_norm(full).float().square())
        return total

    batched = sketch.expanded_norm_sq_sum(coords, weights)
    assert batched.dtype == torch.float32 and batched.dim() == 0
    assert float(batched) == pytest.approx(materialised(weights.__getitem__), rel=1e-5)
    assert float(sketch.expanded_norm_sq_sum(coords)) == pytest.approx(materialised(lambda _: 1.0), rel=1e-5)
    assert float(Sketch.identity(params).expanded_norm_sq_sum({})) == 0.0


def test_sum_of_dots_batches_small_float32_pairs_and_streams_the_rest():
    torch.manual_seed(0)
    pairs = [(torch.randn(8, 4), torch.randn(8, 4)) for _ in range(3)]
    pairs.append((torch.randn(5), torch.randn(5)))
    pairs.append((torch.randn(8, 4).bfloat16(), torch.randn(8, 4)))  # low precision: one by one, in float32
    pairs.append((torch.randn(BATCHED_DOT_LIMIT + 1), torch.randn(BATCHED_DOT_LIMIT + 1)))  # large: not stacked
    expected = sum(float(torch.dot(x.double().reshape(-1), y.double().reshape(-1))) for x, y in pairs)
    total = _sum_of_float32_dots(pairs, torch.device("cpu"))
    assert total.dtype == torch.float32
    assert float(total) == pytest.approx(expected, rel=1e-5, abs=1e-3)
    assert float(_sum_of_float32_dots([], torch.device("cpu"))) == 0.0


def test_times_scalar_scales_every_tensor_out_of_place_or_in_place():
    tensors = [torch.ones(3), torch.full((2, 2), 2.0), torch.ones(1, dtype=torch.bfloat16)]
    factor = torch.tensor(0.5)
    scaled = _times_scalar(tensors, factor)
    assert [t.tolist() for t in tensors] == [[1.0] * 3, [[2.0, 2.0]] * 2, [1.0]]  # untouched
    assert [t.tolist() for t in scaled] == [[0.5] * 3, [[1.0, 1.0]] * 2, [0.5]]
    assert scaled[2].dtype == torch.bfloat16
    same = _times_scalar(tensors, factor, in_place=True)
    assert all(a is b for a, b in zip(same, tensors, strict=True))
    assert tensors[1].tolist() == [[1.0, 1.0]] * 2


def test_installed_tensors_reach_every_tied_holder_and_the_parameters_come_back():
    """GPT-2 ties its input embeddings to the LM head: the installed tensor must be used by both, and on exit (also
    when the pass raises) every module holds its own Parameter object again."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    before = {(id(m), a): p for m in model.modules() for a, p in m._parameters.items()}
    holders = {name: _owners(model)[id(p)] for name, p in model.named_parameters()}
    assert len(holders["transformer.wte.weight"]) == 2  # the embedding and the head
    replacement = {name: p.detach() * 0 for name, p in model.named_parameters()}
    with _installed(holders, replacement):
        assert model.lm_head.weight is replacement["transformer.wte.weight"]
        assert model.transformer.wte.weight is replacement["transformer.wte.weight"]
        assert float(model(torch.tensor([[1, 2]])).logits.abs().max()) == 0.0
    with pytest.raises(RuntimeError, match="inside the pass"), _installed(holders, replacement):
        raise RuntimeError("inside the pass")
    after = {(id(m), a): p for m in model.modules() for a, p in m._parameters.items()}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_perturber_refuses_tensors_that_are_not_the_models_parameters():
    model = torch.nn.Linear(4, 4)
    perturber = LowRankPerturber(model)
    params = {"weight": model.weight.detach(), "base_model.weight": model.weight.detach()}
    with pytest.raises(KeyError, match=r"base_model\.weight.*Build the perturber on the module the loss"):
        with perturber(params, []):
            pass
