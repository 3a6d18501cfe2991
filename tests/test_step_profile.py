"""benchmarks.step_profile: the per-part timers of a step add up and land where they belong."""

from __future__ import annotations

import torch

from benchmarks.step_profile import markdown, profile_one
from bros_hf.core.lowrank import _LowRankTerms


def test_step_profile_times_every_part_and_restores_what_it_wrapped():
    forward, backward, grad = vars(_LowRankTerms)["forward"], vars(_LowRankTerms)["backward"], torch.autograd.grad
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
    for part in ("lowrank terms fwd", "lowrank terms bwd", "sketches", "updates", "fold"):
        assert bros["parts_ms"][part] > 0, part
    assert bros["parts_ms"]["lowrank terms fwd"] < bros["parts_ms"]["forward"]
    assert vars(_LowRankTerms)["forward"] is forward and vars(_LowRankTerms)["backward"] is backward
    assert torch.autograd.grad is grad
    table = markdown(results)
    assert "| llama-test |" in table and "bros-r16-fd" in table
