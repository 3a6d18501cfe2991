"""Recipes run the package defaults for the upper and auxiliary steps unless they say, in --help, why not."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from bros_hf import BROSConfig

ROOT = Path(__file__).resolve().parents[1]
TUNING_KNOBS = (
    "upper_update", "upper_learning_rate", "upper_rms_decay", "moving_average_weight", "upper_warmup_steps",
    "aux_learning_rate", "aux_step_scaling", "aux_step_limit", "z_norm_bound", "hessian_mode", "finite_difference_eps",
    "sketch_resample_interval", "subspace_rank", "mixture_floor", "lower_full_space_modules",
)  # fmt: skip
PACKAGE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BROSConfig) if f.name in TUNING_KNOBS}
TRAINER_RECIPES = ("lm_data_mixture", "vit_sample_reweighting")


@pytest.mark.parametrize("name", TRAINER_RECIPES)
def test_recipe_departs_from_package_defaults_only_with_a_reason_in_help(name):
    recipe = importlib.import_module(name)  # recipes/ is on sys.path (tests/conftest.py)
    departures = {
        knob
        for knob, value in recipe.RECIPE_DEFAULTS.items()
        if knob in PACKAGE_DEFAULTS and value != PACKAGE_DEFAULTS[knob]
    }
    assert departures == set(recipe.RECIPE_REASONS), (departures, set(recipe.RECIPE_REASONS))
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    flat = "".join(help_text.split())  # argparse re-wraps help text (and breaks lines after hyphens)
    for knob, reason in recipe.RECIPE_REASONS.items():
        assert "measured" in reason or "python " in reason, f"{knob}: the reason must cite a measurement"
        assert "".join(f"Recipe default, not the package's: {reason}".split()) in flat, knob


def test_hyper_cleaning_uses_the_package_upper_and_auxiliary_defaults():
    from digits import HyperCleaningConfig

    from bros_hf.config import DEFAULT_SAMPLE_UPPER_LR

    config = HyperCleaningConfig()
    assert config.upper_rule == PACKAGE_DEFAULTS["upper_update"]
    assert config.upper_lr == DEFAULT_SAMPLE_UPPER_LR
    assert config.aux_lr == PACKAGE_DEFAULTS["aux_learning_rate"]
    assert config.ma_weight == PACKAGE_DEFAULTS["moving_average_weight"]
    assert config.upper_warmup_steps == PACKAGE_DEFAULTS["upper_warmup_steps"]
    assert config.z_radius == PACKAGE_DEFAULTS["z_norm_bound"]
    assert config.aux_step_limit == PACKAGE_DEFAULTS["aux_step_limit"]
