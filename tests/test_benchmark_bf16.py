"""benchmarks.bf16_mixtures: a bf16 (autocast) mixture run per second-order mode, with its distance to w*."""

from __future__ import annotations

import json
import math

from benchmarks import bf16_mixtures


def test_quick_bf16_run_reports_each_mode(tmp_path, one_thread):
    modes = ["fd (bf16 default step)", "autograd"]
    rows = bf16_mixtures.main(["--output_dir", str(tmp_path), "--tasks", "rules3", "--seeds", "0", "--quick",
                               "--modes", *modes])
    assert [row["mode"] for row in rows] == modes
    assert all(math.isfinite(row["tv"]) and abs(sum(row["weights"]) - 1) < 1e-3 for row in rows)
    assert json.loads((tmp_path / "bf16_mixtures.json").read_text()) == rows
