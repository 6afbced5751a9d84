"""Real weight matrices of the project's reference model (ref-en-16m), read straight from its safetensors shards."""

import json

import pytest
import torch
from safetensors import safe_open

from any4lib.paths import data_root


def real_weight(name: str) -> torch.Tensor:
    """A float32 weight of ref-en-16m by its state-dict name; skips the test when the data folder is absent."""
    folder = data_root() / "models" / "ref-en-16m"
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        pytest.skip(f"reference model not found at {folder} (set ANY4_DATA to the shared data folder)")
    shard = json.loads(index.read_text())["weight_map"][name]
    with safe_open(str(folder / shard), "pt") as f:
        return f.get_tensor(name).float()
