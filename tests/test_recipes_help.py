"""The first minutes of a new user: every recipe's --help works and describes the bilevel options; a model name
that cannot be loaded (no hub here) is one clear line, not a stack of tracebacks."""

from __future__ import annotations

import os
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


def test_unloadable_model_name_is_one_line(tmp_path):
    recipe = next(p for p in RECIPES if p.name == "lm_data_mixture.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(recipe), "--output_dir", str(tmp_path), "--model_name_or_path", "nobody/no-such-model"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: could not load tokenizer 'nobody/no-such-model'" in result.stderr
    assert "Pass a local folder" in result.stderr
