"""quantize / dequantize: the checked entry points to the format registry."""

from __future__ import annotations

import torch

from .formats import get_format
from .qtensor import QuantizedTensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def valid_group_sizes(k: int) -> list[int]:
    """Group sizes that divide K (at least 2 elements per group), ascending."""
    return [g for g in range(2, k + 1) if k % g == 0]


def _resolve_group_size(fmt, group_size: int | None, k: int) -> int:
    if fmt.fixed_group_size is not None:
        # The format's name fixes its block, so a sweep over formats at g128 stays valid; q.group_size says which.
        group_size = fmt.fixed_group_size
    elif group_size is None or group_size == -1:
        return k  # per-channel: one group per output row
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, or None for one group per row; got {group_size!r}")
    if k % group_size:
        sizes = valid_group_sizes(k)
        shown = ", ".join(map(str, sizes[:12])) + (", ..." if len(sizes) > 12 else "")
        raise ValueError(
            f"group_size={group_size} does not divide K={k} (the weight's second dimension). "
            f"Valid group sizes for this K: {shown}; or group_size=None for one group per row."
        )
    return group_size


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a floating-point weight (fp16, bf16, fp32, fp64), got {w.dtype}")
    if w.dim() != 2:
        hint = " (for a vector use w[None])" if w.dim() == 1 else ""
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}{hint}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
    if not torch.isfinite(w.sum()):  # one cheap reduction; counting only when something is off (or it overflowed)
        bad = (~torch.isfinite(w)).sum().item()
        if bad:
            raise ValueError(f"weight has {bad} NaN/Inf entries; quantization needs finite values")


def _check_sample_weight(sample_weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    try:
        expanded = sample_weight.float().expand(shape)
    except RuntimeError:
        raise ValueError(
            f"sample_weight of shape {tuple(sample_weight.shape)} does not broadcast to the weight's {tuple(shape)}; "
            f"pass [K] (one value per input feature) or [N, K]"
        ) from None
    if not torch.isfinite(sample_weight).all() or (sample_weight < 0).any():  # before expanding: K values, not N*K
        raise ValueError("sample_weight must be finite and non-negative (e.g. |mean activation| per input feature)")
    return expanded


def quantize(
    w: torch.Tensor,
    fmt: str,
    group_size: int | None = 128,
    sample_weight: torch.Tensor | None = None,
    **options,
) -> QuantizedTensor:
    """Quantize a [N, K] weight (N output rows, K input features) into format `fmt`.

    group_size: elements along K that share one scale (must divide K); None for one group per row. Block formats
    (mxfp4: 32, nvfp4: 16) always use their own block, whatever is passed. sample_weight: importance of each element, broadcast
    to [N, K]; anyN uses it (times the group scale) as k-means sample weights; typically |mean activation| per input
    feature from calibration. options: anyN k-means settings (init="k-means++"|"random"|"int"|"nf4", seed,
    scale_weighted, max_iter, tol, row_chunk). The work runs on w's device, in float32.
    """
    spec = get_format(fmt)
    _check_weight(w)
    n, k = w.shape
    g = _resolve_group_size(spec, group_size, k)
    if not spec.learned:
        if options:
            raise TypeError(f"{spec.name} takes no options; got {sorted(options)}")
        if sample_weight is not None:
            _check_sample_weight(sample_weight.to(w.device), w.shape)
        return spec(w.float().reshape(n, k // g, g))
    if sample_weight is not None:
        options["sample_weight"] = _check_sample_weight(sample_weight.to(w.device), w.shape)
    return spec(w.float().reshape(n, k // g, g), **options)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight `q` stands for (see QuantizedTensor for the formula)."""
    return q.dequantize(dtype)
