"""benchmarks.step_profile: the per-part timers of a step add up and land where they belong."""

from __future__ import annotations

import torch

from benchmarks.step_profile import markdown, profile_one
from bros_hf.core.lowrank import _LowRankTerms, _ShiftedLayer


def test_step_profile_times_every_part_and_restores_what_it_wrapped():
    nodes = (_LowRankTerms, _ShiftedLayer)
    originals = [(vars(node)["forward"], vars(node)["backward"]) for node in nodes]
    grad = torch.autograd.grad
    results = [profile_one("llama-test", method, steps=5, warmup=2, batch_size=6) for method in ("plain", "bros-r16-fd")]
    plain, bros = results
    for result in results:
        assert result["measured_steps"] == 3
        parts = result["parts_ms"]
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        assert result["step_min_ms"] <= result["step_median_ms"]
        named = sum(parts[p] for p in ("forward", "backward", "sketches", "updates", "optimizer"))
        assert named <= result["step_mean_ms"] * 1.01  # parts are disjoint pieces of the step
    assert plain["parts_ms"]["lowrank terms fwd"] == 0 and plain["parts_ms"]["sketches"] == 0
    assert plain["parts_ms"]["shifted layers fwd"] == 0
    parts = ("lowrank terms fwd", "lowrank terms bwd", "shifted layers fwd", "shifted layers bwd", "sketches", "updates")
    for part in (*parts, "fold"):
        assert bros["parts_ms"][part] > 0, part
    nodes_fwd = bros["parts_ms"]["lowrank terms fwd"] + bros["parts_ms"]["shifted layers fwd"]
    assert nodes_fwd < bros["parts_ms"]["forward"]
    for node, (forward, backward) in zip(nodes, originals, strict=True):
        assert vars(node)["forward"] is forward and vars(node)["backward"] is backward
    assert torch.autograd.grad is grad
    table = markdown(results)
    assert "| llama-test |" in table and "bros-r16-fd" in table
