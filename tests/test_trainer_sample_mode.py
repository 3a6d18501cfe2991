"""Acceptance: sample mode on digits with 40% label noise through the real Trainer.

A tiny MLP (tests/toy.py ``TinyClassifier``, 64-64-10) learns on digits whose training labels are 40%
uniformly corrupted; BROSTrainer(upper_level="sample") learns one weight per training example
against the clean validation split. The learned weights must separate clean from corrupted examples:
AUROC ≥ 0.9. Measured with these settings (seeds 0, 1, 2; the seed drives both the noise and the
model): AUROC 0.982 / 0.981 / 0.988 for bros, 0.983 / 0.988 / 0.995 for masoba; test accuracy
0.87-0.94; about 5 s each on one idle CPU thread.
"""

from __future__ import annotations

import json

import digits  # recipes/digits.py (tests/conftest.py puts recipes/ on sys.path)
import pytest
import torch

from benchmarks.sample_weights import as_dataset
from bros_hf import BROSConfig, BROSTrainer
from tests.test_trainer import make_args
from tests.toy import TinyClassifier

pytest.importorskip("sklearn")


def sample_mode_args(tmp_path, **overrides) -> BROSConfig:
    """tests.test_trainer.make_args with the sample-mode settings of this test."""
    settings = dict(
        upper_level="sample",
        bilevel_method="bros",
        subspace_rank=16,
        max_steps=300,
        per_device_train_batch_size=50,
        learning_rate=3e-3,
        optim="adamw_torch",
        upper_warmup_steps=50,
        logging_steps=100,
    )
    settings.update(overrides)
    return make_args(tmp_path, **settings)


def digits_trainer(args: BROSConfig, data: digits.NoisyDigits) -> BROSTrainer:
    """A BROSTrainer on the noisy digits (target = the clean validation split) with a fresh 64-64-10 MLP drawn
    from ``args.seed``."""
    torch.manual_seed(args.seed)
    return BROSTrainer(
        model=TinyClassifier(in_dim=64, hidden=64, num_classes=10),
        args=args,
        train_dataset=as_dataset(data.x_train, data.y_train),
        upper_dataset=as_dataset(data.x_val, data.y_val),
    )


@pytest.mark.parametrize("method", ["bros", "masoba"])
def test_sample_mode_detects_label_noise_on_digits(tmp_path, one_thread, method):
    data = digits.load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=0)
    assert 0.35 < data.is_corrupted.mean() < 0.45
    trainer = digits_trainer(sample_mode_args(tmp_path, bilevel_method=method), data)
    model = trainer.model
    trainer.train()

    weights = trainer.sample_weights()
    assert weights.shape == (data.num_train,)
    assert bool(((weights > 0) & (weights < 1)).all())
    metrics = digits.detection_metrics(weights, data.is_corrupted)
    assert metrics["auroc"] >= 0.9, metrics
    corrupted = torch.from_numpy(data.is_corrupted)
    assert float(weights[~corrupted].mean()) > float(weights[corrupted].mean()) + 0.2

    with torch.no_grad():
        logits = model(torch.from_numpy(data.x_test))["logits"]
    accuracy = float((logits.argmax(-1) == torch.from_numpy(data.y_test)).float().mean())
    assert accuracy > 0.8, accuracy

    exported = json.loads((tmp_path / "out" / "sample_weights.json").read_text())
    assert exported["step"] == 300
    assert len(exported["weights"]) == data.num_train
    assert exported["weights"]["0"] == pytest.approx(float(weights[0]))
