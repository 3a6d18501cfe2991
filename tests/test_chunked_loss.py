"""loss_chunk_size: per-example losses from the final hidden states, chunk by chunk, against the model's own logits
(values, gradients, whole bilevel runs per family, packed rows, label smoothing), what it saves for backward, and
the models and losses it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DataCollatorWithFlattening, GPT2Config, GPT2LMHeadModel

from bros_hf import BROSTrainer
from bros_hf.chunked_loss import chunked_token_losses
from tests import toy
from tests.saved_bytes import saved_for_backward_bytes
from tests.test_padding_free import variable_length_domains
from tests.test_trainer import make_args
from tests.test_trainer_lm import token_domains

VOCAB = 64


def test_chunked_token_losses_and_gradients_equal_the_whole_logits():
    """Values and gradients (hidden states and head weight) as from the whole logits, with ignored positions, label
    smoothing and a chunk size that does not divide the number of tokens."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    targets = torch.randint(0, 30, (3, 7))
    targets[0, -2:] = -100
    weights = torch.rand(3, 7)
    for smoothing in (0.0, 0.1):
        whole = F.cross_entropy(
            head(hidden).reshape(-1, 30), targets.reshape(-1), reduction="none", label_smoothing=smoothing
        ).view(3, 7)
        chunked = chunked_token_losses(hidden, head, targets, chunk_tokens=5, label_smoothing=smoothing)
        torch.testing.assert_close(chunked, whole)
        expected = torch.autograd.grad((whole * weights).sum(), [hidden, head.weight])
        got = torch.autograd.grad((chunked * weights).sum(), [hidden, head.weight])
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)
    assert float(chunked.detach()[0, -2:].abs().sum()) == 0.0


def test_chunks_do_not_keep_the_logits_for_backward():
    """What autograd saves for backward: the whole logits' log-softmax without chunks; a chunk's input and targets
    (no [tokens, vocab] tensor) with them."""
    torch.manual_seed(0)
    tokens, vocab = 256, 4096
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(tokens, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))

    logits_bytes = tokens * vocab * 4
    whole = saved_for_backward_bytes(lambda: F.cross_entropy(head(hidden), targets, reduction="none"))
    chunked = saved_for_backward_bytes(lambda: chunked_token_losses(hidden, head, targets, chunk_tokens=64))
    assert whole >= logits_bytes, whole
    assert chunked < logits_bytes / 20, chunked


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _llama():
    return toy.tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2)


def _run(tmp_path, build, data=None, collator=None, **overrides) -> BROSTrainer:
    train, target = data or token_domains()
    settings = dict(max_steps=6, per_device_train_batch_size=8, upper_warmup_steps=0, remove_unused_columns=False)
    settings.update(overrides)
    torch.manual_seed(0)
    trainer = BROSTrainer(model=build(), args=make_args(tmp_path, **settings), train_dataset=train,
                          upper_dataset=target, data_collator=collator)
    trainer.train()
    return trainer


def _assert_same_run(chunked: BROSTrainer, whole: BROSTrainer) -> None:
    # Finite differences of float32 losses put round-off of ~1e-3 of λ's range into per-example λ.
    reach = float(whole.upper.logits.abs().max())
    assert reach > 0.1  # the upper level moved
    torch.testing.assert_close(chunked.upper.logits, whole.upper.logits, rtol=0, atol=5e-3 * reach)
    for name, z in whole.engine.z.items():
        torch.testing.assert_close(chunked.engine.z[name], z, rtol=1e-4, atol=1e-4 * float(z.abs().max()), msg=name)
    chunked_params = dict(chunked.model.named_parameters())
    for name, p in whole.model.named_parameters():
        torch.testing.assert_close(chunked_params[name], p, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("build", "mode"),
    [(_gpt2, "finite_difference"), (_gpt2, "autograd"), (_llama, "finite_difference"), (_llama, "autograd")],
    ids=["gpt2-fd", "gpt2-autograd", "llama-fd", "llama-autograd"],
)
def test_bilevel_run_with_chunked_loss_equals_the_whole_logits_run(tmp_path, one_thread, build, mode):
    """λ, z and θ after six steps equal those of the same run on the model's own logits: GPT-2 (tied head,
    Conv1D layers, dropout) and Llama (untied head), finite differences and double backward; chunks of 50
    tokens over 8 × 24 positions (the low-rank hooks on the head see every chunk, in forward and recompute)."""
    whole = _run(tmp_path / "whole", build, hessian_mode=mode)
    chunked = _run(tmp_path / "chunked", build, hessian_mode=mode, loss_chunk_size=50)
    assert chunked._chunked_head_checked
    _assert_same_run(chunked, whole)


def test_chunked_loss_under_activation_checkpointing(tmp_path, one_thread):
    """Both recompute in backward (the layers, and the head chunks): the run without checkpointing or chunks."""
    whole = _run(tmp_path / "whole", _gpt2)
    chunked = _run(tmp_path / "chunked", _gpt2, loss_chunk_size=50, activation_checkpointing=True,
                   activation_checkpointing_kwargs={"use_reentrant": False})
    assert chunked.model.is_activation_checkpointing
    _assert_same_run(chunked, whole)


def test_chunked_loss_under_bf16_autocast(tmp_path, one_thread):
    """bf16 autocast (the chunks' recompute runs under the forward's autocast state): the whole-logits run within
    bf16 finite-difference noise (measured: λ 1e-4 relative, z 3 percent)."""
    whole = _run(tmp_path / "whole", _llama, bf16=True)
    chunked = _run(tmp_path / "chunked", _llama, bf16=True, loss_chunk_size=50)
    reach = float(whole.upper.logits.abs().max())
    assert reach > 0.1
    torch.testing.assert_close(chunked.upper.logits, whole.upper.logits, rtol=0, atol=1e-2 * reach)
    for name, z in whole.engine.z.items():
        assert float((chunked.engine.z[name] - z).norm()) <= 0.1 * float(z.norm()), name


def test_packed_rows_sample_mode_and_label_smoothing_with_chunked_loss(tmp_path, one_thread):
    """Padding-free batches (several examples per row), per-example weights, label smoothing, token
    normalisation: the same run as on the whole logits."""
    train, target = variable_length_domains()
    train = train.remove_columns("domain")
    settings = dict(upper_level="sample", label_smoothing_factor=0.1, loss_normalization="token")
    whole = _run(tmp_path / "whole", _llama, (train, target), DataCollatorWithFlattening(), **settings)
    chunked = _run(tmp_path / "chunked", _llama, (train, target), DataCollatorWithFlattening(), loss_chunk_size=37,
                   **settings)
    assert chunked._packed_attention_checked
    _assert_same_run(chunked, whole)


@pytest.mark.parametrize(
    ("family", "extra"),
    [("Granite", {"logits_scaling": 4.0}), ("Gemma2", {"final_logit_softcapping": 30.0, "head_dim": 16})],
)
def test_a_model_that_scales_its_logits_after_the_head_is_refused(tmp_path, one_thread, family, extra):
    """Granite divides the head's logits by logits_scaling, Gemma 2 soft-caps them: head(base model) is not the loss's
    input, and the trainer refuses at construction."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, **extra)
    model_class = getattr(transformers, f"{family}ForCausalLM")
    with pytest.raises(ValueError, match=f"{family}ForCausalLM transforms its logits after the head"):
        _run(tmp_path, lambda: model_class(config), max_steps=1, loss_chunk_size=16)


def test_logits_that_differ_from_head_of_base_model_are_caught_on_the_first_step(tmp_path, one_thread):
    """A model whose forward changes the logits in a way no config field names: the numerical check catches it."""

    class ShiftedLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits + torch.arange(outputs.logits.shape[-1], dtype=outputs.logits.dtype)
            return outputs

    config = _llama().config
    with pytest.raises(ValueError, match="ShiftedLogits does not compute its logits as"):
        _run(tmp_path, lambda: ShiftedLogits(config), max_steps=1, loss_chunk_size=16)


def test_loss_chunking_is_refused_where_it_is_not_the_loss(tmp_path):
    train, target = token_domains()
    args = make_args(tmp_path, max_steps=1, loss_chunk_size=16)
    with pytest.raises(ValueError, match="per-example loss is custom"):
        BROSTrainer(model=_llama(), args=args, train_dataset=train, upper_dataset=target,
                    compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs["logits"].mean())
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        BROSTrainer(model=t5, args=args, train_dataset=train, upper_dataset=target)
    with pytest.raises(ValueError, match="loss_chunk_size must be ≥ 1"):
        make_args(tmp_path, loss_chunk_size=0)


def test_peft_model_with_chunked_loss_equals_the_whole_logits_run(tmp_path, one_thread):
    """A peft model is split through the transformers model it wraps (its LoRA layers inside the base model)."""
    from peft import LoraConfig, get_peft_model

    def lora_llama():
        return get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    whole = _run(tmp_path / "whole", lora_llama, learning_rate=1e-2)
    chunked = _run(tmp_path / "chunked", lora_llama, learning_rate=1e-2, loss_chunk_size=50)
    assert chunked._chunked_head_checked
    _assert_same_run(chunked, whole)
