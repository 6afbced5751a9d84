"""Perplexity over non-overlapping windows of a text set (the protocol of the any4 paper and GPTQ).

The whole text is tokenized once, cut into windows of `seq_len` tokens (the tail that does not fill a window is
dropped), and perplexity is exp of the mean next-token NLL over every predicted token of every window.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import paths


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens (windows * (seq_len - 1))
    windows: int
    seq_len: int


def max_positions(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


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
    seq_len: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    chunk: int | None = None,
) -> PerplexityResult:
    """Perplexity with its token counts. seq_len is capped at the model's maximum positions.

    chunk: feed each window `chunk` tokens at a time through the KV cache, so every linear layer sees
    batch_size * chunk rows, as in decoding (on CUDA, QuantLinear serves up to 16 rows with the tinygemm
    kernels: batch_size=1, chunk=16 measures the kernel path). The logits are the same function either way.
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens or None (whole windows), got {chunk}")
    limit = max_positions(model)
    if limit is not None:
        seq_len = min(seq_len, limit)
    windows = token_windows(tokenizer, dataset, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    name = os.path.basename(os.fspath(dataset))
    try:
        for batch in tqdm(windows.split(batch_size), desc=f"ppl {name}", disable=not progress, leave=False):
            batch = batch.to(device)
            logits = _window_logits(model, batch, chunk)[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
    finally:
        model.train(was_training)
    tokens = windows.shape[0] * (seq_len - 1)
    nll = total / tokens
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
    seq_len: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Perplexity of `model` on a text set ("wikitext2", "ptb", "c4", "heldout", ... or a text file path).

    Windows of `seq_len` tokens (2048 as in the paper, capped at the model's maximum positions), no overlap;
    `max_tokens` evaluates only the first tokens of the text (quick runs).
    """
    return evaluate_perplexity(model, tokenizer, dataset, seq_len, max_tokens, batch_size, progress).ppl
