"""The parts of the Trainer contract a swap-in must keep: settings it replaces are said, metrics stay apart."""

from __future__ import annotations

import warnings

import pytest

from bros_hf import BROSTrainer
from tests.test_trainer import make_args
from tests.toy import TinyClassifier, three_domain_toy


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy(n_per_domain=48, n_target=48)


def build(tmp_path, toy, **overrides):
    train, target = toy
    return BROSTrainer(model=TinyClassifier(), args=make_args(tmp_path, **overrides), train_dataset=train,
                       upper_dataset=target)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(torch_compile=True), "training steps run eager"),
        (dict(train_sampling_strategy="sequential"), "replaced by the balanced domain sampler"),
        (dict(per_device_train_batch_size=8), "not a multiple of the 3 domains"),
    ],
)
def test_replaced_trainer_settings_are_said(tmp_path, toy, overrides, message):
    with pytest.warns(UserWarning, match=message):
        build(tmp_path, toy, **overrides)


def test_default_settings_warn_nothing(tmp_path, toy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(tmp_path, toy, per_device_train_batch_size=24)


def test_unbalanced_batches_keep_the_trainers_sampler_quietly(tmp_path, toy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(tmp_path, toy, balanced_domain_batches=False, train_sampling_strategy="sequential",
              per_device_train_batch_size=8)


def test_training_and_evaluation_metrics_are_logged_apart(tmp_path, toy, one_thread):
    train, target = toy
    args = make_args(tmp_path, max_steps=20, logging_steps=5, eval_strategy="steps", eval_steps=10)
    trainer = BROSTrainer(model=TinyClassifier(), args=args, train_dataset=train, upper_dataset=target,
                          eval_dataset=target)
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    trainings = [log for log in trainer.state.log_history if "loss" in log]
    assert len(evaluations) == 2 and len(trainings) == 4
    assert all(not any(k.startswith(("bilevel/", "mixture/")) for k in log) for log in evaluations), evaluations
    assert all("bilevel/upper_loss" in log and "mixture/A" in log for log in trainings), trainings


def test_upper_set_with_list_valued_domains_is_a_type_error(tmp_path, toy):
    train, target = toy
    listed = target.map(lambda ex: {"domain": [ex["domain"]] * 2})
    with pytest.raises(TypeError, match=r"upper \(target\) set example 0 has list"):
        BROSTrainer(model=TinyClassifier(), args=make_args(tmp_path), train_dataset=train, upper_dataset=listed)
