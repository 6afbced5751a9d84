"""What produced a result: code version, package versions, machine, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("any4lib", "torch", "transformers", "numpy", "safetensors", "lm_eval", "datasets")


def git_state(repo: Path | None = None) -> dict:
    """The checkout's commit and whether tracked files differ from it. $ANY4_GIT_COMMIT, when set, names the commit
    instead (dirty: None): a copy of the tree on a GPU host has no .git, or a stale one."""
    if os.environ.get("ANY4_GIT_COMMIT"):
        return {"commit": os.environ["ANY4_GIT_COMMIT"], "dirty": None}
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args):
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"commit": commit, "dirty": None if dirty is None else bool(dirty)}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device: str = "cpu") -> str:
    """A human name for the device a result was computed on; asks CUDA only when `device` is a CUDA one."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu") -> dict:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "device": device_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
