"""Give records stored before content identities (any4lib.identity) their identity, under their new key.

    python scripts/rekey_results.py results/accuracy results/stories260k

A record whose config has no "identity" gets {"model": model_identity(config["model"]), "data":
text_identity(config["dataset"])} of the model and text as they are now, and moves to the key of that config; its
metrics and provenance stay as they were, and "rekeyed_from" names the old key. Only valid where the model and texts
have not changed since the record was computed (true of the shared data folder, which is never rewritten).
Records that have an identity are left alone, so a rerun (e.g. after merging a branch that added records with the
old keys) does nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from any4lib.identity import model_identity, text_identity  # noqa: E402
from any4lib.results import ResultStore, config_key, write_json_atomic  # noqa: E402


def rekey(folder: Path) -> int:
    store, moved = ResultStore(folder), 0
    for old in sorted(folder.glob("*.json")):
        record = json.loads(old.read_text())
        config = record.get("config") if isinstance(record, dict) else None
        if config is None or "identity" in config:
            continue
        config["identity"] = {"model": model_identity(config["model"]), "data": text_identity(config["dataset"])}
        record |= {"key": config_key(config), "config": config, "rekeyed_from": old.stem}
        write_json_atomic(store.path(config), record)
        old.unlink()
        moved += 1
    return moved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", type=Path, help="results store folders")
    for folder in parser.parse_args(argv).stores:
        print(f"{folder}: {rekey(folder)} records re-keyed")


if __name__ == "__main__":
    main()
