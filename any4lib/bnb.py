"""bitsandbytes 4-bit models onto tinygemm: each bitsandbytes Linear4bit becomes a QuantLinear holding the same codes.

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    any4lib.convert_bnb_model(model)     # in place; then any4lib.generate, save_quantized, the kernels on a GPU

bitsandbytes stores a [N, K] weight flattened, two codes a byte (the even element in the high nibble), blocks of
`blocksize` consecutive weights each scaled by its absmax: w = code_table[code] * absmax in float32. With K a
multiple of the block size every block lies in one row, so that is the contract's formula with group_size =
blocksize, lut = the code table (nf4: NF4's levels; fp4: bitsandbytes' own FP4 table, format "fp4_bnb") and
scale = absmax; the dequantized weights are bit for bit bitsandbytes'. Double quantization stores the absmax as 8-bit
codes into a second table with a float32 scale per 256 of them plus one offset: they are dequantized to float32
first, as bitsandbytes does. A weight bitsandbytes' CPU kernel has already run is read in the layout it repacked
it to.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import get_format
from .grids import BNB_FP4, NF4_LEVELS
from .model import set_submodule
from .nn import QuantLinear
from .qtensor import QuantizedTensor

# bitsandbytes quant_type -> (any4lib format, its code table)
FORMATS = {"nf4": ("nf4", NF4_LEVELS), "fp4": ("fp4_bnb", BNB_FP4)}
CPU_BLOCK_ROWS = 32  # bitsandbytes' CPU kernel layout: rows interleaved by 32


def absmax_float32(quant_state) -> torch.Tensor:
    """The per-block absmax as float32: stored, or (double quantization) code[byte] * its block's scale + offset."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    inner = quant_state.state2
    codes = quant_state.absmax.reshape(-1).long()
    scales = inner.absmax.float().repeat_interleave(inner.blocksize)[: codes.numel()]
    return inner.code.float().to(codes.device)[codes] * scales + quant_state.offset.float()


def codes_of_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [N, K] codes of a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel (on the first CPU forward:
    functional._convert_weight_packed_for_cpu): per block of 32 rows and pair of columns, the 64 codes (32 rows x 2
    columns) in 32 bytes, the first 32 in the low nibbles, the last 32 in the high ones."""
    pairs = packed.reshape(-1, CPU_BLOCK_ROWS)
    codes = torch.cat([pairs & 0xF, pairs >> 4], -1)
    return codes.reshape(n // CPU_BLOCK_ROWS, k // 2, CPU_BLOCK_ROWS, 2).transpose(1, 2).reshape(n, k)


def quantized_from_bnb(packed: torch.Tensor, quant_state) -> QuantizedTensor:
    """The QuantizedTensor of a bitsandbytes 4-bit weight (Params4bit data and its QuantState), in its stored layout
    or in the one bitsandbytes' CPU kernel repacked it to (its absmax then rounded to bf16, [K / block, N]: what
    bitsandbytes multiplies by from then on)."""
    if quant_state.quant_type not in FORMATS:
        raise ValueError(f"bitsandbytes quant_type {quant_state.quant_type!r}: nf4 and fp4 convert")
    fmt, table = FORMATS[quant_state.quant_type]
    code = quant_state.code.float().cpu()
    if not torch.equal(code, table):
        raise ValueError(f"bitsandbytes {quant_state.quant_type} code table {code.tolist()} is not {fmt}'s")
    n, k = quant_state.shape
    block = quant_state.blocksize
    if k % block:
        raise ValueError(f"a [{n}, {k}] weight in bitsandbytes blocks of {block}: blocks would span rows; "
                         f"K must be a multiple of the block size")
    data = packed.view(torch.uint8)
    if getattr(quant_state, "packing_format_for_cpu", False):
        codes, scale = codes_of_cpu_layout(data, n, k), quant_state.absmax.T.float()
    else:
        data = data.reshape(-1)
        codes = torch.stack([data >> 4, data & 0xF], -1).reshape(n, k)
        scale = absmax_float32(quant_state).reshape(n, k // block)
    return QuantizedTensor(format=fmt, bits=get_format(fmt).bits, group_size=block, codes=codes,
                           lut=table[None].to(codes.device), scale=scale.contiguous(), zero=None)


def quantize_with_bnb(w: torch.Tensor, quant_type: str, blocksize: int = 64, double_quant: bool = False
                      ) -> QuantizedTensor:
    """w quantized by bitsandbytes itself (functional.quantize_4bit), as a QuantizedTensor."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return quantized_from_bnb(packed, state)


def convert_bnb_model(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes Linear4bit of `model` by the QuantLinear of the same weight (in place; returns
    model). A model from_pretrained loaded with a BitsAndBytesConfig stops being a bitsandbytes model."""
    import bitsandbytes as bnb

    converted = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            if weight.quant_state is None:
                raise ValueError(f"{name}: its Params4bit is not quantized yet (bitsandbytes quantizes on .to(device))")
            layer = QuantLinear(quantized_from_bnb(weight.data, weight.quant_state), module.bias)
            set_submodule(model, name, layer.to(weight.device))
            converted += 1
    if converted == 0:
        raise ValueError("the model holds no bitsandbytes Linear4bit layer to convert")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # no longer bitsandbytes' to save or reload
    return model
