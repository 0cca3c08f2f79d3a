"""README.md's Python examples run as written, each on its own (self-contained), in a fresh namespace.

A block preceded by `<!-- readme-test: skip (reason) -->` is not run (e.g. it needs torchrun); one
preceded by `<!-- readme-test: slow -->` runs with `pytest -m slow`.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>\w+)[^>]*-->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list:
    params = []
    for k, match in enumerate(_BLOCK.finditer(README.read_text(encoding="utf-8"))):
        mark = match.group("mark")
        marks = [pytest.mark.skip(reason="marked skip in README.md")] if mark == "skip" else []
        marks += [pytest.mark.slow] if mark == "slow" else []
        line = README.read_text(encoding="utf-8")[:match.start("code")].count("\n") + 1
        params.append(pytest.param(match.group("code"), id=f"block{k}-line{line}", marks=marks))
    return params


def test_readme_has_python_examples():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("code", _blocks())
def test_readme_example_runs(code, capsys):
    with torch.random.fork_rng(devices=[]):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every example prints what it shows
