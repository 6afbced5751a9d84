"""What a result was measured on, as content: a local model's files, a hub model's revision, a text's bytes.

A results-store key includes these identities, so a folder overwritten in place or a text file edited is a new
configuration, never a stale hit. File hashes are cached by (path, size, mtime) in cache_root(), so a large model
is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .paths import cache_root, load_text, text_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Files that decide what a model folder computes besides its weights (config.json: also the quantization_config;
# quant.json: that of folders written before version 4).
MODEL_CONFIGS = ("quant.json", "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model")
_CACHE_FILE = "file_hashes.json"


def file_sha256(path: str | os.PathLike, cache: bool = True) -> str:
    """SHA-256 (hex) of a file's bytes; cached by (absolute path, size, mtime) when `cache`."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_root() / _CACHE_FILE
    known = _read_cache(store) if cache else {}
    if stamp in known:
        return known[stamp]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache:
        from .results import write_json_atomic

        # Entries of other versions of this path are dropped: only the file as it is now can be asked about again.
        kept = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}
        try:
            write_json_atomic(store, kept | {stamp: value})
        except OSError:
            pass  # a read-only cache folder costs a re-hash next time, nothing else
    return value


def _read_cache(store: Path) -> dict:
    try:
        return json.loads(store.read_text())
    except (OSError, ValueError):
        return {}


def _digest(parts: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def local_model_identity(path: str | os.PathLike) -> str:
    """A fingerprint of a local model: a llama2.c file's hash, or for a folder its config files and every weight
    file's name, size and hash."""
    path = Path(path)
    if path.is_file():
        return _digest({path.name: file_sha256(path)})
    files = sorted(
        p for p in path.iterdir() if p.is_file() and (p.name in MODEL_CONFIGS or p.name.endswith(WEIGHT_SUFFIXES))
    )
    if not files:
        raise FileNotFoundError(f"{path} holds no model files (config.json, quant.json, *.safetensors, *.bin)")
    return _digest({p.name: [p.stat().st_size, file_sha256(p)] for p in files})


def hub_revision(repo_id: str) -> str:
    """The commit the hub resolves `repo_id` to now; offline, the revision already in the local hub cache."""
    from huggingface_hub import HfApi, snapshot_download

    from .hub import hub_reachable, hub_unreachable_error

    if hub_reachable():
        return HfApi().model_info(repo_id).sha
    try:
        return Path(snapshot_download(repo_id, local_files_only=True)).name  # .../snapshots/<commit>
    except Exception as err:
        raise hub_unreachable_error(repo_id) from err


def model_identity(name_or_path: str | os.PathLike) -> str:
    """"sha256:..." for a local model (see local_model_identity), "<repo>@<commit>" for a hub id,
    "builtin:tiny" for experiments.tiny_model (defined by the code the record's provenance names)."""
    from .paths import resolve_model

    if str(name_or_path) == "tiny":
        return "builtin:tiny"
    source = resolve_model(name_or_path)
    if isinstance(source, Path):
        return local_model_identity(source)
    return f"{source}@{hub_revision(source)}"


def text_identity(name_or_path: str | os.PathLike) -> str:
    """"sha256:..." of a text set's bytes: its local file (hash cached), else the text read from the hub."""
    local = text_file(name_or_path)
    if local is not None:
        return "sha256:" + file_sha256(local)[:20]
    return "sha256:" + hashlib.sha256(load_text(name_or_path).encode()).hexdigest()[:20]
