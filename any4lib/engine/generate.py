"""Generation with the engine's decoder: prefill, then a static-cache decode loop whose step is compiled on CUDA.

    engine = Engine(model, tokenizer)                    # a Llama from load_model / quantize_model / load_quantized
    out = engine.generate(["Once upon a time", "Zoo"], max_new_tokens=64, temperature=0.8, top_p=0.9, seed=0)
    out.texts, out.timing                                # timing: prefill / decode tokens/s, peak GPU memory

`any4lib.generate(model, tokenizer, prompts, ...)` does the same, reusing one Engine per model, and falls back to
transformers' `generate` (one warning) for architectures the engine does not cover.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..checks import check_dtype
from ..evaluate import computing_in
from ..nn import pack_model
from .model import LlamaDecoder, UnsupportedModel, check_model
from .sampling import check_sampling, greedy, sample

COMPILE_MODES = ("auto", "blocks", "reduce-overhead", "cudagraph", "none")


# ---- one step and the prefill --------------------------------------------------------------------------------------


def decode_step(model: LlamaDecoder, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One greedy step: token [B] at position pos [1] -> the next token [B]."""
    return greedy(model(token[:, None], pos)[:, -1])


def logits_step(model: LlamaDecoder, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One step's logits [B, vocab] (for sampling outside the compiled step)."""
    return model(token[:, None], pos)[:, -1]


def prefill(model: LlamaDecoder, prompt: torch.Tensor) -> torch.Tensor:
    """Run the prompt [B, T] through the model from position 0, eagerly (compiled blocks would recompile for its
    length); returns the logits of its last position [B, vocab]."""
    with torch.compiler.set_stance("force_eager"):
        return model(prompt, torch.arange(prompt.shape[1], device=prompt.device), last_only=True)[:, -1]


def graphed_step(step, model: LlamaDecoder, batch: int, device):
    """`step` (possibly over compiled blocks) captured once into one CUDA graph, replayed per token."""
    token = torch.zeros(batch, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles, autotunes, allocates: nothing of that may happen during capture
            step(model, token, pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(model, token, pos)

    def replay(_model, tok, p):
        token.copy_(tok)
        pos.copy_(p)
        graph.replay()
        return out

    return replay


def compile_blocks(model: LlamaDecoder) -> None:
    """torch.compile each decoder block and the final norm (one compile serves all blocks: same code)."""
    for block in model.model.layers:
        block.compile(fullgraph=True, dynamic=False)
    model.model.norm.compile(fullgraph=True, dynamic=False)


def make_step(model: LlamaDecoder, compile_mode: str, batch: int, device, step=decode_step):
    """The per-token step, made fast by `compile_mode`:

    blocks: torch.compile (inductor) on each decoder block (one compile serves all: they share their code), then
        the whole step captured in one CUDA graph. Compiles in seconds where the next mode takes minutes.
    reduce-overhead: torch.compile(mode="reduce-overhead") of the whole step (inductor + CUDA graphs).
    cudagraph: the eager step captured in one CUDA graph (no compiler). none: eager. auto: blocks on CUDA, else none.
    """
    if compile_mode == "auto":
        compile_mode = "blocks" if torch.device(device).type == "cuda" else "none"

    def eager_step(*args):  # blocks compiled by an earlier mode stay eager here
        with torch.compiler.set_stance("force_eager"):
            return step(*args)

    if compile_mode == "blocks":
        compile_blocks(model)
        return graphed_step(step, model, batch, device)
    if compile_mode == "reduce-overhead":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    if compile_mode == "cudagraph":
        return graphed_step(eager_step, model, batch, device)
    if compile_mode == "none":
        return eager_step
    raise ValueError(f"unknown compile mode {compile_mode!r}: use {', '.join(COMPILE_MODES)}")


# ---- the loop ------------------------------------------------------------------------------------------------------


def static_batch(prompts: Sequence[Sequence[int]], max_batch: int) -> tuple[list[Sequence[int]], list[int]]:
    """The cache's static batch: the prompts, then copies of the last one in the unused rows; and each row's left
    padding up to the longest prompt."""
    if len(prompts) > max_batch:
        raise ValueError(f"batch of {len(prompts)} prompts, but the cache was built for {max_batch}; build the Engine "
                         f"with max_batch >= {len(prompts)} (any4lib.generate grows it)")
    rows = list(prompts) + [prompts[-1]] * (max_batch - len(prompts))
    length = max(len(p) for p in rows)
    return rows, [length - len(p) for p in rows]


@dataclass
class Generation:
    """What generate returns: per prompt the new token ids and their text (cut at EOS / a stop string), and timing."""

    tokens: list[list[int]]
    texts: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)


def generate_ids(model: LlamaDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_ids: Sequence[int] = (), stop: Callable[[int, list[int]], bool] | None = None,
                 on_tokens: Callable[[list[int | None]], None] | None = None, step=None, pad_id: int = 0) -> Generation:
    """Token-level generation on a decoder whose caches are set up (setup_caches) for at least this batch and length.

    prompts: token ids, any lengths (left-padded). stop(i, tokens_i): whether sequence i is done (stop strings).
    on_tokens: called after each step with the new token of every sequence (None once it has finished). step: the
    decode step from make_step (decode_step or logits_step, greedy or not); eager when None. Sequences finish at an
    EOS id (not included), a stop, or max_new_tokens; the loop ends when all have.
    """
    check_sampling(temperature, top_k, top_p)
    batch, device = len(prompts), model.device
    if batch == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the tokenizer's BOS, if it has one)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    length = max(len(p) for p in prompts)
    rows, pad = static_batch(prompts, model.max_batch)
    if length + max_new_tokens > model.max_len:
        raise ValueError(f"prompt of {length} tokens + {max_new_tokens} new ones = {length + max_new_tokens} positions, "
                         f"the cache holds {model.max_len} (the model's maximum positions or the Engine's max_len)")
    prompt = torch.tensor([[pad_id] * n + list(p) for p, n in zip(rows, pad)], device=device)
    model.set_padding(torch.tensor(pad, device=device))
    greedy_step = temperature == 0
    step = step or (decode_step if greedy_step else logits_step)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    eos = set(eos_ids)
    watch = bool(eos) or stop is not None or on_tokens is not None  # each step's tokens read on the host

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        token = sample(prefill(model, prompt), temperature, top_k, top_p, generator)
        sync()
        t1 = time.perf_counter()
        prefill_peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out, done = [token], [False] * batch
        results: list[list[int]] = [[] for _ in range(batch)]
        pos = torch.tensor([length], device=device)
        steps = 0
        while True:
            if watch:
                done = _record(token.tolist()[:batch], results, done, eos, stop, on_tokens)
                if all(done):
                    break
            if steps == max_new_tokens - 1:
                break
            result = step(model, token, pos)
            # Clone: a CUDA-graphed step reuses its output buffer on the next replay.
            token = result.clone() if greedy_step else sample(result, temperature, top_k, top_p, generator)
            out.append(token)
            pos += 1
            steps += 1
        sync()
        t2 = time.perf_counter()
    if not watch:
        results = torch.stack(out, 1)[:batch].tolist()
    timing = {
        "prefill_s": t1 - t0,
        "prefill_tok_s": sum(len(p) for p in prompts) / (t1 - t0),
        "decode_s": t2 - t1,
        "decode_steps": steps,
        "decode_tok_s": model.max_batch * steps / (t2 - t1) if steps else float("nan"),
        "decode_ms_per_step": 1e3 * (t2 - t1) / steps if steps else float("nan"),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
        "prefill_peak_gpu_gb": prefill_peak / 1e9,
    }
    return Generation(tokens=results, timing=timing)


def _record(new: list[int], results, done, eos, stop, on_tokens) -> list[bool]:
    """Append each unfinished sequence's new token; mark the ones that finish."""
    shown: list[int | None] = []
    for i, tok in enumerate(new):
        if done[i] or tok in eos:
            done[i] = True
            shown.append(None)
            continue
        results[i].append(tok)
        shown.append(tok)
        done[i] = stop is not None and stop(i, results[i])
    if on_tokens is not None:
        on_tokens(shown)
    return done


# ---- the engine a user holds ----------------------------------------------------------------------------------------


class Engine:
    """A model's decoder with its tokenizer, caches and compiled steps (see the module docstring).

    model: a transformers Llama (QuantLinear layers packed in place for the kernels by pack_model when computing in
    bf16 / fp16; in float32 they run their dequantized weights). dtype: what the engine computes in, default float32
    on a CPU (as evaluation does: its greedy text is then the float32 model's) and the model's own dtype on a GPU; a
    stored dtype other than it is cast for each call, the model keeping its own. max_batch / max_len: the cache
    (max_len defaults to the model's maximum positions, capped at 4096). fuse: q/k/v and gate/up stacked (default on
    CUDA; the transformers model's separate layers are then no longer usable, see LlamaDecoder.from_model). compile:
    make_step's mode for the decode step.
    """

    def __init__(self, model, tokenizer, max_batch: int = 1, max_len: int | None = None, fuse: bool | None = None,
                 compile: str = "auto", attention: str = "triton", norm: str = "triton",
                 dtype: torch.dtype | None = None):
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}: use {', '.join(COMPILE_MODES)}")
        check_model(model)
        device, stored = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
        self.dtype = check_dtype(dtype) if dtype is not None else torch.float32 if device.type == "cpu" else stored
        if self.dtype in (torch.bfloat16, torch.float16):
            pack_model(model, self.dtype)
        fuse = device.type == "cuda" if fuse is None else fuse
        self.decoder = LlamaDecoder.from_model(model, fuse=fuse).set_decode_attention(attention).set_decode_norm(norm)
        self.tokenizer, self.compile = tokenizer, compile
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.resize(max_batch, max_len or min(limit, 4096))

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    def resize(self, max_batch: int, max_len: int) -> None:
        """New caches (and steps, which are built for one batch size)."""
        with computing_in(self.decoder, self.dtype):  # the cache takes the compute dtype
            self.decoder.setup_caches(max_batch, max_len)
        self._steps = {}

    def step(self, greedy_step: bool):
        """The compiled decode step for this batch size and padding (built on first use)."""
        d = self.decoder
        key = (greedy_step, d.max_batch, d.padded)
        if key not in self._steps:
            torch._dynamo.reset()
            fn = decode_step if greedy_step else logits_step
            self._steps[key] = make_step(d, self.compile, d.max_batch, d.device, fn)
        return self._steps[key]

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_strings: Sequence[str] = (), eos: bool = True,
                 stream: Callable[[int, str], None] | None = None) -> Generation:
        """Continue each prompt (a string or a list of them). stop_strings: a sequence ends at the first one (cut from
        its text); eos: end at the tokenizer's EOS. stream(i, text): each new piece of text of sequence i."""
        prompts = as_prompts(prompts)
        ids = [self._encode(p) for p in prompts]
        longest = max(map(len, ids), default=0)
        limit = getattr(self.decoder.config, "max_position_embeddings", None)
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new ones exceeds the model's "
                             f"{limit} positions (max_position_embeddings); shorten it or ask for fewer tokens")
        texts: list[str] = [""] * len(ids)

        def text_of(i, tokens):
            texts[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return texts[i]

        stop = None
        if stop_strings:
            stop = lambda i, tokens: any(s in text_of(i, tokens) for s in stop_strings)  # noqa: E731
        on_tokens = None
        if stream is not None:
            shown = [0] * len(ids)
            streamed: list[list[int]] = [[] for _ in ids]

            def on_tokens(new):
                for i, tok in enumerate(new):
                    if tok is None:
                        continue
                    streamed[i].append(tok)
                    text = self.tokenizer.decode(streamed[i], skip_special_tokens=True)
                    if len(text) > shown[i]:
                        stream(i, text[shown[i]:])
                        shown[i] = len(text)

        eos_ids = _eos_ids(self.tokenizer) if eos else ()
        greedy_step = temperature == 0
        _, pad = static_batch(ids, self.max_batch)
        self.decoder.set_padding(torch.tensor(pad, device=self.decoder.device))  # the step is built for it
        step = self.step(greedy_step)
        with computing_in(self.decoder, self.dtype):
            out = generate_ids(self.decoder, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, eos_ids=eos_ids, stop=stop, on_tokens=on_tokens, step=step,
                               pad_id=_pad_id(self.tokenizer))
        out.texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
        for i, text in enumerate(out.texts):
            cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
            if cut >= 0:
                out.texts[i] = text[:cut]
        return out

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])


def as_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompt strings from one string or a non-empty sequence of them; anything else is a clear error."""
    listed = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, Sequence) else []
    if not listed or not all(isinstance(p, str) for p in listed):
        raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r}")
    return listed


def _eos_ids(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


# ---- any4lib.generate ------------------------------------------------------------------------------------------------

_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64, **options) -> Generation:
    """Generate from `model` (see Engine.generate for the options) on the engine, built once per model and grown
    when a call needs a bigger batch or cache. Architectures the engine does not cover run transformers' generate
    (greedy / sampled, EOS; no stop strings or streaming there) after a one-line warning."""
    prompts = as_prompts(prompts)
    engine_options = {k: options.pop(k) for k in ("fuse", "compile", "attention", "norm", "dtype") if k in options}
    try:
        engine = _engines.get(model)
        if engine is None:
            engine = Engine(model, tokenizer, max_batch=len(prompts), **engine_options)
            _engines[model] = engine
    except UnsupportedModel as err:
        warnings.warn(f"any4lib.generate: {err}; using transformers' generate instead", stacklevel=2)
        return _hf_generate(model, tokenizer, prompts, max_new_tokens, **options)
    if len(prompts) > engine.max_batch:
        engine.resize(len(prompts), engine.max_len)
    return engine.generate(prompts, max_new_tokens, **options)


def _hf_generate(model, tokenizer, prompts, max_new_tokens, temperature: float = 0.0, top_k=None, top_p=None,
                 seed=None, eos: bool = True, stop_strings=(), stream=None) -> Generation:
    check_sampling(temperature, top_k, top_p)
    if stop_strings or stream is not None:
        raise ValueError("stop_strings and stream need the engine; this model runs transformers' generate")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos_ids = _eos_ids(tokenizer) if eos else []
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    longest, pad = max(map(len, ids)), _pad_id(tokenizer)
    batch = {"input_ids": torch.tensor([[pad] * (longest - len(i)) + i for i in ids], device=device),
             "attention_mask": torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids], device=device)}
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0) \
        if temperature > 0 else dict(do_sample=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos_ids or None, **sampling)
    seconds = time.perf_counter() - start
    new = out[:, longest:].tolist()
    tokens = [_until(row, set(eos_ids)) for row in new]
    return Generation(tokens=tokens, texts=[tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
                      timing={"total_s": seconds, "decode_tok_s": sum(map(len, tokens)) / seconds})


def _until(row: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[:i]
    return row
