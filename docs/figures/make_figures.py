"""Remake the guides' figures: run each guide's figure block as the tests do, and copy the PNG it writes here.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python docs/figures/make_figures.py [guide-uvfits.md ...]

Each figure is the file its guide's example saves (with `scoreprior.plots`), nothing redrawn: the code in the
guide is the recipe. Takes a minute or two on two CPU cores (the uvfits block fits a 32×32 posterior).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
# guide -> (index of its ```python block that saves the figure, file it saves, figure name here)
FIGURES = {
    "guide-uvfits.md": (2, "closures.png", "guide-uvfits.png"),
    "guide-denoise-deblur.md": (0, "deblur.png", "guide-deblur.png"),
    "guide-train-prior.md": (0, "samples.png", "guide-train-prior.png"),
    "guide-calibration.md": (0, "coverage.png", "guide-calibration.png"),
    "guide-whitened-score.md": (0, "dehaze.png", "guide-whitened-score.png"),
}


def run_block(guide: Path, index: int, workdir: Path) -> None:
    """Execute block `index` of `guide` in `workdir`, with the guide's line numbers in tracebacks."""
    text = guide.read_text(encoding="utf-8")
    match = list(re.finditer(r"```python\n(.*?)```", text, re.S))[index]
    line = text.count("\n", 0, match.start(1)) + 1
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        exec(compile("\n" * (line - 1) + match.group(1), str(guide), "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)


def main(names: list[str]) -> None:
    for name in names or list(FIGURES):
        index, written, target = FIGURES[name]
        with tempfile.TemporaryDirectory() as tmp:
            run_block(DOCS / name, index, Path(tmp))
            shutil.copyfile(Path(tmp) / written, HERE / target)
        print(f"{name}: wrote {HERE / target} ({(HERE / target).stat().st_size // 1000} kB)")


if __name__ == "__main__":
    main(sys.argv[1:])
