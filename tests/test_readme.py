"""The documents' Python examples run as written, and their links lead somewhere.

Every ```python block of README.md and docs/*.md runs on its own (self-contained), in a fresh namespace, in a
temporary working directory (an example that writes files writes them there). A block runs in the default
suite unless the line right above it is a marker:
`<!-- readme-test: slow -->` runs it with `pytest -m slow` (an example of more than a few seconds),
`<!-- readme-test: skip (reason) -->` skips it with that reason (e.g. it needs torchrun or a data file).
Other fenced blocks (```bash) are not run. A DeprecationWarning raised by a call in an example is an error:
the documents show the current API only. Tracebacks give the .md file's own line numbers.
"""

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS]
GUIDES = [path for path in DOCS if path.name.startswith("guide-")]
README_MAX_LINES = 150
_EXAMPLE = "__docs_example__"  # the examples' module name, which the DeprecationWarning filter matches
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
_MARKER = re.compile(r"slow|skip \((?P<reason>[^)]+)\)")
# [text](target) and ![alt](target), the target up to whitespace or ")"; code spans are removed first.
_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path) -> list:
    """One pytest.param per ```python block of `path`, id `<file>-block<k>-line<first code line>`."""
    text = path.read_text(encoding="utf-8")
    params = []
    for k, match in enumerate(_BLOCK.finditer(text)):
        line = text.count("\n", 0, match.start("code")) + 1
        marker = match.group("marker")
        marks = []
        if marker is not None:
            known = _MARKER.fullmatch(marker)
            if known is None:
                raise ValueError(f"{_name(path)} line {line - 2}: unknown marker {marker!r}, "
                                 "expected 'slow' or 'skip (reason)'")
            marks = [pytest.mark.slow] if marker == "slow" else [pytest.mark.skip(reason=known["reason"])]
        params.append(pytest.param(path, match.group("code"), line, id=f"{_name(path)}-block{k}-line{line}",
                                   marks=marks))
    return params


def _all_blocks() -> list:
    return [block for path in DOCUMENTS for block in _blocks(path)]


def test_every_python_block_is_collected():
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        assert len(_blocks(path)) == text.count("```python\n"), _name(path)
    assert _blocks(README), "README.md shows one example"


def test_every_guide_has_code_and_a_figure():
    assert len(GUIDES) >= 5, [p.name for p in GUIDES]
    for path in GUIDES:
        text = path.read_text(encoding="utf-8")
        runnable = [b for b in _blocks(path) if not any(m.name == "skip" for m in b.marks)]
        assert runnable, f"{_name(path)}: no example the tests run"
        assert re.search(r"!\[[^\]]*\]\(figures/[^)]+\.png\)", text), f"{_name(path)}: no figure"
        assert "plots." in text and ".savefig(" in text, f"{_name(path)}: the figure is not made by its code"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move the rest to docs/"


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, k = slug, 0
        while anchor in anchors:
            k += 1
            anchor = f"{slug}-{k}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_relative_links_point_to_files(path):
    text = _CODE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for match in _LINK.finditer(text):
        target = match["target"].strip("<>")
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL (https:, mailto:)
        file, _, anchor = target.partition("#")
        linked = path if not file else path.parent / file
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{_name(path)}: links to missing files or headings {broken}"


def test_figures_are_small_and_used():
    figures = sorted((ROOT / "docs" / "figures").glob("*.png"))
    text = "".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
    for figure in figures:
        assert figure.stat().st_size < 150_000, f"{_name(figure)}: {figure.stat().st_size} bytes, keep it < 150 kB"
        assert f"figures/{figure.name}" in text, f"{_name(figure)}: no document shows it"


@pytest.mark.parametrize(("path", "code", "line"), _all_blocks())
def test_example_runs(path, code, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    # blank lines first, so a traceback gives the document's own line numbers
    compiled = compile("\n" * (line - 1) + code, str(path), "exec")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, module=_EXAMPLE)
        exec(compiled, {"__name__": _EXAMPLE})
    assert capsys.readouterr().out.strip(), "every example prints what it shows"
