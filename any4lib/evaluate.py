"""Perplexity over non-overlapping windows of a text set (the protocol of the any4 paper and GPTQ).

The whole text is tokenized once, cut into windows of `seq_len` tokens (the tail that does not fill a window is
dropped), and perplexity is exp of the mean next-token NLL over every predicted token of every window.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import paths
from .checks import check_count, check_dtype


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens (windows * (seq_len - 1))
    windows: int
    seq_len: int


def max_positions(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def resolve_seq_len(model: nn.Module, seq_len: int | None) -> int:
    """seq_len checked against the model: None -> min(2048, max positions); above max positions is an error."""
    limit = max_positions(model)
    if seq_len is None:
        return min(2048, limit or 2048)
    return check_count("seq_len", seq_len, 2, limit, none_means=f"min(2048, the model's {limit} positions)")


def default_compute_dtype(model: nn.Module) -> torch.dtype:
    """float32 on CPU (bf16/fp16 matmuls are several times slower there), the model's own dtype elsewhere."""
    param = next(model.parameters())
    return torch.float32 if param.device.type == "cpu" else param.dtype


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype | None):
    """Within the block, the model's floating parameters are `dtype` (None: default_compute_dtype); afterwards they
    are the released ones again (kept aside, so nothing is rounded). Buffers are left alone: QuantLinear's tables and
    RoPE's frequencies are float32 already, and the activations follow the parameters."""
    dtype = check_dtype(dtype) if dtype is not None else default_compute_dtype(model)
    kept = {}
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            kept[param] = param.data
            param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, data in kept.items():
            param.data = data


def token_windows(tokenizer, dataset: str | os.PathLike, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[windows, seq_len] token ids of a text set (name of paths.TEXT_SETS or a text file)."""
    ids = tokenizer(paths.load_text(dataset), return_tensors="pt", verbose=False).input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{dataset}: {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str | os.PathLike,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
) -> PerplexityResult:
    """Perplexity with its token counts. seq_len: None -> min(2048, the model's maximum positions); a longer one
    is an error. dtype: the compute dtype (None: float32 on CPU, the model's dtype elsewhere, see computing_in).
    A non-finite loss is an error, never a number.

    chunk: feed each window `chunk` tokens at a time through the KV cache, so every linear layer sees
    batch_size * chunk rows, as in decoding (on CUDA, QuantLinear serves up to 16 rows with the tinygemm
    kernels: batch_size=1, chunk=16 measures the kernel path). The logits are the same function either way.
    """
    check_count("chunk", chunk, none_means="whole windows")
    check_count("batch_size", batch_size)
    check_count("max_tokens", max_tokens, 2, none_means="the whole text")
    seq_len = resolve_seq_len(model, seq_len)
    windows = token_windows(tokenizer, dataset, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    name = os.path.basename(os.fspath(dataset))
    try:
        with computing_in(model, dtype):
            for batch in tqdm(windows.split(batch_size), desc=f"ppl {name}", disable=not progress, leave=False):
                batch = batch.to(device)
                logits = _window_logits(model, batch, chunk)[:, :-1].float()
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
    finally:
        model.train(was_training)
    tokens = windows.shape[0] * (seq_len - 1)
    nll = total / tokens
    if not math.isfinite(nll):
        raise ValueError(
            f"perplexity on {name}: the mean loss is {nll} (the model's outputs hold NaN/Inf); check the weights "
            "(a damaged checkpoint, a NaN scale) or compute in float32"
        )
    return PerplexityResult(math.exp(nll), nll, tokens, windows.shape[0], seq_len)


def _window_logits(model: nn.Module, batch: torch.Tensor, chunk: int | None) -> torch.Tensor:
    if chunk is None:
        return model(batch).logits
    cache, parts = None, []
    for piece in batch.split(chunk, dim=1):
        out = model(piece, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        parts.append(out.logits)
    return torch.cat(parts, 1)


def perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str | os.PathLike = "wikitext2",
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> float:
    """Perplexity of `model` on a text set ("wikitext2", "ptb", "c4", "heldout", ... or a text file path).

    Windows of `seq_len` tokens (None: 2048 as in the paper, or the model's maximum positions when fewer), no
    overlap; `max_tokens` evaluates only the first tokens of the text (quick runs). Computes in float32 on CPU
    unless `dtype` says otherwise.
    """
    return evaluate_perplexity(model, tokenizer, dataset, seq_len, max_tokens, batch_size, progress, dtype=dtype).ppl
