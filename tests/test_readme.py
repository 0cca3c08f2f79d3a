"""README.md's Python examples run as written, each on its own (self-contained), in a fresh namespace.

A ```python block runs in the default suite unless the line right above it is a marker:
`<!-- readme-test: slow -->` runs it with `pytest -m slow` (an example of more than a few seconds),
`<!-- readme-test: skip (reason) -->` skips it with that reason (e.g. it needs torchrun or ../shared/data).
Other fenced blocks (```bash) are not run.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
_MARKER = re.compile(r"slow|skip \((?P<reason>[^)]+)\)")


def _blocks() -> list:
    """One pytest.param per ```python block of README.md, id `block<k>-line<first code line>`."""
    text = README.read_text(encoding="utf-8")
    params = []
    for k, match in enumerate(_BLOCK.finditer(text)):
        line = text.count("\n", 0, match.start("code")) + 1
        marker = match.group("marker")
        marks = []
        if marker is not None:
            known = _MARKER.fullmatch(marker)
            if known is None:
                raise ValueError(f"README.md line {line - 2}: unknown marker {marker!r}, "
                                 "expected 'slow' or 'skip (reason)'")
            marks = [pytest.mark.slow] if marker == "slow" else [pytest.mark.skip(reason=known["reason"])]
        params.append(pytest.param(match.group("code"), line, id=f"block{k}-line{line}", marks=marks))
    return params


def test_readme_has_python_examples():
    text = README.read_text(encoding="utf-8")
    assert len(_blocks()) == text.count("```python\n") >= 2


@pytest.mark.parametrize(("code", "line"), _blocks())
def test_readme_example_runs(code, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    # blank lines first, so a traceback gives README.md's own line numbers
    with torch.random.fork_rng(devices=[]):
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "every example prints what it shows"
