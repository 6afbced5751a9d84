"""The quantized weight: codes plus what turns them back into numbers (see docs/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class QuantizedTensor:
    """A quantized [N, K] weight. Every format dequantizes by one formula:

        w[n, k] = lut[n or 0, codes[n, k]] * scale[n, k // group_size] * tensor_scale + zero[n, k // group_size]

    codes: uint8 [N, K], one code per element in [0, 2**bits).
    lut:   float32 [N, 2**bits] (anyN: a table per row) or [1, 2**bits] (a grid shared by the tensor).
    scale: float32 [N, K // group_size].
    zero:  float32 [N, K // group_size], or None where the format has no offset (symmetric and float formats).
    tensor_scale: NVFP4's second-level fp32 scale; 1.0 for every other format.
    """

    format: str
    bits: int
    group_size: int
    codes: torch.Tensor
    lut: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    tensor_scale: float = 1.0

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] weight these codes stand for, computed in float32 and cast to `dtype`."""
        n, k = self.codes.shape
        values = torch.gather(self.lut.expand(n, -1), 1, self.codes.long())
        groups = values.view(n, k // self.group_size, self.group_size) * (self.scale * self.tensor_scale).unsqueeze(-1)
        if self.zero is not None:
            groups = groups + self.zero.unsqueeze(-1)
        return groups.view(n, k).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in moved.items()}
        return replace(self, **moved)

    def select_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """The rows `index` (a 1-D index tensor) of this weight, in that order (a shared table stays shared)."""
        lut = self.lut if self.lut.shape[0] == 1 else self.lut[index]
        zero = None if self.zero is None else self.zero[index]
        return replace(self, codes=self.codes[index], lut=lut, scale=self.scale[index], zero=zero)

    def bits_per_weight(self) -> float:
        """Storage cost per weight: the code plus its share of scales and zeros (16-bit, or the format's 8-bit block
        scale), of per-row LUT entries (16-bit) and of an fp32 tensor scale (NVFP4)."""
        from .formats import get_format

        fmt = get_format(self.format)
        n, k = self.codes.shape
        side = fmt.scale_bits * (self.scale.numel() + (0 if self.zero is None else self.zero.numel()))
        side += 16 * self.lut.numel() if self.lut.shape[0] > 1 else 0
        return self.bits + (side + fmt.tensor_scale_bits) / (n * k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready); the format name travels as its UTF-8 bytes."""
        state = {
            "format": torch.tensor(list(self.format.encode()), dtype=torch.uint8),
            "codes": self.codes,
            "lut": self.lut,
            "scale": self.scale,
            "tensor_scale": torch.tensor(self.tensor_scale, dtype=torch.float32),
        }
        if self.zero is not None:
            state["zero"] = self.zero
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> QuantizedTensor:
        missing = {"format", "codes", "lut", "scale", "tensor_scale"} - state.keys()
        if missing:
            raise KeyError(f"not a QuantizedTensor state dict: missing {sorted(missing)}")
        codes, scale = state["codes"], state["scale"]
        return cls(
            format=bytes(state["format"].tolist()).decode(),
            bits=int(state["lut"].shape[1]).bit_length() - 1,
            group_size=codes.shape[1] // scale.shape[1],
            codes=codes,
            lut=state["lut"],
            scale=scale,
            zero=state.get("zero"),
            tensor_scale=float(state["tensor_scale"]),
        )


def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """QuantizedTensors of the same format, K and group size stacked by rows (exact for per-row / per-group formats:
    each row's codes, LUT, scales and zeros are its own; a shared table must be the same in every part)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    for q in parts[1:]:
        same = (q.format, q.bits, q.group_size, q.shape[1], q.tensor_scale)
        if same != (first.format, first.bits, first.group_size, first.shape[1], first.tensor_scale):
            raise ValueError(f"cannot stack {q.format} {tuple(q.shape)} onto {first.format} {tuple(first.shape)}: "
                             "format, K, group size and tensor scale must match")
    if all(q.lut.shape[0] == 1 for q in parts) and all(torch.equal(q.lut, first.lut) for q in parts):
        lut = first.lut
    else:
        lut = torch.cat([q.lut.expand(q.shape[0], -1) for q in parts])
    zero = None if first.zero is None else torch.cat([q.zero for q in parts])
    return replace(first, codes=torch.cat([q.codes for q in parts]), lut=lut,
                   scale=torch.cat([q.scale for q in parts]), zero=zero)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes of at most 4 bits ([N, K] uint8, one per byte) two to a byte: [N, ceil(K / 2)], column 2j in the low
    nibble and 2j + 1 in the high one (an odd K is padded with a zero code)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_nibbles for a K-column tensor."""
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)[..., :k]
