"""Domain mode on a streamed datasets.IterableDataset: balanced round-robin batches, the map-style run's
mixture, exact resume from a checkpoint, and clear errors for what a stream cannot tell."""

from __future__ import annotations

import datasets
import pytest
import torch

from bros_hf import BROSTrainer
from bros_hf.data import KEY_COLUMN, attach_keys
from tests.test_trainer import make_args
from tests.toy import TinyClassifier, three_domain_toy

DOMAINS = ["A", "B", "C"]


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy(n_per_domain=96, n_target=96)


def model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def stream_of(dataset: datasets.Dataset) -> datasets.IterableDataset:
    return dataset.to_iterable_dataset(num_shards=4).shuffle(seed=0, buffer_size=64)


def test_balanced_stream_is_round_robin_over_domains(toy):
    stream, names = attach_keys(stream_of(toy[0]), "domain", "domain", DOMAINS)
    assert names == DOMAINS
    keys = [example[KEY_COLUMN] for _, example in zip(range(60), stream, strict=False)]
    assert keys == [0, 1, 2] * 20
    domains = [example["domain"] for _, example in zip(range(60), stream, strict=False)]
    assert domains == DOMAINS * 20


def test_class_label_column_names_the_domains(toy):
    labelled = toy[0].cast_column("domain", datasets.ClassLabel(names=DOMAINS))
    stream, names = attach_keys(labelled.to_iterable_dataset(), "domain", "domain", None)
    assert names == DOMAINS
    assert [example[KEY_COLUMN] for _, example in zip(range(6), stream, strict=False)] == [0, 1, 2, 0, 1, 2]


def test_stream_without_declared_domains_is_refused(tmp_path, toy):
    with pytest.raises(ValueError, match=r"declare its domains with BROSConfig\(domains="):
        BROSTrainer(model=TinyClassifier(), args=make_args(tmp_path), train_dataset=stream_of(toy[0]),
                    upper_dataset=toy[1])


def test_undeclared_domain_in_the_stream_is_an_error(toy):
    stream, _ = attach_keys(stream_of(toy[0]), "domain", "domain", ["A", "B"], balanced=False)
    with pytest.raises(ValueError, match="domain 'C', which is not among the declared domains"):
        list(stream)


def test_declared_domain_missing_from_the_stream_is_an_error(toy):
    with pytest.raises(ValueError, match=r"Declared domains \['D'\] have no examples"):
        attach_keys(stream_of(toy[0]), "domain", "domain", DOMAINS + ["D"])


def test_sample_mode_still_needs_a_map_style_set(tmp_path, toy):
    with pytest.raises(ValueError, match="Sample mode learns one weight per example index"):
        BROSTrainer(model=TinyClassifier(), args=make_args(tmp_path, upper_level="sample"),
                    train_dataset=stream_of(toy[0]), upper_dataset=toy[1])


def train_on(tmp_path, train, target, **overrides):
    settings = dict(domains=DOMAINS, max_steps=120, per_device_train_batch_size=24)
    settings.update(overrides)
    trainer = BROSTrainer(model=model(), args=make_args(tmp_path, **settings), train_dataset=train,
                          upper_dataset=target)
    trainer.train(resume_from_checkpoint=overrides.get("resume"))
    return trainer


def tv(a: dict[str, float], b: dict[str, float]) -> float:
    return 0.5 * sum(abs(a[d] - b[d]) for d in a)


def test_streamed_run_learns_the_map_style_runs_mixture(tmp_path, toy, one_thread):
    mapped = train_on(tmp_path / "map", *toy).mixture_weights()
    streamed = train_on(tmp_path / "stream", stream_of(toy[0]), toy[1]).mixture_weights()
    assert streamed["A"] > 0.6, streamed
    assert tv(mapped, streamed) < 0.05, (mapped, streamed)


def test_streamed_run_resumes_exactly(tmp_path, toy, one_thread):
    settings = dict(max_steps=20, save_strategy="steps", save_steps=10)
    whole = train_on(tmp_path / "whole", stream_of(toy[0]), toy[1], **settings)
    first = train_on(tmp_path / "resumed", stream_of(toy[0]), toy[1], **{**settings, "max_steps": 20})
    checkpoint = str(tmp_path / "resumed" / "out" / "checkpoint-10")
    args = make_args(tmp_path / "resumed", domains=DOMAINS, per_device_train_batch_size=24, **settings)
    resumed = BROSTrainer(model=model(), args=args, train_dataset=stream_of(toy[0]), upper_dataset=toy[1])
    resumed.train(resume_from_checkpoint=checkpoint)
    assert first.mixture_history == whole.mixture_history
    assert torch.allclose(torch.tensor(resumed.mixture_history), torch.tensor(whole.mixture_history), atol=1e-6)
