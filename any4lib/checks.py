"""Argument checks at the entry points (API and CLI): a bad value fails at once, saying the valid range; loaded
tensors are checked finite."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_count(name: str, value, minimum: int = 1, maximum: int | None = None, none_means: str | None = None):
    """`value` as an int in [minimum, maximum]; None passes when `none_means` says what None stands for."""
    if value is None and none_means is not None:
        return None
    upper = f" and <= {maximum}" if maximum is not None else ""
    hint = f" (or None: {none_means})" if none_means else ""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}{hint}; got {value!r}")
    return value


def check_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {device!r}: this machine has no CUDA device; use 'cpu'")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: this machine has CUDA devices 0..{count - 1}")
    elif parsed.type not in ("cpu", "meta", "mps"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from a torch.dtype or one of DTYPES' names."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype {dtype!r} is not a compute dtype; use one of {', '.join(DTYPES)} (or a torch float dtype)")


def check_finite(tensors: dict[str, torch.Tensor], source) -> None:
    """Raise ValueError naming the floating tensors (weights, scales, tables) that hold NaN or Inf."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} tensor(s) hold NaN/Inf values, e.g. {', '.join(bad[:3])}; the checkpoint is "
            "damaged and would give meaningless outputs"
        )
