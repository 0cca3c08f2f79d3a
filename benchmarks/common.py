"""Shared by the benchmark scripts: the `--json` output."""

import json

import torch


def write_json(path: str | None, args, rows: list[dict]) -> None:
    """Write {"args", "torch", "rows"} to `path` (nothing when path is None) and say where."""
    if path:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)
        print(f"wrote {path}")
