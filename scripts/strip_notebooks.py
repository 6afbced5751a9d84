"""Strip outputs, execution counts and run metadata from notebooks, so they are committed clean.

    python scripts/strip_notebooks.py            # strip notebooks/*.ipynb in place
    python scripts/strip_notebooks.py --check    # exit 1 and name any notebook that still has outputs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

RUN_METADATA = ("papermill", "widgets", "execution")


def strip(nb) -> bool:
    """Remove outputs and run state from `nb` in place; True when anything changed."""
    changed = False
    for cell in nb.cells:
        for key in RUN_METADATA:
            changed |= cell.metadata.pop(key, None) is not None
        if cell.cell_type != "code":
            continue
        changed |= bool(cell.outputs) or cell.execution_count is not None
        cell.outputs, cell.execution_count = [], None
    for key in RUN_METADATA:
        changed |= nb.metadata.pop(key, None) is not None
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; fail if a notebook needs stripping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(Path(__file__).resolve().parents[1].joinpath("notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    if args.check and dirty:
        print("notebooks with outputs (run python scripts/strip_notebooks.py):", *map(str, dirty), sep="\n  ")
        return 1
    for path in [] if args.check else dirty:
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
