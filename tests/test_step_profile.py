"""benchmarks.step_profile: the per-part timers of a step add up and land where they belong."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.data import build_data, collate
from benchmarks.models import SIZES, build_model
from benchmarks.step_profile import FLOOR_PASSES, StepTimer, _without_weight_gradients, markdown, profile_one
from bros_hf.core.lowrank import _LowRankTerms, _ShiftedLayer


def test_step_profile_times_every_part_and_restores_what_it_wrapped():
    nodes = (_LowRankTerms, _ShiftedLayer)
    originals = [(vars(node)["forward"], vars(node)["backward"]) for node in nodes]
    grad = torch.autograd.grad
    methods = ("plain", "floor", "bros-r16-fd")
    results = [profile_one("llama-test", method, steps=5, warmup=2, batch_size=6) for method in methods]
    plain, floor, bros = results
    for result in results:
        assert result["measured_steps"] == 3
        parts = result["parts_ms"]
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        assert result["step_min_ms"] <= result["step_median_ms"]
        named = sum(parts[p] for p in ("forward", "backward", "sketches", "updates", "optimizer"))
        assert named <= result["step_mean_ms"] * 1.01  # parts are disjoint pieces of the step
    assert plain["parts_ms"]["lowrank terms fwd"] == 0 and plain["parts_ms"]["sketches"] == 0
    assert plain["parts_ms"]["shifted layers fwd"] == 0
    assert all(floor["parts_ms"][part] == 0 for part in ("sketches", "updates", "lowrank terms fwd", "fold"))
    parts = ("lowrank terms fwd", "lowrank terms bwd", "shifted layers fwd", "shifted layers bwd", "sketches", "updates")
    for part in (*parts, "fold"):
        assert bros["parts_ms"][part] > 0, part
    nodes_fwd = bros["parts_ms"]["lowrank terms fwd"] + bros["parts_ms"]["shifted layers fwd"]
    assert nodes_fwd < bros["parts_ms"]["forward"]
    for node, (forward, backward) in zip(nodes, originals, strict=True):
        assert vars(node)["forward"] is forward and vars(node)["backward"] is backward
    assert torch.autograd.grad is grad
    table = markdown(results)
    rows = {line.split(" | ")[2]: line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == set(methods)
    assert rows["floor"][6] == "1.00" and rows["plain"][5] == "1.00"  # × floor, × plain
    assert float(rows["bros-r16-fd"][6]) == pytest.approx(bros["step_min_ms"] / floor["step_min_ms"], abs=0.006)


class _Trainer:
    """What the floor's training step reads of a Trainer."""

    @staticmethod
    def _prepare_inputs(inputs):
        return inputs


@pytest.mark.parametrize("size", ["llama-test", "vit-tiny"])
def test_floor_runs_three_passes_that_compute_no_weight_gradient(size):
    torch.manual_seed(0)
    model = build_model(SIZES[size], 0)
    train, _, _ = build_data(SIZES[size], 8, 4, 2, seed=0)
    batch = collate([train[i] for i in range(4)])
    forwards = []
    model.register_forward_hook(lambda module, args, output: forwards.append(output.loss))
    timer = StepTimer()
    timer.active = True
    loss = _without_weight_gradients(_Trainer(), timer)(model, batch)
    assert len(forwards) == FLOOR_PASSES
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(loss) and loss == forwards[-1].detach()
    assert timer.totals["forward"] > 0 and timer.totals["backward"] > 0


def test_floor_refuses_a_batch_without_token_ids_or_pixels():
    model = build_model(SIZES["llama-test"], 0)
    timer = StepTimer()
    with pytest.raises(ValueError, match="input_ids or pixel_values.*'labels'"):
        _without_weight_gradients(_Trainer(), timer)(model, {"labels": torch.zeros(2, 4, dtype=torch.long)})


def test_each_method_runs_in_a_process_of_its_own(tmp_path):
    from benchmarks.step_profile import main

    assert main(["--sizes", "llama-test", "--methods", "plain", "floor", "--steps", "3", "--warmup", "1",
                 "--output_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "step_profile.json").read_text())
    assert [r["method"] for r in results] == ["plain", "floor"]
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(r["measured_steps"] == 2 for r in results)
    assert "| llama-test | " in (tmp_path / "step_profile.md").read_text()
