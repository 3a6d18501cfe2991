"""initial_sample_weights: a sample-mode run whose weights start at those an earlier run learned (the refit)."""

from __future__ import annotations

import digits  # recipes/digits.py (tests/conftest.py puts recipes/ on sys.path)
import numpy as np
import pytest
import torch

from benchmarks.sample_weights import accuracy
from bros_hf import BROSConfig
from bros_hf.core.upper import SAMPLE_LOGIT_BOUND, SampleWeights
from bros_hf.export import sample_weights_payload, write_json_atomic
from tests.test_trainer_sample_mode import digits_trainer, sample_mode_args

pytest.importorskip("sklearn")


def _write_weights(path, weights, upper_updates: int = 10) -> str:
    write_json_atomic(str(path), sample_weights_payload(list(weights), list(weights), 10, upper_updates))
    return str(path)


def test_from_weights_starts_every_logit_at_the_weights_logit_within_the_bounds():
    w = torch.tensor([0.5, 0.9, 0.01, 1e-12, 1.0 - 1e-12], dtype=torch.float64)
    variable = SampleWeights.from_weights(w)
    expected = torch.logit(w).clamp(-SAMPLE_LOGIT_BOUND, SAMPLE_LOGIT_BOUND).float()
    torch.testing.assert_close(variable.logits, expected)
    torch.testing.assert_close(variable.weights()[:3], w[:3].float())
    assert variable.logits.dtype == torch.float32 and variable.num_updates == 0


@pytest.mark.parametrize("weights", [[0.5, 1.0], [0.0, 0.5], [0.5, float("nan")], [[0.5]], []])
def test_from_weights_refuses_values_that_are_not_sigmoid_weights(weights):
    with pytest.raises(ValueError, match="Initial sample weights"):
        SampleWeights.from_weights(torch.tensor(weights, dtype=torch.float64))


def test_the_trainer_starts_from_the_file_and_the_weights_keep_moving(tmp_path, one_thread):
    data = digits.load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=0)
    rng = np.random.default_rng(0)
    initial = rng.uniform(0.05, 0.95, size=data.num_train)
    path = _write_weights(tmp_path / "w.json", initial)
    args = sample_mode_args(tmp_path, initial_sample_weights=path, max_steps=20, upper_warmup_steps=0)
    trainer = digits_trainer(args, data)
    np.testing.assert_allclose(trainer.final_sample_weights().numpy(), initial, rtol=1e-6)
    trainer.train()
    final = trainer.final_sample_weights().numpy()
    moved = np.abs(final - initial) > 1e-4
    assert 0.3 < moved.mean() < 1.0  # the examples drawn in 20 batches of 50 moved; the others kept theirs
    np.testing.assert_allclose(final[~moved], initial[~moved], rtol=1e-5)


def test_bad_initial_weights_files_are_refused_with_the_fix(tmp_path):
    data = digits.load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=0)

    def build(path: str) -> None:
        digits_trainer(sample_mode_args(tmp_path, initial_sample_weights=path), data)

    with pytest.raises(ValueError, match="holds 5 weights but the training set has 997 examples"):
        build(_write_weights(tmp_path / "short.json", [0.5] * 5))
    with pytest.raises(ValueError, match="no upper-level update"):
        build(_write_weights(tmp_path / "unmoved.json", [0.5] * data.num_train, upper_updates=0))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="use upper_level='sample'"):
        BROSConfig(output_dir=str(tmp_path), upper_level="domain", initial_sample_weights=str(tmp_path / "w.json"))


def test_refit_on_a_fresh_model_beats_the_first_runs_model(tmp_path, one_thread):
    """Pair-flip noise (y → y+1), 35 %: a first BROSTrainer run learns weights (package upper-level defaults);
    a second one on a fresh model starts from them. Its weights act from the first step, before the model has fit
    the corrupted labels, so its model is better than the first run's (measured: 0.902 vs 0.884) and its weights
    rank about as well. Were the initial weights ignored, the second run would repeat the first exactly."""
    data = digits.load_noisy_digits(noise_rate=0.35, noise_kind="pair", seed=1)

    def run(name: str, **overrides) -> tuple[float, float]:
        trainer = digits_trainer(sample_mode_args(tmp_path / name, **overrides), data)
        trainer.train()
        auroc = digits.detection_metrics(trainer.sample_weights(), data.is_corrupted)["auroc"]
        return accuracy(trainer.model, data.x_test, data.y_test), auroc

    first_accuracy, first_auroc = run("first")
    refit_accuracy, refit_auroc = run(
        "refit", initial_sample_weights=str(tmp_path / "first" / "out" / "sample_weights.json")
    )
    assert refit_accuracy > first_accuracy + 0.01, (refit_accuracy, first_accuracy)
    assert refit_auroc > first_auroc - 0.01, (refit_auroc, first_auroc)


def test_a_resumed_refit_continues_from_the_checkpoint_not_from_the_file(tmp_path, one_thread):
    """The file only sets where λ starts: resuming from a checkpoint restores the checkpoint's λ (and h, z, θ), so the
    resumed run ends bit-identical to the uninterrupted one."""
    data = digits.load_noisy_digits(noise_rate=0.4, noise_kind="uniform", seed=0)
    path = _write_weights(tmp_path / "w.json", np.random.default_rng(0).uniform(0.05, 0.95, size=data.num_train))
    settings = dict(initial_sample_weights=path, max_steps=20, upper_warmup_steps=0, save_strategy="steps", save_steps=10)
    uninterrupted = digits_trainer(sample_mode_args(tmp_path / "a", **settings), data)
    uninterrupted.train()
    resumed = digits_trainer(sample_mode_args(tmp_path / "b", **settings), data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-10"))
    assert torch.equal(resumed.upper.logits, uninterrupted.upper.logits)
    assert torch.equal(resumed.upper.momentum, uninterrupted.upper.momentum)
