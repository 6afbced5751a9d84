"""RoPE frequencies of a Llama config, as transformers computes them: rope types `default` and `llama3`."""

from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "llama3")


def rope_parameters(config) -> dict:
    """The config's RoPE parameters (transformers 5.x rope_parameters, 4.x rope_theta / rope_scaling), with its type."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def check_rope(config) -> None:
    params = rope_parameters(config)
    if params["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"RoPE type {params['rope_type']!r} is not implemented; the engine has {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not implemented")


def inv_freq(config, head_dim: int) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies (transformers' _compute_default / _compute_llama3_parameters)."""
    check_rope(config)
    params = rope_parameters(config)
    base = params["rope_theta"]
    freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if params["rope_type"] == "default":
        return freq
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(config, head_dim: int, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) float32 [max_len, head_dim] of positions 0..max_len-1, the angles in float32 as transformers has
    them (the two halves of the head dimension share each angle)."""
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq(config, head_dim)[None]
    angles = torch.cat([angles, angles], -1).to(device)
    return angles.cos(), angles.sin()
