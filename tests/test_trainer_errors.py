"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import datasets
import pytest
import torch

from bros_hf import BROSTrainer
from tests.test_trainer import make_args, train
from tests.toy import TinyClassifier, three_domain_toy


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy(n_per_domain=48, n_target=24)


def build(args, train_ds, target_ds):
    return BROSTrainer(model=TinyClassifier(), args=args, train_dataset=train_ds, upper_dataset=target_ds)


def test_missing_domain_column(tmp_path, toy):
    train_ds, target_ds = toy
    with pytest.raises(ValueError, match="no column 'source'.*domain_column"):
        build(make_args(tmp_path, domain_column="source"), train_ds, target_ds)


def test_domain_column_of_wrong_type(tmp_path, toy):
    train_ds, target_ds = toy
    bad = train_ds.with_format(None).map(lambda ex: {"domain": 0.5})
    with pytest.raises(TypeError, match="one domain name .* or id"):
        build(make_args(tmp_path), bad.with_format("torch"), target_ds)


def test_listed_domain_without_examples(tmp_path, toy):
    with pytest.raises(ValueError, match=r"\['D'\] have no training examples"):
        build(make_args(tmp_path, domains=["A", "B", "C", "D"]), *toy)


def test_target_domain_never_seen_in_training(tmp_path, toy):
    train_ds, target_ds = toy
    target = target_ds.with_format(None).map(lambda ex: {"domain": "Z"}).with_format("torch")
    with pytest.raises(ValueError, match=r"target\) set has domains \['Z'\]"):
        build(make_args(tmp_path), train_ds, target)


def test_empty_upper_set(tmp_path, toy):
    train_ds, target_ds = toy
    with pytest.raises(ValueError, match="upper \\(target\\) set is empty"):
        build(make_args(tmp_path), train_ds, target_ds.select([]))


def test_sample_mode_needs_indexable_train_set(tmp_path, toy):
    train_ds, target_ds = toy
    iterable = train_ds.to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style .*iterable dataset"):
        build(make_args(tmp_path, upper_level="sample"), iterable, target_ds)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"aux_learning_rate": 0.0}, "aux_lr must be > 0"),
        ({"upper_learning_rate": -1.0}, "upper_lr must be > 0"),
        ({"learning_rate": 0.0}, "learning_rate .* must be > 0"),
        ({"moving_average_weight": 0.0}, "ρ must be in"),
        ({"subspace_rank": 0}, "rank must be ≥ 1"),
        ({"upper_level": "token"}, "upper_level must be"),
        ({"optim": "adafactor"}, "not supported for the lower level"),
        ({"fsdp": "full_shard"}, "FSDP is not supported"),
        (
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
            "Reentrant activation checkpointing",
        ),
    ],
)
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_trainer_requires_bros_config(tmp_path, toy):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="needs a BROSConfig"):
        BROSTrainer(
            model=TinyClassifier(),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
            train_dataset=toy[0],
            upper_dataset=toy[1],
        )


def test_resume_with_different_configuration_is_refused(tmp_path, toy):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=6)
    train(args, *toy)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    other = make_args(tmp_path, max_steps=4, subspace_rank=4, per_device_train_batch_size=6)
    trainer = build(other, *toy)
    with pytest.raises(ValueError, match="rank: checkpoint=8 vs now=4"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_truncated_checkpoint_state_gives_clear_error(tmp_path, toy):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=6)
    train(args, *toy)
    state = tmp_path / "out" / "checkpoint-2" / "bros_state_rank0.pt"
    state.write_bytes(state.read_bytes()[:100])
    trainer = build(make_args(tmp_path, max_steps=4, per_device_train_batch_size=6), *toy)
    with pytest.raises(ValueError, match="Cannot read bilevel state .*bros_state_rank0.pt"):
        trainer.train(resume_from_checkpoint=str(state.parent))


def test_unknown_model_head_asks_for_override(tmp_path):
    from bros_hf.losses import per_example_losses

    with pytest.raises(ValueError, match="Override BROSTrainer.per_example_loss"):
        per_example_losses({"logits": torch.zeros(2, 3, 4, 5)}, torch.zeros(2, dtype=torch.long))


def test_domain_ids_as_integers_work(tmp_path, toy):
    train_ds, target_ds = toy
    numeric = train_ds.with_format(None).map(lambda ex: {"domain": "ABC".index(ex["domain"])})
    numeric = numeric.cast_column("domain", datasets.Value("int64")).with_format("torch")
    target = target_ds.remove_columns("domain")
    trainer = train(make_args(tmp_path, max_steps=3, per_device_train_batch_size=6), numeric, target)
    assert list(trainer.mixture_weights()) == ["0", "1", "2"]
