"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import logging
import math
import pickle
import warnings

import datasets
import pytest
import torch
from safetensors.torch import load_file

from bros_hf import BROSTrainer
from bros_hf.validation import LabelSpace
from tests.test_trainer import make_args, train
from tests.toy import TinyClassifier, three_domain_toy, tiny_llama


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy(n_per_domain=48, n_target=24)


def build(args, train_ds, target_ds):
    return BROSTrainer(model=TinyClassifier(), args=args, train_dataset=train_ds, upper_dataset=target_ds)


def build_with(model, args, train_ds, target_ds, trainer_cls=BROSTrainer):
    return trainer_cls(model=model, args=args, train_dataset=train_ds, upper_dataset=target_ds)


def test_missing_domain_column(tmp_path, toy):
    train_ds, target_ds = toy
    with pytest.raises(ValueError, match="no column 'source'.*domain_column"):
        build(make_args(tmp_path, domain_column="source"), train_ds, target_ds)


def with_domain(dataset: datasets.Dataset, value_of) -> datasets.Dataset:
    """``dataset`` with its domain column replaced by ``value_of(index, old_value)``."""
    plain = dataset.with_format(None)
    return plain.map(lambda ex, i: {"domain": value_of(i, ex["domain"])}, with_indices=True).with_format(
        "torch"
    )


def as_torch_dataset(dataset: datasets.Dataset, domain_of) -> list[dict]:
    """A plain map-style dataset (a list of dicts of tensors) with domain ``domain_of(index)``."""
    return [{**dataset[i], "domain": domain_of(i)} for i in range(len(dataset))]


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda ds: with_domain(ds, lambda i, d: 0.5), r"example 0 has float 0.5\. Use integer ids or names"),
        (
            lambda ds: as_torch_dataset(ds, lambda i: torch.tensor(0.5 if i == 5 else 1)),
            r"example 5 has float 0.5\. Use integer ids or names",
        ),
        (
            lambda ds: with_domain(ds, lambda i, d: ["A", "B"]),
            r"example 0 has list \['A', 'B'\]\. Each example belongs to exactly one domain",
        ),
        (
            lambda ds: with_domain(ds, lambda i, d: None if i == 5 else d),
            r"example 5 has NoneType None\. Fill in the missing domains or drop those examples",
        ),
    ],
    ids=["float", "float-tensor", "list", "none"],
)
def test_domain_column_of_wrong_type(tmp_path, toy, make_bad, message):
    train_ds, target_ds = toy
    with pytest.raises(TypeError, match=message):
        build(make_args(tmp_path), make_bad(train_ds), target_ds)


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
    with pytest.raises(
        ValueError, match=r"map-style .*iterable dataset .*materialise it first: datasets.Dataset"
    ):
        build(make_args(tmp_path, upper_level="sample"), iterable, target_ds)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"aux_learning_rate": 0.0},
            r"aux_learning_rate \(auxiliary step size γ\) must be a finite number > 0",
        ),
        ({"aux_learning_rate": float("nan")}, r"aux_learning_rate .* must be a finite number > 0 .*got nan"),
        (
            {"upper_learning_rate": -1.0},
            r"upper_learning_rate \(upper step size α on λ\) must be a finite number > 0",
        ),
        ({"learning_rate": 0.0}, r"learning_rate \(lower step size β\) must be a finite number > 0"),
        ({"learning_rate": -1e-3}, r"learning_rate \(lower step size β\) must be a finite number > 0"),
        ({"finite_difference_eps": 0.0}, r"finite_difference_eps .* must be a finite number > 0"),
        ({"moving_average_weight": 0.0}, r"moving_average_weight ρ must be in \(0, 1\]"),
        ({"moving_average_weight": 1.5}, r"moving_average_weight ρ must be in \(0, 1\]"),
        ({"z_norm_bound": 0.0}, "z_norm_bound must be > 0, or None"),
        ({"aux_step_limit": 2.0}, r"aux_step_limit must be in \(0, 2\) .*got 2.0"),
        ({"aux_step_limit": 0.0}, r"aux_step_limit must be in \(0, 2\)"),
        ({"subspace_rank": 0}, "subspace_rank must be an integer ≥ 1"),
        ({"sketch_resample_interval": 0}, "sketch_resample_interval must be an integer ≥ 1"),
        ({"bilevel_method": "soba"}, "bilevel_method must be 'bros' or 'masoba'"),
        ({"upper_level": "token"}, "upper_level must be"),
        ({"optim": "lomo"}, "not supported for the lower level"),
        ({"fsdp": "full_shard"}, "FSDP is not supported"),
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha=5.0 is not supported: NEFTune adds fresh random noise"),
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
    args = make_args(
        tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=6
    )
    train(args, *toy)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    other = make_args(tmp_path, max_steps=4, subspace_rank=4, per_device_train_batch_size=6)
    trainer = build(other, *toy)
    with pytest.raises(ValueError, match="rank: checkpoint=8 vs now=4"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_truncated_checkpoint_state_gives_clear_error(tmp_path, toy):
    args = make_args(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=6
    )
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


# ---------------------------------------------------------------------------------- domains missing from batches
def rare_domain_toy(toy) -> datasets.Dataset:
    """Domains A and B with 48 examples each and C with one: 97 examples, 49 batches of 2 per epoch."""
    train_ds = toy[0]
    keep = [i for i, d in enumerate(train_ds.with_format(None)["domain"]) if d != "C"]
    return train_ds.select(keep + [keep[-1] + 1])


@pytest.mark.parametrize("balanced", [False, True])
def test_domain_absent_from_batches_warns_once(tmp_path, toy, balanced):
    """Unbalanced batches of 2 show C's single example at most once in the first 49 steps, so 45 steps
    hold ≥ 22 consecutive steps without C (patience 20). Round-robin batches hold C every other step."""
    args = make_args(tmp_path, max_steps=45, per_device_train_batch_size=2, balanced_domain_batches=balanced)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(args, rare_domain_toy(toy), toy[1])
    starved = [str(w.message) for w in caught if "no example in the training batches" in str(w.message)]
    assert trainer._domain_monitor.patience == 20
    if balanced:
        assert starved == []
        return
    assert len(starved) == 1, starved  # once per domain, not once per step
    assert starved[0].startswith(
        "Domains ['C'] have had no example in the training batches for 20 consecutive"
    )
    assert "set balanced_domain_batches=True" in starved[0]
    assert "to at least 3" in starved[0]  # 2 examples per step < 3 domains: a larger batch is a fix too
    assert "drop the domain" in starved[0]


def test_presence_patience_grows_when_a_step_cannot_hold_every_domain():
    from bros_hf.validation import presence_patience

    assert presence_patience(num_domains=3, examples_per_step=24) == 20
    assert presence_patience(num_domains=64, examples_per_step=8) == 32  # round-robin visits every 8 steps


# ---------------------------------------------------------------------------------- label space
def relabel(dataset: datasets.Dataset, label_of) -> datasets.Dataset:
    plain = dataset.with_format(None)
    return plain.map(lambda ex, i: {"labels": label_of(i, ex["labels"])}, with_indices=True).with_format(
        "torch"
    )


def test_target_labels_outside_the_classifier_are_refused(tmp_path, toy):
    train_ds, target_ds = toy
    target = relabel(target_ds, lambda i, y: 7 if i == 3 else y)
    message = (
        r"The upper \(target\) set has 'labels' values \[7\] — labels outside the model's 4 classes \(0..3, read "
        r"from out_features of the model's last nn.Linear 'net.2'\)\. Remap the labels to 0..3 \(-100 ignores an "
        r"example\) or build the model with num_labels=8\."
    )
    with pytest.raises(ValueError, match=message):
        build(make_args(tmp_path), train_ds, target)


def test_negative_training_labels_are_refused_but_ignore_index_trains(tmp_path, toy):
    train_ds, target_ds = toy
    with pytest.raises(ValueError, match=r"training set has 'labels' values \[-3\]"):
        build(make_args(tmp_path), relabel(train_ds, lambda i, y: -3 if i == 0 else y), target_ds)
    ignored = relabel(train_ds, lambda i, y: -100 if i % 5 == 0 else y)
    trainer = train(make_args(tmp_path, max_steps=2, per_device_train_batch_size=6), ignored, target_ds)
    assert trainer.state.global_step == 2


def test_hf_classifier_labels_checked_against_num_labels(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    ids = [[1, 2, 3]] * 4
    data = datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": [0, 1, 2, 3], "domain": ["a", "a", "b", "b"]}
    )
    with pytest.raises(
        ValueError, match=r"\[3\] — labels outside the model's 3 classes .*model.config.num_labels"
    ):
        build_with(BertForSequenceClassification(config), make_args(tmp_path), data, data)


def test_torch_map_style_upper_set_checked_per_batch(tmp_path, toy):
    """A list of dicts is not scanned at construction; its collated batches are, before the model sees them."""
    train_ds, target_ds = toy
    target = [{"features": ex["features"], "labels": torch.tensor(9)} for ex in target_ds]
    trainer = build(make_args(tmp_path, max_steps=2, per_device_train_batch_size=6), train_ds, target)
    with pytest.raises(ValueError, match=r"upper \(target\) set has 'labels' values \[9\] — labels outside"):
        trainer.train()


def test_custom_per_example_loss_skips_the_label_check(tmp_path, toy):
    """A custom loss gives labels its own meaning (here: 10 regression-like bins on a 4-output head)."""

    class BinnedTrainer(BROSTrainer):
        def per_example_loss(self, outputs, labels):
            return (outputs["logits"].mean(-1) - labels.float() / 10) ** 2

    train_ds, target_ds = toy
    binned = relabel(train_ds, lambda i, y: i % 10)
    trainer = build_with(
        TinyClassifier(),
        make_args(tmp_path, max_steps=2, per_device_train_batch_size=6),
        binned,
        relabel(target_ds, lambda i, y: i % 10),
        trainer_cls=BinnedTrainer,
    )
    trainer.train()
    assert trainer.state.global_step == 2


def token_data(input_ids: list[list[int]], labels: list[list[int]]) -> datasets.Dataset:
    domains = ["x", "y"] * (len(input_ids) // 2)
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels, "domain": domains})


@pytest.mark.parametrize(
    "column, message",
    [
        (
            "labels",
            r"'labels' values \[40\] — token labels outside the model's vocabulary of 32 \(0..31, read from "
            r"model.get_output_embeddings\(\)\)\. Tokenize with the model's own tokenizer, or call "
            r"model.resize_token_embeddings",
        ),
        (
            "input_ids",
            r"'input_ids' values \[-100, 40\] — input_ids outside the model's 32 embedding rows .*pad "
            r"input_ids with tokenizer.pad_token_id",
        ),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, column, message):
    good = [[1, 2, 3, 4]] * 4
    bad = [[1, 2, 40, -100]] + good[1:]
    target = token_data(bad, good) if column == "input_ids" else token_data(good, bad)
    with pytest.raises(ValueError, match=r"upper \(target\) set has " + message):
        build_with(tiny_llama(), make_args(tmp_path), token_data(good, good), target)


def test_causal_lm_with_ignore_index_padding_trains(tmp_path):
    ids = [[1, 2, 3, 4], [5, 6, 7, 0]] * 4
    labels = [[1, 2, 3, 4], [5, 6, 7, -100]] * 4
    data = token_data(ids, labels)
    trainer = build_with(
        tiny_llama(), make_args(tmp_path, max_steps=2, per_device_train_batch_size=4), data, data
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_model_without_label_space_is_not_checked(tmp_path, toy):
    """No nn.Linear, no config, no embeddings: nothing to check against, so construction accepts any label."""

    class Bilinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(16, 4))

        def forward(self, features, labels=None):
            return {"logits": features @ self.weight}

    train_ds, target_ds = toy
    trainer = build_with(Bilinear(), make_args(tmp_path), train_ds, relabel(target_ds, lambda i, y: 7))
    assert trainer._label_space == LabelSpace()


# ---------------------------------------------------------------------------------- rank vs dimensions
def test_rank_that_sketches_nothing_is_refused(tmp_path, toy):
    """TinyClassifier's sketched dimensions are 16 (net.0) and 32 (net.2): r = 32 sketches neither."""
    trainer = build(make_args(tmp_path, max_steps=2, subspace_rank=32), *toy)
    message = (
        r"subspace_rank=32 is ≥ the sketched dimension of every trainable tensor, so bilevel_method='bros' would be "
        r"full-space MA-SOBA in disguise\. Lower subspace_rank below 32 \(the largest, of 'net.2.weight'\) or set "
        r"bilevel_method='masoba'\."
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    masoba = train(make_args(tmp_path, max_steps=2, subspace_rank=32, bilevel_method="masoba"), *toy)
    assert masoba.state.global_step == 2


def test_partly_full_space_tensors_are_logged_once(tmp_path, toy, caplog):
    caplog.set_level(logging.INFO, logger="bros_hf.validation")
    train(make_args(tmp_path, max_steps=2, subspace_rank=16), *toy)
    records = [r.getMessage() for r in caplog.records if r.name == "bros_hf.validation"]
    assert records == [
        "BROS subspace_rank=16: 3 of 4 trainable tensors (548 of 676 parameters) stay full-space (1-D or [1, ...], "
        "sketched dimension ≤ 16, or full_space_modules): net.0.weight, net.0.bias, net.2.bias."
    ]


# ---------------------------------------------------------------------------------- NaN / inf
def all_tensors(obj):
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from all_tensors(value)


def poison_features(dataset: datasets.Dataset, indices: set[int], value: float) -> datasets.Dataset:
    plain = dataset.with_format(None)
    return plain.map(
        lambda ex, i: {"features": [value] * len(ex["features"])} if i in indices else {}, with_indices=True
    ).with_format("torch")


@pytest.mark.parametrize("where", ["train_nan", "upper_inf"])
def test_non_finite_batches_are_skipped_and_never_saved(tmp_path, toy, where):
    """NaN features in some training batches, or inf features in one of the 4 upper batches of 6: those steps
    are skipped with a RuntimeWarning, the others train, and the checkpoint holds only finite numbers."""
    train_ds, target_ds = toy
    if where == "train_nan":
        train_ds = poison_features(train_ds, set(range(0, len(train_ds), 16)), float("nan"))
    else:
        target_ds = poison_features(target_ds, {0}, float("inf"))
    args = make_args(
        tmp_path,
        max_steps=8,
        per_device_train_batch_size=6,
        upper_batch_size=6,
        save_strategy="steps",
        save_steps=8,
        optim="adamw_torch",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(args, train_ds, target_ds)
    skipped = [w for w in caught if issubclass(w.category, RuntimeWarning) and "Non-finite" in str(w.message)]
    assert 0 < len(skipped) < 8, [str(w.message) for w in caught]
    assert "Look for NaN/inf in that step's training or upper batch" in str(skipped[0].message)
    assert trainer.upper.num_updates == 8 - len(skipped)

    checkpoint = tmp_path / "out" / "checkpoint-8"
    weights = load_file(checkpoint / "model.safetensors")
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    bros_state = torch.load(checkpoint / "bros_state_rank0.pt", weights_only=True)
    for name, saved in {"model": weights, "optimizer": optimizer, "bros_state": bros_state}.items():
        tensors = [t for t in all_tensors(saved) if t.is_floating_point()]
        assert tensors, name
        assert all(bool(torch.isfinite(t).all()) for t in tensors), name
    # The walk above covered the state that matters: AdamW moments, z, λ (logits) and h (momentum).
    assert optimizer["state"], "the non-skipped steps must have built AdamW state"
    assert set(bros_state["engine"]["z"]) == {n for n, _ in trainer.model.named_parameters()}
    assert {"logits", "momentum"} <= set(bros_state["engine"]["upper"])
    assert bool(bros_state["engine"]["upper"]["momentum"].abs().sum() > 0), "h must have been updated"


# ---------------------------------------------------------------------------------- tampered checkpoint
class CodeExecutingPayload:
    """Unpickling this calls open(marker, "w"): it creates a file, proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_state_runs_no_code(tmp_path, toy):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CodeExecutingPayload(str(probe))))
    assert probe.exists(), "the payload must be live for this test to mean anything"

    args = make_args(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=6
    )
    train(args, *toy)
    state = tmp_path / "out" / "checkpoint-2" / "bros_state_rank0.pt"
    marker = tmp_path / "payload_ran"
    torch.save({"engine": CodeExecutingPayload(str(marker))}, state)
    trainer = build(make_args(tmp_path, max_steps=4, per_device_train_batch_size=6), *toy)
    with pytest.raises(ValueError, match="Cannot read bilevel state .*bros_state_rank0.pt"):
        trainer.train(resume_from_checkpoint=str(state.parent))
    assert not marker.exists(), "loading a checkpoint must never execute pickled code"


@pytest.mark.parametrize(("precision", "eps"), [({}, 2e-3), ({"bf16": True}, 2e-2)])
def test_hessian_mode_auto_uses_finite_differences_with_a_step_for_the_precision(tmp_path, precision, eps):
    # In bf16 round-off swamps differences at eps 2e-3 (measured: 0.33 relative error of the Hessian action);
    # at 2e-2 it is 3-5 %, and the learned mixtures matched double backward's (benchmarks/README.md).
    args = make_args(tmp_path, **precision)
    assert args.hessian_mode == "auto" and args.resolved_hessian_mode() == "finite_difference"
    hparams = args.bilevel_hyperparameters()
    assert (hparams.hessian_mode, hparams.fd_eps) == ("finite_difference", eps)
    assert make_args(tmp_path, hessian_mode="autograd", **precision).resolved_hessian_mode() == "autograd"
    assert make_args(tmp_path, finite_difference_eps=5e-3, **precision).bilevel_hyperparameters().fd_eps == 5e-3


def test_finite_difference_step_follows_what_the_run_actually_uses(tmp_path, toy, monkeypatch):
    """accelerate's mixed precision from the environment (as `accelerate launch --mixed_precision bf16` sets it),
    or weights loaded in bf16, give the half-precision step even though the config says neither."""
    trainer = build_with(TinyClassifier().to(torch.bfloat16), make_args(tmp_path, max_steps=1), *toy)
    trainer.create_optimizer()
    assert (trainer.engine.hparams.hessian_mode, trainer.engine.hparams.fd_eps) == ("finite_difference", 2e-2)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = build(make_args(tmp_path, max_steps=1), *toy)
        assert trainer.accelerator.mixed_precision == "bf16"
        trainer.create_optimizer()
        assert trainer.engine.hparams.fd_eps == 2e-2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="fp16 mixed precision is not supported.*bf16=True"):
        make_args(tmp_path, fp16=True)


def test_batches_without_labels_name_the_fix(tmp_path, toy):
    train_ds, target_ds = toy
    unlabeled = target_ds.remove_columns("labels")
    with pytest.raises(ValueError, match=r"needs `labels` in every training and upper batch.*Add a labels column"):
        train(make_args(tmp_path, max_steps=1), train_ds, unlabeled)


def test_evaluation_only_without_train_or_upper_set(tmp_path, toy):
    """`--do_eval` without `--do_train`: no training or upper set needed; training is then refused clearly."""
    trainer = BROSTrainer(model=TinyClassifier(), args=make_args(tmp_path), eval_dataset=toy[1])
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    with pytest.raises(ValueError, match="evaluation and prediction only; pass both"):
        trainer.train()
    with pytest.raises(ValueError, match="needs an upper_dataset"):
        BROSTrainer(model=TinyClassifier(), args=make_args(tmp_path), train_dataset=toy[0])


def test_optimizers_argument_names_the_alternative(tmp_path, toy):
    model = TinyClassifier()
    ready = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        BROSTrainer(model=model, args=make_args(tmp_path), train_dataset=toy[0], upper_dataset=toy[1], optimizers=(ready, None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(ready, lambda step: 1.0)
    with pytest.raises(ValueError, match="lr_scheduler_type and lr_scheduler_kwargs"):
        BROSTrainer(model=model, args=make_args(tmp_path), train_dataset=toy[0], upper_dataset=toy[1],
                    optimizers=(None, scheduler))
    trainer = BROSTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=toy[0],
        upper_dataset=toy[1],
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    )
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, torch.optim.SGD) and inner.defaults["momentum"] == 0.9


def test_lower_subspace_redrawn_every_step_with_adamw_says_what_it_runs(tmp_path, toy):
    args = make_args(tmp_path, max_steps=1, sketch_resample_interval=1)
    trainer = build(args, *toy)
    with pytest.warns(UserWarning, match=r"sketch_resample_interval=1 with optim='adamw.*optim='sgd'"):
        trainer.create_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(make_args(tmp_path, max_steps=1, sketch_resample_interval=1, optim="sgd"), *toy).create_optimizer()


def test_per_example_loss_of_the_wrong_shape_is_an_error(tmp_path, toy):
    """One loss for a whole batch (as a padding-free row of several examples gives) would broadcast against the
    examples' weights and leave the mixture uniform without a word: it must raise."""

    class BatchMeanLoss(BROSTrainer):
        def per_example_loss(self, outputs, labels):
            return super().per_example_loss(outputs, labels).mean().reshape(1)

    trainer = build_with(TinyClassifier(), make_args(tmp_path, max_steps=1), *toy, trainer_cls=BatchMeanLoss)
    with pytest.raises(ValueError, match=r"per-example loss has shape \(1,\) but the batch has 24 examples.*Padding-free"):
        trainer.train()
