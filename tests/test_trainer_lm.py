"""Causal LMs from configs through BROSTrainer: SDPA attention, GPT-2 Conv1D, PEFT LoRA, torch.compile."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from bros_hf import BROSTrainer
from tests import toy
from tests.test_trainer import make_args

VOCAB, LENGTH = 64, 24


def token_domains() -> tuple[datasets.Dataset, datasets.Dataset]:
    """Domain 'count': arithmetic sequences (learnable); 'noise': uniform random tokens. Target: 'count'."""
    generator = torch.Generator().manual_seed(0)

    def counting(n: int) -> list[list[int]]:
        start = torch.randint(0, VOCAB, (n, 1), generator=generator)
        step = torch.randint(1, 4, (n, 1), generator=generator)
        return ((start + step * torch.arange(LENGTH)) % VOCAB).tolist()

    noise = torch.randint(0, VOCAB, (48, LENGTH), generator=generator).tolist()
    train_ids = counting(48) + noise
    train = datasets.Dataset.from_dict(
        {"input_ids": train_ids, "labels": train_ids, "domain": ["count"] * 48 + ["noise"] * 48}
    )
    target_ids = counting(24)
    target = datasets.Dataset.from_dict({"input_ids": target_ids, "labels": target_ids})
    return train.with_format("torch"), target.with_format("torch")


def tiny_llama() -> LlamaForCausalLM:
    return toy.tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2)


def lm_args(tmp_path, **overrides):
    settings = dict(max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3)
    settings.update(overrides)
    return make_args(tmp_path, **settings)


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_llama_with_sdpa_attention(tmp_path, mode):
    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    trainer = BROSTrainer(model=model, args=lm_args(tmp_path, hessian_mode=mode), train_dataset=token_domains()[0],
                          upper_dataset=token_domains()[1])
    trainer.train()
    weights = trainer.mixture_weights()
    assert weights["count"] > weights["noise"], weights
    assert all(math.isfinite(float(z.norm())) for z in trainer.engine.z.values())


def test_gpt2_conv1d_and_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    before = model.transformer.wte.weight.detach().clone()
    trainer = BROSTrainer(model=model, args=lm_args(tmp_path), train_dataset=token_domains()[0],
                          upper_dataset=token_domains()[1])
    trainer.train()
    assert model.lm_head.weight is model.transformer.wte.weight, "tied weights must stay tied"
    assert not torch.equal(before, model.transformer.wte.weight)
    weights = trainer.mixture_weights()
    assert weights["count"] > weights["noise"], weights


def test_peft_lora_adapters_are_the_lower_level(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = BROSTrainer(model=model, args=lm_args(tmp_path, learning_rate=1e-2),
                          train_dataset=token_domains()[0], upper_dataset=token_domains()[1])
    trainer.train()
    assert set(trainer.engine.params) == set(adapters)
    params = dict(model.named_parameters())
    assert all(torch.equal(value, params[name]) for name, value in frozen.items())
    assert any(not torch.equal(value, params[name]) for name, value in adapters.items())
    assert trainer.mixture_weights()["count"] > 0.5


def test_torch_compiled_model_is_unwrapped_for_bilevel_passes(tmp_path):
    model = torch.compile(tiny_llama(), backend="aot_eager")  # aot_autograd has no double backward
    trainer = BROSTrainer(model=model, args=lm_args(tmp_path, max_steps=4), train_dataset=token_domains()[0],
                          upper_dataset=token_domains()[1])
    trainer.train()
    assert trainer.state.global_step == 4
    assert all(math.isfinite(w) for w in trainer.mixture_weights().values())


def test_bilevel_passes_write_the_loss_gradient_into_the_logits_and_change_nothing(tmp_path, monkeypatch):
    """With the built-in loss, every pass's backward writes ∂ℓ/∂logits into the head's output itself (no second
    logits-sized buffer); z, θ and the mixture come out bit for bit as with a separate gradient buffer. A
    compute_loss_func may read the logits in its own way, so its passes keep them."""
    import contextlib

    import bros_hf.trainer as trainer_module
    from bros_hf.losses import causal_lm_losses

    def train(tmp, **trainer_kwargs):
        torch.manual_seed(0)
        model = tiny_llama()
        heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        model.lm_head.register_forward_hook(lambda module, args, out: heads.append((out, out.detach().clone())))
        trainer = BROSTrainer(model=model, args=lm_args(tmp, max_steps=3), train_dataset=token_domains()[0],
                              upper_dataset=token_domains()[1], **trainer_kwargs)
        trainer.train()
        overwritten = [not torch.equal(out.detach(), copy) for out, copy in heads]
        state = {name: z.clone() for name, z in trainer.engine.z.items()}
        state.update({name: p.detach().clone() for name, p in model.named_parameters()})
        return overwritten, state, trainer.mixture_weights()

    overwritten, state, mixture = train(tmp_path / "in_logits")
    # Two passes at step 1 (z = 0: no finite difference), then three a step.
    assert len(overwritten) == 8 and all(overwritten), overwritten
    monkeypatch.setattr(trainer_module, "gradient_in_logits", contextlib.nullcontext)
    kept, reference_state, reference_mixture = train(tmp_path / "separate")
    assert not any(kept)
    assert mixture == reference_mixture
    for name, value in reference_state.items():
        assert torch.equal(state[name], value), name
    monkeypatch.undo()

    def mean_token_loss(outputs, labels, num_items_in_batch=None):  # the built-in token loss, called by the user
        return causal_lm_losses(outputs["logits"], labels).mean()

    custom, _, _ = train(tmp_path / "custom", compute_loss_func=mean_token_loss)
    assert custom and not any(custom)
