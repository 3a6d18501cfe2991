"""README.md stays true: its runnable snippets run, and its links stay inside the repository and resolve.

A python block right after ``<!-- test: runnable name=NAME -->`` runs in a fresh namespace; one right after
``<!-- test: runnable continues=NAME -->`` runs in the namespace that block NAME left (it uses its variables and
output files). Blocks run in README order, in one temporary working directory, on one CPU thread (tiny models
gain nothing from more, and a busy machine makes them slower). About 40-60 s on 2 shared CPU cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKDOWN_FILES = [README, ROOT / "benchmarks" / "README.md"]

MARK = re.compile(r"<!-- test: runnable (name|continues)=([\w-]+) -->\n```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:bros_hf|recipes|tests|benchmarks|docs)/[\w./-]+)`")


def runnable_blocks(text: str) -> list[tuple[str, str, str, int]]:
    """(kind, name, code, line of the code's first line) for every marked block, in order."""
    return [
        (m.group(1), m.group(2), m.group(3), text.count("\n", 0, m.start(3)) + 1) for m in MARK.finditer(text)
    ]


def test_every_mark_is_right_before_a_python_block():
    text = README.read_text()
    blocks = runnable_blocks(text)
    assert text.count("<!-- test:") == len(blocks), (
        "a '<!-- test: ... -->' mark is not directly followed by ```python"
    )
    seen: list[str] = []
    for kind, name, _, line in blocks:
        if kind == "name":
            assert name not in seen, f"README.md:{line}: two blocks named {name}"
            seen.append(name)
        else:
            assert name in seen, f"README.md:{line}: continues={name} names no earlier block"


def test_readme_snippets_run(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    namespaces: dict[str, dict] = {}
    blocks = runnable_blocks(README.read_text())
    assert {name for _, name, _, _ in blocks} >= {"lm", "tagger"}, blocks
    for kind, name, code, line in blocks:
        if kind == "name":
            namespaces[name] = {"__name__": f"readme_{name}"}
        # Padding keeps README line numbers in tracebacks.
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespaces[name])

    # What the text around the snippets says they show.
    mixture = json.loads((tmp_path / "out" / "mixture_weights.json").read_text())
    assert mixture["domains"] == ["code", "noise", "prose"]
    assert mixture["upper_updates"] == mixture["step"] == 40
    assert max(mixture["weights"], key=mixture["weights"].get) == "code", mixture
    assert len(namespaces["lm"]["mixed"]) > 0

    tagger = namespaces["tagger"]
    samples = json.loads((tmp_path / "out_sample" / "sample_weights.json").read_text())
    assert set(samples) == {"step", "upper_updates", "weights", "final"}
    assert (samples["step"], samples["upper_updates"]) == (150, 120)
    weights, corrupted = torch.tensor(tagger["weights"], dtype=torch.float32), tagger["corrupted"]
    assert torch.allclose(weights, tagger["trainer"].sample_weights())
    assert float(weights[~corrupted].mean()) > float(weights[corrupted].mean()) + 0.5
    assert len(tagger["kept"]) == len(weights) - len(tagger["flagged"])
    assert tagger["weighted"].column_names == ["features", "labels", "weight"]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository_and_resolve(path):
    prose = FENCE.sub("", path.read_text())
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    # Code spans lose their brackets and parentheses (`[B, T](...)` is no link); link texts keep their words.
    links = LINK.findall(re.sub(r"`([^`\n]*)`", lambda m: re.sub(r"[][()]", "", m.group(1)), prose))
    assert links, f"no links found in {path}"
    for text, target in links:
        assert "://" not in target and not target.startswith("mailto:"), (
            f"{path}: [{text}]({target}) leaves the repo"
        )
        file_part, _, anchor = target.partition("#")
        if file_part:
            resolved = (path.parent / file_part).resolve()
            assert resolved.exists(), f"{path}: [{text}]({target}) points to a missing file"
            assert ROOT in resolved.parents or resolved == ROOT, f"{path}: {target} is outside the repository"
        elif anchor:
            assert anchor in anchors, f"{path}: [{text}]({target}) names no heading of this file"
    for mentioned in REPO_PATH.findall(prose):
        assert (ROOT / mentioned).exists(), f"{path} mentions `{mentioned}`, which does not exist"
