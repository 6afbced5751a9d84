"""The generation engine: a Llama decoder built from a loaded model's own weights, with a static KV cache, fused
projections, Triton decode attention / add + RMSNorm, tinygemm layers and a compiled (CUDA-graphed) decode step.

model.py the decoder; attention.py, rmsnorm.py its Triton kernels; rope.py RoPE frequencies; sampling.py the next
token; generate.py prefill + decode loop, `Engine`, `generate`; random_weights.py the benchmark's stand-in model.
Importing it touches no CUDA and no Triton (both load on first GPU use).
"""

from .generate import Engine, Generation, generate, generate_ids, make_step
from .model import COVERED, LlamaDecoder, UnsupportedModel, check_model

__all__ = ["COVERED", "Engine", "Generation", "LlamaDecoder", "UnsupportedModel", "check_model", "generate",
           "generate_ids", "make_step"]
