"""Every recipe's --help is the first thing a new user runs: it must work and describe the bilevel options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.py") if not p.name.startswith("_"))
LIBRARY_MODULES = {"local_corpus.py", "digits.py"}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name not in LIBRARY_MODULES], ids=lambda p: p.stem)
def test_recipe_help_works(recipe):
    result = subprocess.run(
        [sys.executable, str(recipe), "--help"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    help_text = result.stdout
    assert "usage:" in help_text and "--upper_warmup_steps" in help_text
    if "--bilevel_method" in help_text:  # recipes on BROSConfig: the bilevel options before TrainingArguments'
        options = help_text[help_text.index("options:") :]
        assert options.index("\n  --bilevel_method") < options.index("\n  --learning_rate"), "bilevel options first"


def test_help_shows_the_recipes_own_defaults():
    recipe = next(p for p in RECIPES if p.name == "lm_data_mixture.py")
    result = subprocess.run([sys.executable, str(recipe), "--help"], capture_output=True, text=True, timeout=300)
    block = result.stdout[result.stdout.index("\n  --max_steps") :]
    block = block[: block.index("\n  --", 3)]
    assert "(default: 200)" in " ".join(block.split()), block  # the recipe's max_steps, not TrainingArguments' -1
