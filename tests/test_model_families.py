"""Per model family: the low-rank hooks give the derivatives of materialised θ + P a, and the per-example
loss matches the model's own loss (causal LMs shift labels by one; encoder-decoders do not)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.func import functional_call

from bros_hf import DomainMixture, Sketch
from bros_hf.losses import per_example_losses
from bros_hf.modules import model_perturber
from tests.parity import materialised_and_hooked

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _decoder(config_name: str, model_name: str, **extra):
    def build():
        config = getattr(transformers, config_name)(**{**SMALL, **extra})
        return getattr(transformers, model_name)(config)

    return build


FAMILIES = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=16),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=1),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=1),
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
            word_embed_proj_dim=32, max_position_embeddings=64,
        )
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ),
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
            decoder_start_token_id=0, pad_token_id=0,
        )
    ),
    "bart": lambda: transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        )
    ),
}


def _inputs(model, generator):
    ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    if model.config.is_encoder_decoder:
        labels = torch.randint(3, VOCAB, (4, 8), generator=generator)
        labels[0, -2:] = -100
        return {"input_ids": ids, "labels": labels}
    labels = ids.clone()
    labels[0, -3:] = -100
    return {"input_ids": ids, "labels": labels}


def _build(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    return model, _inputs(model, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_example_losses_average_to_the_models_own_loss(family):
    """Equal-length examples: the mean of ℓ_i over examples weighted by their token counts is the model's loss."""
    model, batch = _build(family)
    with torch.no_grad():
        outputs = model(**batch)
    shift = not model.config.is_encoder_decoder
    losses = per_example_losses(outputs, batch["labels"], shift_labels=shift)
    labels = batch["labels"][:, 1:] if shift else batch["labels"]
    tokens = (labels != -100).sum(dim=1).float()
    torch.testing.assert_close((losses * tokens).sum() / tokens.sum(), outputs.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hooks_match_materialised_perturbation(family):
    """Gradient, Hessian action and cross term through the hooks equal those through θ + P a formed in
    full (double backward, float32), for every family's layers (scaled or offset embeddings included)."""
    model, batch = _build(family)
    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = torch.tensor([0, 1, 0, 1])
    upper = DomainMixture(["A", "B"])
    upper.logits.copy_(torch.tensor([0.3, -0.3]))
    shift = not model.config.is_encoder_decoder
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not shift:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])

    def lower_loss(lam, p):
        outputs = functional_call(model, p, args=(), kwargs=inputs)
        return (upper.coefficients(keys, lam) * per_example_losses(outputs, batch["labels"], shift_labels=shift)).mean()

    generator = torch.Generator().manual_seed(0)
    sketch_p, sketch_q = Sketch.sample(params, 8, generator), Sketch.sample(params, 8, generator)
    z = {n: torch.randn(p.shape, generator=generator) * 0.05 for n, p in params.items()}
    hooks = model_perturber(model)
    assert hooks.modules, "some layers must be hooked, or the comparison is vacuous"
    materialised, hooked = materialised_and_hooked(lower_loss, upper.logits, params, sketch_p, sketch_q, z, hooks)
    for name in params:
        torch.testing.assert_close(hooked.grad[name], materialised.grad[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(
            hooked.hessian_action[name], materialised.hessian_action[name], rtol=1e-3, atol=1e-5, msg=name
        )
    torch.testing.assert_close(hooked.cross, materialised.cross, rtol=1e-3, atol=1e-6)
    assert float(materialised.cross.abs().max()) > 0, "the cross term is not trivially zero"


@pytest.mark.parametrize("family", ["gemma", "opt", "t5"])
def test_trainer_runs_and_uses_the_families_loss(tmp_path, family):
    """A few BROSTrainer steps per family (OPT's offset positions once crashed the hooks), and the trainer's
    per-example loss is the family's: T5's labels are aligned with its decoder (no shift)."""
    import datasets

    from bros_hf import BROSConfig, BROSTrainer

    model, batch = _build(family)
    rows = {k: v.tolist() for k, v in batch.items()}
    train = datasets.Dataset.from_dict({**rows, "domain": ["A", "B", "A", "B"]}).with_format("torch")
    args = BROSConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, subspace_rank=4, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-3,
    )
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=train)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
        own = trainer.per_example_loss(outputs, batch["labels"])
    expected = per_example_losses(outputs, batch["labels"], shift_labels=family != "t5")
    torch.testing.assert_close(own, expected)


@pytest.mark.parametrize("mode", ["auto", "finite_difference"])
def test_bf16_weights_train(tmp_path, mode):
    """Weights loaded in bf16 (no autocast): the fp32 z and coordinates enter the layers cast to bf16, the run
    stays finite, and "auto" picks double backward for half-precision weights."""
    import datasets

    from bros_hf import BROSConfig, BROSTrainer

    model, batch = _build("llama")
    model.to(torch.bfloat16)
    rows = {k: v.tolist() for k, v in batch.items()}
    train = datasets.Dataset.from_dict({**rows, "domain": ["A", "B", "A", "B"]}).with_format("torch")
    args = BROSConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, subspace_rank=4, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", hessian_mode=mode,
    )
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=train)
    trainer.train()
    assert trainer.engine.hparams.hessian_mode == ("autograd" if mode == "auto" else mode)
    assert float(sum(z.norm() for z in trainer.engine.z.values())) > 0, "z ≠ 0: the failing case is exercised"
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(trainer.upper.logits).all() and not torch.equal(trainer.upper.logits, torch.zeros(2))
