"""benchmarks.sample_weights end to end on a tiny budget: every run, the files, and gap closed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

from benchmarks import sample_weights  # noqa: E402


def test_tiny_run_writes_every_run_and_the_gap_closed(tmp_path, one_thread):
    payload = sample_weights.main(["--output_dir", str(tmp_path), "--steps", "12", "--noise_kind", "uniform"])
    saved = json.loads((tmp_path / "sample_weights.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(payload["runs"]))
    runs = saved["runs"][0]
    assert set(runs) == {"plain", "oracle"} | {f"{m}{s}" for m in ("bros", "masoba") for s in ("", "_second_stage", "_refit")}
    plain, oracle = runs["plain"]["test_accuracy"], runs["oracle"]["test_accuracy"]
    for name, run in runs.items():
        assert run["gap_closed"] == pytest.approx((run["test_accuracy"] - plain) / (oracle - plain)), name
    assert runs["oracle"]["num_train"] < runs["plain"]["num_train"] == runs["bros"]["num_train"]
    for method in ("bros", "masoba"):
        assert 0.0 <= runs[method]["auroc"] <= 1.0
        assert 0 < runs[f"{method}_second_stage"]["num_train"] <= runs["plain"]["num_train"]
        assert 0.0 <= runs[f"{method}_refit"]["auroc"] <= 1.0
    table = (tmp_path / "sample_weights.md").read_text()
    assert "| bros_second_stage |" in table and "| masoba_refit |" in table and "python -m benchmarks.sample_weights" in table
