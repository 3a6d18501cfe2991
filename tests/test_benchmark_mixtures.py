"""benchmarks/mixtures.py: a tiny end-to-end run (files, JSON schema, TV), and the baselines' updates
moving weight in the right direction on constructed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.mixture_baselines import (
    BalancedBatches,
    UniformBatches,
    doge,
    doge_update,
    domain_excess,
    doremi,
    doremi_update,
    normalized_alignment,
)
from benchmarks.mixture_tasks import MLPClassifier, rule_mixture_task, total_variation
from benchmarks.mixtures import METHODS, main, stratified_counts


def test_total_variation_by_hand():
    assert total_variation(np.array([0.5, 0.5, 0.0]), np.array([1.0, 0.0, 0.0])) == pytest.approx(0.5)
    # ½ (0.05 + 0.25 + 0.05 + 0.25) = 0.3
    assert total_variation({"a": 0.2, "b": 0.5, "c": 0.3, "d": 0.0}, np.full(4, 0.25)) == pytest.approx(0.3)
    assert total_variation(np.array([0.6, 0.4, 0.0]), np.array([0.6, 0.4, 0.0])) == 0.0
    assert total_variation(np.array([0.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(1.0)


def test_stratified_counts_sum_and_proportions():
    counts = stratified_counts(np.array([0.6, 0.4, 0.0]), 1000)
    assert counts.tolist() == [600, 400, 0]
    counts = stratified_counts(np.array([1.0, 1.0, 1.0]), 10)  # normalised; remainders go to one domain each
    assert counts.sum() == 10 and sorted(counts.tolist()) == [3, 3, 4]


def test_doremi_update_upweights_the_domain_with_excess_loss():
    weights = torch.full((3,), 1 / 3)
    updated = doremi_update(weights, torch.tensor([0.5, 0.0, 0.0]))
    assert updated.sum().item() == pytest.approx(1.0)
    assert updated[0] > 1 / 3 > updated[1] and updated[1] == pytest.approx(updated[2].item())
    # exp(0.5) / (exp(0.5) + 2), smoothed with c = 1e-3 towards 1/3
    expected = (1 - 1e-3) * math.exp(0.5) / (math.exp(0.5) + 2) + 1e-3 / 3
    assert updated[0].item() == pytest.approx(expected)
    # smoothing keeps every weight ≥ c / K even after a huge excess elsewhere
    assert doremi_update(weights, torch.tensor([100.0, 0.0, 0.0])).min().item() >= 1e-3 / 3 - 1e-9


def test_domain_excess_is_clipped_per_example():
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5])
    reference = torch.tensor([2.0, 1.0, 1.0, 1.0])
    domain_of = torch.tensor([0, 0, 1, 1])
    # domain 0: mean(max(-1, 0), max(2, 0)) = 1; domain 1: mean(1, 0) = 0.5; domain 2 absent: 0
    assert domain_excess(losses, reference, domain_of, 3).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_doge_update_follows_the_alignment_with_the_target():
    target = [torch.tensor([1.0, 0.0])]
    domains = [[torch.tensor([2.0, 0.0])], [torch.tensor([-1.0, 0.0])], [torch.tensor([0.0, 3.0])]]
    alignment = normalized_alignment(domains, target)
    # inner products (2, -1, 0) over their RMS sqrt(5/3)
    assert alignment.tolist() == pytest.approx([2 / math.sqrt(5 / 3), -1 / math.sqrt(5 / 3), 0.0])
    assert normalized_alignment(domains, [torch.tensor([10.0, 0.0])]).tolist() == pytest.approx(
        alignment.tolist()
    )
    updated = doge_update(torch.full((3,), 1 / 3), alignment, eta=0.1)
    assert updated.sum().item() == pytest.approx(1.0)
    assert updated[0] > updated[2] > updated[1]


def rule_columns(dataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tensor columns of a rule_mixture_task set and the domain id of every row (D0 → 0, ...)."""
    rows = dataset.with_format(None)[:]
    columns = {"features": torch.tensor(rows["features"]), "labels": torch.tensor(rows["labels"])}
    return columns, torch.tensor([int(d[1:]) for d in rows["domain"]])


def test_doge_learns_more_weight_for_the_domain_that_matches_the_target(one_thread):
    """Two rule domains, target labelled by rule D0 only: the time-averaged DoGE weight of D0 is > 1/2."""
    train, target, _ = rule_mixture_task((1.0, 0.0), n_per_domain=200, n_target=200, dim=4, classes=3, seed=0)
    (columns, domain_ids), (target_columns, _) = rule_columns(train), rule_columns(target)
    torch.manual_seed(0)
    weights = doge(
        MLPClassifier(4, 16, 3),
        BalancedBatches(columns, domain_ids, 2, 32, seed=0),
        UniformBatches(target_columns, 32, seed=1),
        num_domains=2,
        lr=3e-3,
        steps=60,
    )
    assert weights.sum() == pytest.approx(1.0) and weights[0] > 0.5, weights


def test_doremi_learns_more_weight_for_the_domain_where_the_proxy_lags(one_thread):
    """D0 is learnable, D1 has random labels (the reference cannot beat the proxy there): the proxy lags
    the uniform-mixture reference on D0 only, so DoReMi's time-averaged weight of D0 is > 1/2."""
    train, _, _ = rule_mixture_task((1.0, 0.0), n_per_domain=200, n_target=10, dim=4, classes=3, seed=0)
    columns, domain_ids = rule_columns(train)
    columns["labels"][domain_ids == 1] = torch.randint(
        3, (int((domain_ids == 1).sum()),), generator=torch.Generator().manual_seed(0)
    )

    def fresh_model() -> MLPClassifier:
        torch.manual_seed(0)
        return MLPClassifier(4, 16, 3)

    weights = doremi(
        fresh_model, lambda: BalancedBatches(columns, domain_ids, 2, 32, seed=0), 2, lr=3e-3, steps=60
    )
    assert weights.sum() == pytest.approx(1.0) and weights[0] > 0.5, weights


def test_tiny_end_to_end_run(tmp_path, one_thread):
    out = tmp_path / "mixtures"
    main(["--output_dir", str(out), "--tasks", "rules3", "lm2", "--steps", "4", "--quick"])
    for name in ("mixtures.json", "mixtures.md", "mixtures.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    payload = json.loads((out / "mixtures.json").read_text())
    assert {
        "command",
        "quick",
        "seeds",
        "threads",
        "versions",
        "tasks",
        "runs",
        "summary",
        "wall_time_s",
    } <= set(payload)
    assert payload["versions"]["torch"] == torch.__version__ and payload["seeds"] == [0]
    assert payload["command"].startswith("python -m benchmarks.mixtures")
    assert set(payload["tasks"]) == {"rules3", "lm2"}
    assert (
        payload["tasks"]["rules3"]["w_star"] == [0.6, 0.4, 0.0] and payload["tasks"]["rules3"]["steps"] == 4
    )
    assert len(payload["runs"]) == 2 * len(METHODS) and len(payload["summary"]) == 2 * len(METHODS)
    for run in payload["runs"]:
        info = payload["tasks"][run["task"]]
        weights = np.array([run["mixture"][d] for d in info["domains"]])
        assert weights.sum() == pytest.approx(1.0, abs=1e-3) and (weights >= 0).all()
        assert run["tv"] == pytest.approx(total_variation(weights, np.array(info["w_star"])), abs=1e-3)
        assert math.isfinite(run["target_loss"]) and run["target_loss"] > 0
        assert run["wall_time_s"] >= 0
    star = [r for r in payload["runs"] if r["method"] == "w*"]
    assert all(r["tv"] == pytest.approx(0.0, abs=1e-6) for r in star)
    assert isinstance(payload["bros_above_best_baseline"], list)
    table = (out / "mixtures.md").read_text()
    assert "| task | method | learned mixture | TV to w* | fresh-model target loss | wall time s |" in table
    assert table.count("| rules3 |") == len(METHODS)
