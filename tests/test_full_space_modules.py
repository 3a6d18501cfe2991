"""Tensors that are full-space in every update (P = Q = U = I): the classification head of ``full_space_modules``
(default ``["head"]``) and vectors kept with broadcast dimensions ([1, ...] parameters such as ViT's class token and
position embeddings)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bros_hf import BROSConfig
from bros_hf.core.engine import BilevelEngine, BilevelHyperparameters
from bros_hf.core.upper import DomainMixture
from bros_hf.modules import broadcast_vector_names, full_space_parameter_names
from tests.test_trainer import make_args, train
from tests.toy import three_domain_toy

BODY, OFFSET, HEAD = "body.weight", "offset", "classifier.weight"


class HeadClassifier(nn.Module):
    """features [B, 16] → tanh(body(x) + offset) → classifier: a [1, 32] offset (a vector with a broadcast
    dimension) and a head named like transformers' ``classifier``; every matrix has n > r = 8."""

    def __init__(self, with_body: bool = True):
        super().__init__()
        self.body = nn.Linear(16, 32) if with_body else None
        self.offset = nn.Parameter(torch.zeros(1, 32 if with_body else 16))
        self.classifier = nn.Linear(32 if with_body else 16, 4)

    def forward(self, features, labels=None):
        hidden = features if self.body is None else self.body(features)
        logits = self.classifier(torch.tanh(hidden + self.offset))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy(n_per_domain=48, n_target=24)


def sketches(trainer) -> dict[str, tuple[bool, bool, bool]]:
    """name -> (P sketched, Q sketched, U sketched) in the trainer's engine."""
    engine = trainer.engine
    return {
        name: tuple(s.matrices[name] is not None for s in (engine.sketch_p, engine.sketch_q, engine.sketch_u))
        for name in engine.params
    }


def test_head_and_broadcast_vectors_are_full_space_by_default(tmp_path, toy, caplog):
    caplog.set_level(logging.INFO, logger="bros_hf.modules")
    trainer = train(make_args(tmp_path, max_steps=3), *toy, model=HeadClassifier())
    logged = "full_space_modules=['head']: full space in every update (P = Q = U = I) for ['classifier.weight', "
    assert logged + "'classifier.bias']." in [r.getMessage() for r in caplog.records]
    drawn = sketches(trainer)
    assert drawn[HEAD] == drawn[OFFSET] == (False, False, False)
    assert drawn[BODY] == (True, True, True)
    assert trainer.engine.aux_step_size(HEAD) == pytest.approx(trainer.engine.hparams.aux_lr)  # unscaled γ
    # The optimizer steps the head itself (U = I), not r-dim coordinates.
    assert trainer._coordinates[HEAD] is dict(trainer.model.named_parameters())[HEAD]


def test_none_sketches_the_head_and_broadcast_vectors_stay_full_space(tmp_path, toy):
    trainer = train(make_args(tmp_path, max_steps=3, full_space_modules=["none"]), *toy, model=HeadClassifier())
    drawn = sketches(trainer)
    assert drawn[HEAD] == (True, True, True)
    assert drawn[OFFSET] == (False, False, False)


def test_full_space_and_sketched_draws_are_the_same_elsewhere(tmp_path, toy):
    """Making the head full-space changes only the head's sketches: the body's P and Q are the same draws."""
    default = train(make_args(tmp_path, max_steps=1), *toy, model=HeadClassifier())
    sketched = train(make_args(tmp_path, max_steps=1, full_space_modules=["none"]), *toy, model=HeadClassifier())
    for pick in (lambda e: e.sketch_p, lambda e: e.sketch_q):
        torch.testing.assert_close(pick(default.engine).matrices[BODY], pick(sketched.engine).matrices[BODY])


def test_a_model_whose_only_matrix_is_the_head_is_refused(tmp_path, toy):
    with pytest.raises(ValueError, match=r"MA-SOBA in disguise.*full_space_modules=\['none'\] to sketch the head"):
        train(make_args(tmp_path, max_steps=1), *toy, model=HeadClassifier(with_body=False))


def test_unknown_entry_names_the_field(tmp_path, toy):
    with pytest.raises(ValueError, match=r"full_space_modules entry 'decoder' matches no module of HeadClassifier"):
        train(make_args(tmp_path, max_steps=1, full_space_modules=["decoder"]), *toy, model=HeadClassifier())


def test_none_cannot_be_combined(tmp_path):
    with pytest.raises(ValueError, match=r"full_space_modules=\['none', 'head'\]: 'none'"):
        BROSConfig(output_dir=str(tmp_path), full_space_modules=["none", "head"])


def test_broadcast_vectors_are_leading_singleton_tensors():
    params = {"cls": torch.zeros(1, 1, 8), "pos": torch.zeros(1, 5, 8), "w": torch.zeros(4, 8), "b": torch.zeros(8)}
    assert broadcast_vector_names(params) == ["cls", "pos"]


def test_engine_unsketched_names_must_be_parameters():
    hparams = BilevelHyperparameters(method="bros", rank=2, unsketched=("missing",))
    with pytest.raises(ValueError, match=r"unsketched names tensors that are not among the parameters: \['missing'\]"):
        BilevelEngine({"w": torch.zeros(4, 8)}, DomainMixture(["a", "b"]), hparams)


def test_engine_resample_keeps_unsketched_tensors_full_space_in_every_sketch():
    """With a separate lower subspace (resample_every > 1), U is redrawn and still the identity there."""
    params = {"w": torch.zeros(4, 8), "head": torch.zeros(3, 8)}
    hparams = BilevelHyperparameters(method="bros", rank=2, resample_every=2, unsketched=("head",))
    engine = BilevelEngine(params, DomainMixture(["a", "b"]), hparams)
    for sketch in (engine.sketch_p, engine.sketch_q, engine.sketch_u):
        assert sketch.matrices["head"] is None and sketch.matrices["w"] is not None


def test_checkpoint_written_before_unsketched_existed_resumes():
    """A bilevel state without the ``unsketched`` entry (written before it existed) counts as unsketched = ():
    it resumes where nothing is unsketched and is refused, naming the field, where something is."""
    params = {"w": torch.zeros(4, 8), "head": torch.zeros(3, 8)}
    plain = BilevelEngine(params, DomainMixture(["a", "b"]), BilevelHyperparameters(method="bros", rank=2))
    state = plain.state_dict()
    del state["hparams"]["unsketched"]
    fresh = BilevelEngine(params, DomainMixture(["a", "b"]), BilevelHyperparameters(method="bros", rank=2))
    fresh.load_state_dict(state)
    with_head = BilevelEngine(
        params, DomainMixture(["a", "b"]), BilevelHyperparameters(method="bros", rank=2, unsketched=("head",))
    )
    with pytest.raises(ValueError, match=r"unsketched: checkpoint=\(\) vs now=\('head',\)"):
        with_head.load_state_dict(state)


def _tiny(kind: str):
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    if kind == "vit":
        config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=3, **small)
        return tf.ViTForImageClassification(config)
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=40, num_labels=3, **small))
    if kind == "llama":
        config = tf.LlamaConfig(vocab_size=40, num_labels=3, pad_token_id=0, **small)
        return tf.LlamaForSequenceClassification(config)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, num_labels=3)
        return tf.GPT2ForSequenceClassification(config)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=40, **small))


VIT_VECTORS = ("cls_token", "position_embeddings")


@pytest.mark.parametrize(
    ("kind", "head", "vectors"),
    [
        ("vit", ["classifier.weight", "classifier.bias"], [f"vit.embeddings.{n}" for n in VIT_VECTORS]),
        ("bert", ["classifier.weight", "classifier.bias"], []),
        ("llama", ["score.weight"], []),
        ("gpt2", ["score.weight"], []),
        ("causal_lm", [], []),  # no classification head: nothing, and no error
    ],
)
def test_head_of_transformers_models(kind, head, vectors):
    model = _tiny(kind)
    params = dict(model.named_parameters())
    assert full_space_parameter_names(model, ["head"], params, "full_space_modules") == head
    assert broadcast_vector_names(params) == vectors


def test_head_of_a_peft_classifier_is_its_trainable_copy():
    """peft keeps the head trainable through modules_to_save; the frozen original is not a bilevel tensor."""
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(_tiny("llama"), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj"]))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = full_space_parameter_names(model, ["head"], params, "full_space_modules")
    assert names and all("score" in n and "modules_to_save" in n for n in names), names
