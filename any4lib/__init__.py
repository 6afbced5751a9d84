"""any4lib: learned 4/3/2-bit weight quantization (any4) and the tinygemm low-batch GEMM.

Importing the package is cheap and never touches CUDA: kernels build on first GPU use.
"""

from .formats import Format, get_format, list_formats
from .kmeans import kmeans_1d
from .qtensor import QuantizedTensor
from .quant import dequantize, quantize, valid_group_sizes

__all__ = [
    "Format",
    "QuantizedTensor",
    "dequantize",
    "get_format",
    "kmeans_1d",
    "list_formats",
    "quantize",
    "valid_group_sizes",
]
