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
CLASSES = 3
IMAGE = 16
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
    # Mixture-of-experts layers (experts held as raw 3-D parameters), fused QKV, partial rotary, parallel blocks.
    "qwen2_moe": _decoder(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
    ),
    "phi": _decoder("PhiConfig", "PhiForCausalLM"),
    "gpt_neox": _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gptj": lambda: transformers.GPTJForCausalLM(
        transformers.GPTJConfig(
            vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, rotary_dim=8, bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "falcon": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ),
    "smollm3": _decoder(
        "SmolLM3Config", "SmolLM3ForCausalLM", num_key_value_heads=1, pad_token_id=0, bos_token_id=0, eos_token_id=0
    ),
    "granite": _decoder("GraniteConfig", "GraniteForCausalLM", num_key_value_heads=1),
    # Sequence classifiers (labels [B]) and image classifiers (pixel_values; ConvNeXt's 4-D convolution kernels).
    "bert": _decoder("BertConfig", "BertForSequenceClassification", num_labels=CLASSES),
    "roberta": _decoder("RobertaConfig", "RobertaForSequenceClassification", num_labels=CLASSES, pad_token_id=1),
    "deberta_v2": _decoder("DebertaV2Config", "DebertaV2ForSequenceClassification", num_labels=CLASSES),
    "modernbert": _decoder(
        "ModernBertConfig", "ModernBertForSequenceClassification", num_labels=CLASSES, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    ),
    "vit": lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=IMAGE,
            patch_size=4, num_labels=CLASSES,
        )
    ),
    "convnext": lambda: transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES)
    ),
}
# A marked subset runs by default; every family runs with `-m slow` (all of them: `-m "slow or not slow"`).
DEFAULT_TRAINER_FAMILIES = ("gemma", "opt", "t5", "qwen2_moe", "modernbert", "convnext")


def _inputs(model, generator):
    if model.main_input_name == "pixel_values":
        pixels = torch.randn(4, 3, IMAGE, IMAGE, generator=generator)
        return {"pixel_values": pixels, "labels": torch.randint(0, CLASSES, (4,), generator=generator)}
    ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    if type(model).__name__.endswith("ForSequenceClassification"):
        return {"input_ids": ids, "labels": torch.randint(0, CLASSES, (4,), generator=generator)}
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
    if batch["labels"].dim() == 1:  # classifiers: one label per example
        tokens = torch.ones(len(losses))
    else:
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


def _trainer_cases():
    for family in sorted(FAMILIES):
        for mode in ("autograd", "finite_difference"):
            marks = () if family in DEFAULT_TRAINER_FAMILIES else (pytest.mark.slow,)
            yield pytest.param(family, mode, marks=marks, id=f"{family}-{mode}")


@pytest.mark.parametrize(("family", "mode"), list(_trainer_cases()))
def test_trainer_runs_and_uses_the_families_loss(tmp_path, family, mode, one_thread):
    """Three BROSTrainer steps per family and Hessian mode (OPT's offset positions once crashed the hooks), and
    the trainer's per-example loss is the family's: T5's labels are aligned with its decoder (no shift)."""
    import datasets

    from bros_hf import BROSConfig, BROSTrainer

    model, batch = _build(family)
    rows = {k: v.tolist() for k, v in batch.items()}
    train = datasets.Dataset.from_dict({**rows, "domain": ["A", "B", "A", "B"]}).with_format("torch")
    args = BROSConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, subspace_rank=4, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-3, hessian_mode=mode,
    )
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=train)
    trainer.train()
    assert trainer.engine.hparams.hessian_mode == mode
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(trainer.upper.logits).all() and float(trainer.upper.logits.abs().max()) > 0
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
        own = trainer.per_example_loss(outputs, batch["labels"])
    expected = per_example_losses(outputs, batch["labels"], shift_labels=not model.config.is_encoder_decoder)
    torch.testing.assert_close(own, expected)


@pytest.mark.parametrize("mode", ["auto", "finite_difference"])
def test_bf16_weights_train(tmp_path, mode):
    """Weights loaded in bf16 (no autocast): the fp32 z and coordinates enter the layers cast to bf16, the run
    stays finite, and "auto" takes finite differences with the half-precision step."""
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
    assert trainer.engine.hparams.hessian_mode == "finite_difference" and trainer.engine.hparams.fd_eps == 2e-2
    assert float(sum(z.norm() for z in trainer.engine.z.values())) > 0, "z ≠ 0: the failing case is exercised"
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(trainer.upper.logits).all() and not torch.equal(trainer.upper.logits, torch.zeros(2))
