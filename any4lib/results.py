"""The results store: one JSON record per run configuration, written atomically, keyed by a hash of the config.

A record is {"key", "config", "metrics", "provenance"}. Re-running a configuration that already has a record
returns the stored one and computes nothing, so long sweeps can be stopped and resumed at any point. Configs name
what was measured by content (any4lib.identity), so a changed model or text is a new key, never a stale hit.
Records are strict JSON, and a metric that is not a finite number is refused: a NaN is an error, not a result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

from .provenance import provenance


def config_key(config: dict) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers never see half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ResultStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, config: dict) -> Path:
        return self.root / f"{config_key(config)}.json"

    def get(self, config: dict) -> dict | None:
        path = self.path(config)
        return json.loads(path.read_text()) if path.is_file() else None

    def has(self, config: dict) -> bool:
        return self.path(config).is_file()

    def put(self, config: dict, metrics: dict, device: str = "cpu") -> dict:
        # Round-trip through JSON first so a config that cannot be stored fails before anything is written.
        config = json.loads(json.dumps(config))
        bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise ValueError(f"refusing to store non-finite metrics {bad} for {config}: a NaN/Inf is not a result")
        record = {"key": config_key(config), "config": config, "metrics": metrics, "provenance": provenance(device)}
        write_json_atomic(self.path(config), record)
        return record

    def get_or_compute(
        self, config: dict, compute: Callable[[], dict], device: str = "cpu", recompute: bool = False
    ) -> dict:
        """The stored record for `config`, or compute its metrics, store and return the new record
        (recompute=True: always compute, replacing the stored one)."""
        return (None if recompute else self.get(config)) or self.put(config, compute(), device)

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))]

    def find(self, **match) -> list[dict]:
        """Records whose config has every given key equal to the given value."""
        return [r for r in self.records() if all(r["config"].get(k) == v for k, v in match.items())]


def served_from_store(records: list[dict]) -> str:
    """The line that says numbers were read, not computed: "from the results store, <date(s)>, <commit(s)>"."""
    dates = sorted(r.get("provenance", {}).get("date", "undated")[:10] for r in records)
    commits = sorted({(r.get("provenance", {}).get("git", {}).get("commit") or "unknown")[:7] for r in records})
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return f"from the results store, {span}, commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}"
