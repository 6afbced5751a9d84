"""any4lib: learned 4/3/2-bit weight quantization (any4) and the tinygemm low-batch GEMM.

    model, tokenizer = any4lib.load_model("meta-llama/Llama-3.2-1B")   # or a local folder
    any4lib.quantize_model(model, "any4", calibration=any4lib.calibrate(model, tokenizer))
    any4lib.perplexity(model, tokenizer, "wikitext2")
    any4lib.generate(model, tokenizer, ["The capital of France is"], max_new_tokens=32).texts
    any4lib.save_quantized(model, "q")   # then AutoModelForCausalLM.from_pretrained("q") after `import any4lib`
    any4lib.quantize_checkpoint("Llama-3-70B/", "any4", tokenizer=tokenizer, device="cuda", out="q70b")  # by layer

Importing the package is cheap and never touches CUDA: the model-level API (which needs transformers) is loaded on
first use, the any4 quantizer joins transformers' registry when transformers loads it (any4lib.hf), and the
kernels build on first GPU use.
"""

from importlib import import_module

from .formats import Format, get_format, list_formats
from .kmeans import kmeans_1d
from .qtensor import QuantizedTensor
from .quant import dequantize, quantize, valid_group_sizes
from .transformers_hook import install as _install_transformers_hook

_install_transformers_hook()  # transformers' from_pretrained reads any4 folders once it loads its registry

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "calibrate": "calibration",
    "ActivationStats": "calibration",
    "QuantLinear": "nn",
    "use_kernels": "nn",
    "pack_model": "nn",
    "generate": "engine.generate",
    "Engine": "engine.generate",
    "quantize_model": "model",
    "save_quantized": "checkpoint",
    "load_quantized": "checkpoint",
    "load_model": "model",
    "Any4Config": "hf",
    "convert_bnb_model": "bnb",
    "quantize_checkpoint": "streaming",
    "bits_per_weight": "model",
    "perplexity": "evaluate",
    "layer_report": "analyze",
    "evaluate_perplexity": "evaluate",
    "evaluate_tasks": "zeroshot",
    "list_tasks": "zeroshot",
    "load_llama2c": "llama2c",
    "Llama2cTokenizer": "llama2c",
    "data_root": "paths",
    "quantize_activations": "activations",
    "list_activation_formats": "activations",
    "rotate_model": "rotation",
}

__all__ = [
    "Format",
    "QuantizedTensor",
    "dequantize",
    "get_format",
    "kmeans_1d",
    "list_formats",
    "quantize",
    "valid_group_sizes",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'any4lib' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
