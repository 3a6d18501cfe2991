"""bros_hf.selection: reading sample_weights.json back and keeping the examples the run trusts."""

from __future__ import annotations

import json

import datasets
import digits  # recipes/digits.py (tests/conftest.py puts recipes/ on sys.path)
import numpy as np
import pytest
import torch

from benchmarks.sample_weights import accuracy
from bros_hf.export import sample_weights_payload, write_json_atomic
from bros_hf.selection import choose_threshold, keep_examples, kept_indices, load_sample_weights
from tests.test_trainer_sample_mode import digits_trainer, sample_mode_args
from tests.toy import TinyClassifier

pytest.importorskip("sklearn")


def test_kept_indices_is_the_threshold_rule():
    assert kept_indices([0.9, 0.1, 0.5, 0.49], threshold=0.5) == [0, 2]
    assert kept_indices(np.array([0.2, 0.3]), threshold=0.25) == [1]


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, float("nan")])
def test_threshold_outside_the_open_interval_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold must be in"):
        kept_indices([0.5], threshold=threshold)


def test_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="finite 1-D"):
        kept_indices([0.5, float("nan")])


def test_keep_examples_refuses_weights_of_another_dataset_and_empty_selections():
    ds = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    with pytest.raises(ValueError, match="2 weights for a dataset of 3 rows"):
        keep_examples(ds, [0.9, 0.9])
    with pytest.raises(ValueError, match="No example has weight"):
        keep_examples(ds, [0.1, 0.2, 0.3])
    assert keep_examples(ds, [0.9, 0.1, 0.6])["x"] == [1, 3]
    rows = [{"x": 1}, {"x": 2}, {"x": 3}]  # a torch map-style dataset (no .select): a Subset
    kept = keep_examples(rows, [0.9, 0.1, 0.6])
    assert isinstance(kept, torch.utils.data.Subset) and [kept[i]["x"] for i in range(len(kept))] == [1, 3]


def test_choose_threshold_keeps_the_best_scoring_set_and_breaks_ties_toward_more_data():
    weights = np.array([0.9, 0.7, 0.55, 0.3, 0.85])
    seen = []

    def score(keep):  # a stand-in for "train on these, accuracy on the upper set": 4 examples score best
        seen.append(keep)
        return {5: 0.80, 4: 0.90, 3: 0.90, 2: 0.70}[len(keep)]

    choice = choose_threshold(weights, score, thresholds=(0.8, 0.2, 0.5, 0.65, 0.95))
    assert seen == [[0, 1, 2, 3, 4], [0, 1, 2, 4], [0, 1, 4], [0, 4]]  # increasing thresholds; 0.95 keeps nothing
    assert choice.threshold == 0.5  # 0.5 and 0.65 tie at 0.90: the lower one keeps more data
    assert choice.scores == {0.2: 0.80, 0.5: 0.90, 0.65: 0.90, 0.8: 0.70}
    assert choice.kept == {0.2: 5, 0.5: 4, 0.65: 3, 0.8: 2}


def test_choose_threshold_refuses_no_candidates_empty_selections_and_non_finite_scores():
    weights = np.array([0.6, 0.4])
    with pytest.raises(ValueError, match="thresholds is empty"):
        choose_threshold(weights, lambda keep: 1.0, thresholds=())
    with pytest.raises(ValueError, match=r"No example has weight ≥ 0.7; lower the thresholds"):
        choose_threshold(weights, lambda keep: 1.0, thresholds=(0.7, 0.9))
    with pytest.raises(ValueError, match="score returned nan for threshold 0.5"):
        choose_threshold(weights, lambda keep: float("nan"), thresholds=(0.5,))


def test_load_refuses_incomplete_files_and_runs_that_never_moved(tmp_path):
    path = str(tmp_path / "sample_weights.json")
    write_json_atomic(path, sample_weights_payload([0.5, 0.5], [0.5, 0.5], step=10, upper_updates=0))
    with pytest.raises(ValueError, match="upper_updates = 0"):
        load_sample_weights(path)
    payload = sample_weights_payload([0.2, 0.8, 0.6], [0.1, 0.9, 0.7], step=10, upper_updates=5)
    del payload["weights"]["1"]
    write_json_atomic(path, payload)
    with pytest.raises(ValueError, match="not 0..1"):
        load_sample_weights(path)
    (tmp_path / "other.json").write_text(json.dumps({"domains": ["a"]}))
    with pytest.raises(ValueError, match="no 'weights' entry"):
        load_sample_weights(str(tmp_path / "other.json"))
    (tmp_path / "mixture.json").write_text(json.dumps({"domains": ["a"], "weights": {"a": 1.0}}))
    with pytest.raises(ValueError, match="is a domain mixture"):
        load_sample_weights(str(tmp_path / "mixture.json"))


def _train_plain(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 600) -> torch.nn.Module:
    """Full-batch-ish AdamW on a fresh TinyClassifier: the second stage's plain training."""
    torch.manual_seed(seed)
    model = TinyClassifier(in_dim=64, hidden=64, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        batch = torch.randint(len(xs), (50,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(xs[batch])["logits"], ys[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_second_stage_on_kept_examples_beats_training_on_all(tmp_path, one_thread):
    """Pair-flip noise (y → y+1), 35 %: learn weights with BROSTrainer (package upper-level defaults), write
    sample_weights.json, read it back, keep w ≥ 0.5 and train a fresh model on those examples only. The kept
    set must be mostly clean and the fresh model must beat the same training on every noisy example."""
    data = digits.load_noisy_digits(noise_rate=0.35, noise_kind="pair", seed=1)
    trainer = digits_trainer(sample_mode_args(tmp_path, bilevel_method="bros"), data)
    trainer.train()

    weights = load_sample_weights(str(tmp_path / "out" / "sample_weights.json"))
    np.testing.assert_allclose(weights, trainer.sample_weights().numpy(), rtol=1e-6)
    kept = keep_examples(datasets.Dataset.from_dict({"row": list(range(data.num_train))}), weights)["row"]
    kept_corrupted = float(data.is_corrupted[kept].mean())
    assert kept_corrupted < 0.1, kept_corrupted  # 35 % before selection
    assert len(kept) > 0.5 * float((~data.is_corrupted).sum())

    on_all = accuracy(_train_plain(data.x_train, data.y_train, seed=0), data.x_test, data.y_test)
    on_kept = accuracy(
        _train_plain(data.x_train[kept], data.y_train[kept], seed=0), data.x_test, data.y_test
    )
    assert on_kept > on_all + 0.05, (on_kept, on_all)
