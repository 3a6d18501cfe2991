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
    assert "usage:" in result.stdout
    assert "--upper_warmup_steps" in result.stdout
