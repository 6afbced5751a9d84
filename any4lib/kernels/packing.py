"""The packed tinygemm weight layout (docs/KERNELS.md): codes in mma fragment order, scales beside them, LUT bytes.

Rows are padded to tiles of 16 and k to chunks of 64 (the padding has scale 0 and zero 0, so it adds nothing).
In chunk c, mma k-tile j, lane (g, t) = (lane // 4, lane % 4) holds the 4 consecutive k = 64 c + 16 j + 4 t .. + 3
of rows g and g + 8 of its tile: 8 codes in one 32-bit word, the lane's 4 words one 16-byte load.
"""

from __future__ import annotations

import torch

TILE_N = 16
CHUNK_K = 64
GROUP_SIZES = (32, 64, 128, 256)

# Nibble position of the value (h, i) (row g + 8 h, i-th of the 4 k) inside a word, per dequantization path.
# Int codes: register p of the fragment holds nibbles p and p + 4 (rows g, g+8, g, g+8 for p = 0..3).
# LUT codes: byte i holds the i-th k of row g (low nibble) and of row g+8 (high nibble), so each byte indexes the
# kernel's 256-entry table of (row g, row g+8) value pairs (tables of row pairs: conflict-free in 32 KB).
_NIBBLE = {
    True: torch.tensor([0, 4, 2, 6, 1, 5, 3, 7]),
    False: torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]),
}


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def gate_up_rows(rows: int, device=None) -> torch.Tensor:
    """The order a SwiGLU weight's stacked [gate; up] rows (rows = 2 h, h % 8 == 0) are packed in: gate rows 8j..8j+7
    then up rows 8j..8j+7 for j = 0, 1, ..., so 16-row tile j holds the gate and up rows of outputs 8j..8j+7 (rows g
    and g + 8 of the tile are one output's pair, which the kernel's epilogue combines)."""
    if rows % 16:
        raise ValueError(f"gate + up rows must be a multiple of 16 (8 per half), got {rows}")
    return torch.arange(rows, device=device).view(2, rows // 16, 8).transpose(0, 1).reshape(rows)


def pack_codes(codes: torch.Tensor, int_codes: bool) -> torch.Tensor:
    """uint8 codes [N, K] (values < 16) -> int32 [N_pad / 16, K_pad / 64, 32, 4]."""
    n, k = codes.shape
    n_pad, k_pad = _ceil_to(n, TILE_N), _ceil_to(k, CHUNK_K)
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int64, device=codes.device)
    padded[:n, :k] = codes.long()
    # (tile, h, g, chunk, j, t, i) -> (tile, chunk, g, t, j, h, i)
    parts = padded.view(n_pad // 16, 2, 8, k_pad // 64, 4, 4, 4).permute(0, 3, 2, 5, 4, 1, 6)
    shifts = 4 * _NIBBLE[int_codes].to(codes.device)
    words = (parts.reshape(*parts.shape[:5], 8) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as int32
    return words.to(torch.int32).reshape(n_pad // 16, k_pad // 64, 32, 4).contiguous()


def unpack_codes(packed: torch.Tensor, n: int, k: int, int_codes: bool) -> torch.Tensor:
    """The exact inverse of pack_codes: uint8 [N, K]."""
    tiles, chunks = packed.shape[:2]
    words = packed.long().view(tiles, chunks, 8, 4, 4, 1) & 0xFFFFFFFF
    shifts = 4 * _NIBBLE[int_codes].to(packed.device)
    nibbles = ((words >> shifts) & 0xF).view(tiles, chunks, 8, 4, 4, 2, 4)
    codes = nibbles.permute(0, 5, 2, 1, 4, 3, 6).reshape(tiles * 16, chunks * 64)
    return codes[:n, :k].to(torch.uint8)


def pack_scales(scale: torch.Tensor, zero: torch.Tensor | None, k: int, dtype: torch.dtype) -> torch.Tensor:
    """float [N, G] scale (and zero) -> dtype [N_pad / 16, G_pad, 8, 2, 1 or 2]: per tile and group, the
    (scale[, zero]) of rows g and g + 8 next to each other for lane group g."""
    n, groups = scale.shape
    group_size = k // groups
    n_pad, groups_pad = _ceil_to(n, TILE_N), _ceil_to(k, CHUNK_K) // group_size
    parts = [scale] if zero is None else [scale, zero]
    padded = torch.zeros(n_pad, groups_pad, len(parts), dtype=torch.float32, device=scale.device)
    padded[:n, :groups] = torch.stack([p.float() for p in parts], -1)
    # (tile, h, g, group, z) -> (tile, group, g, h, z)
    return padded.view(n_pad // 16, 2, 8, groups_pad, len(parts)).permute(0, 3, 2, 1, 4).to(dtype).contiguous()


def unpack_scales(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    tiles, groups_pad, _, _, z = packed.shape
    groups = groups_pad if k % CHUNK_K == 0 else groups_pad - 1  # g = 32 with k = 64 c + 32 pads one group
    rows = packed.permute(0, 3, 2, 1, 4).reshape(tiles * 16, groups_pad, z)[:n, :groups].float()
    return rows[..., 0].contiguous(), rows[..., 1].contiguous() if z == 2 else None


def pack_lut(lut: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """float [R, 16] (R = 1 or N) -> int32 [1 or N_pad, 8]: the 16 entries' low bytes, then their high bytes."""
    rows = lut.shape[0] if lut.shape[0] == 1 else _ceil_to(n, TILE_N)
    padded = torch.zeros(rows, 16, dtype=dtype, device=lut.device)
    padded[: lut.shape[0]] = lut.to(dtype)
    bits = padded.view(torch.int16).int() & 0xFFFF
    planes = torch.cat([bits & 0xFF, bits >> 8], dim=1).to(torch.uint8)  # [rows, 32] bytes
    return planes.contiguous().view(torch.int32)


def unpack_lut(packed: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    planes = packed.contiguous().view(torch.uint8).int()
    bits = planes[:, :16] | (planes[:, 16:] << 8)
    bits = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16)
    return bits.view(dtype)[:rows].float()
