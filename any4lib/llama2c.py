"""Load Karpathy's llama2.c checkpoints (`model.bin`) and tokenizers (`tok*.bin`) as Hugging Face objects.

The model becomes a plain `LlamaForCausalLM` and the tokenizer a `PreTrainedTokenizer`, so quantization,
perplexity, lm-eval and the kernels treat a llama2.c model like any other HF causal LM.

Checkpoint layout (llama2.c "version 0"): 7 int32 header fields, then fp32 tensors in a fixed order.
A negative vocab_size in the header means a separate classifier matrix follows the (unused) RoPE tables.
"""

from __future__ import annotations

import heapq
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizer

HEADER = struct.Struct("<7i")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3: ids 0..2 are <unk>, <s>, </s>
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
NO_MERGE = -1e10  # llama2.c's starting best score: a merge must beat it


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


def read_header(path: str | Path) -> Llama2cHeader:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: too short for a llama2.c header ({len(raw)} bytes, need {HEADER.size})")
    dim, hidden, layers, heads, kv_heads, vocab, seq = HEADER.unpack(raw)
    if min(dim, hidden, layers, heads, kv_heads, seq) <= 0 or vocab == 0 or dim % heads or heads % kv_heads:
        raise ValueError(
            f"{path}: not a llama2.c checkpoint (header dim={dim} hidden_dim={hidden} n_layers={layers} "
            f"n_heads={heads} n_kv_heads={kv_heads} vocab_size={vocab} seq_len={seq}); "
            "only the original fp32 'version 0' export (export.py --version 0 / legacy) is supported"
        )
    return Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq, vocab > 0)


def _read_tensors(path: Path, h: Llama2cHeader) -> dict[str, np.ndarray]:
    L, D, F, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    shapes = {
        "tok_embeddings": (V, D),
        "rms_att": (L, D),
        "wq": (L, h.n_heads * h.head_size, D),
        "wk": (L, h.kv_dim, D),
        "wv": (L, h.kv_dim, D),
        "wo": (L, D, h.n_heads * h.head_size),
        "rms_ffn": (L, D),
        "w1": (L, F, D),
        "w2": (L, D, F),
        "w3": (L, F, D),
        "rms_final": (D,),
        "freq_cis_real": (h.seq_len, h.head_size // 2),
        "freq_cis_imag": (h.seq_len, h.head_size // 2),
    }
    if not h.shared_classifier:
        shapes["wcls"] = (V, D)
    expected = sum(int(np.prod(s)) for s in shapes.values())
    flat = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    if flat.size != expected:
        raise ValueError(
            f"{path}: holds {flat.size} fp32 values after the header, the header "
            f"({h}) implies {expected}; the file is truncated or not a llama2.c version-0 export"
        )
    out, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    return out


def _interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k output rows so HF's rotate-half RoPE equals llama2.c's rotation of adjacent pairs.

    Within each head llama2.c rotates rows (2i, 2i+1) by frequency i; HF rotates (i, i + head_size/2).
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def llama2c_config(h: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_size,
        max_position_embeddings=h.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h.shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def load_llama2c_model(checkpoint_path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    h = read_header(path)
    t = _read_tensors(path, h)
    state = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["rms_final"]}
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        state[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(t["wq"][i], h.n_heads)
        state[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(t["wk"][i], h.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = t["wv"][i]
        state[p + "self_attn.o_proj.weight"] = t["wo"][i]
        state[p + "mlp.gate_proj.weight"] = t["w1"][i]
        state[p + "mlp.down_proj.weight"] = t["w2"][i]
        state[p + "mlp.up_proj.weight"] = t["w3"][i]
    state["lm_head.weight"] = t["tok_embeddings"] if h.shared_classifier else t["wcls"]

    # Built in `dtype` rather than cast after: .to(dtype) would also round RoPE's float32 inv_freq buffer.
    model = AutoModelForCausalLM.from_config(llama2c_config(h), dtype=dtype)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    model.config.name_or_path = str(path)
    return model.eval()


def read_tokenizer(path: str | Path) -> tuple[list[str], list[float]]:
    """Pieces and scores of llama2.c's `tok*.bin`: int32 max_token_length, then per token float32 score, int32
    length, bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")
    raw = path.read_bytes()
    pieces, scores, pos = [], [], 4
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise ValueError(f"{path}: truncated token record at byte {pos}")
        score, n = struct.unpack_from("<fi", raw, pos)
        pos += 8
        if n < 0 or pos + n > len(raw):
            raise ValueError(f"{path}: token {len(pieces)} claims {n} bytes at byte {pos}; the file is corrupt")
        pieces.append(raw[pos : pos + n].decode("utf-8"))
        scores.append(score)
        pos += n
    return pieces, scores


def write_tokenizer(path: str | Path, pieces: list[str], scores: list[float]) -> None:
    encoded = [p.encode("utf-8") for p in pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, encoded))))
        for raw, score in zip(encoded, scores):
            f.write(struct.pack("<fi", score, len(raw)) + raw)


class Llama2cTokenizer(PreTrainedTokenizer):
    """llama2.c's tokenizer: a dummy-prefix space, one token per character (byte fallback to <0xXX>),
    then repeated merging of the adjacent pair whose concatenation scores highest (leftmost on ties).

    `tokenizer(text)` adds BOS (id 1) like llama2.c; `add_special_tokens=False` leaves it out.
    Text is always encoded as text: a literal "<s>" in it is not turned into BOS.
    `save_pretrained(folder)` writes the table back as `tokenizer.bin`; `from_pretrained(folder)` reads it.
    """

    vocab_files_names = {"vocab_file": "tokenizer.bin"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | Path, **kwargs):
        self.pieces, self.scores = read_tokenizer(vocab_file)
        if len(self.pieces) < BYTE_OFFSET + 256:
            raise ValueError(
                f"{vocab_file}: a llama2.c tokenizer needs >= {BYTE_OFFSET + 256} tokens, got {len(self.pieces)}"
            )
        self.piece_to_id = {p: i for i, p in enumerate(self.pieces)}
        kwargs.setdefault("unk_token", self.pieces[UNK_ID])
        kwargs.setdefault("bos_token", self.pieces[BOS_ID])
        kwargs.setdefault("eos_token", self.pieces[EOS_ID])
        kwargs.setdefault("pad_token", self.pieces[UNK_ID])  # padding is masked out; <unk> keeps the vocab unchanged
        kwargs.update(special_tokens_pattern="bos", split_special_tokens=True, clean_up_tokenization_spaces=False)
        super().__init__(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Llama2cTokenizer":
        """Read llama2.c's `tok*.bin`."""
        return cls(vocab_file=path, name_or_path=str(path), **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.piece_to_id)

    def _convert_token_to_id(self, token: str) -> int:
        return self.piece_to_id.get(token, UNK_ID)

    def _convert_id_to_token(self, index: int) -> str:
        return self.pieces[index]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self.pieces[i] for i in self.bpe_ids(text)]

    def bpe_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS: llama2.c's encoding, merged with a heap instead of rescans."""
        if not text:
            return []
        ids = [self.piece_to_id[" "]] if " " in self.piece_to_id else []
        for ch in text:
            i = self.piece_to_id.get(ch)
            ids.extend([i] if i is not None else (b + BYTE_OFFSET for b in ch.encode("utf-8")))
        n = len(ids)
        piece = [self.pieces[i] for i in ids]
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap: list[tuple[float, int, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                merged = piece[i] + piece[j]
                m = self.piece_to_id.get(merged)
                if m is not None and self.scores[m] > NO_MERGE:
                    heapq.heappush(heap, (-self.scores[m], i, merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, merged = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or piece[i] + piece[j] != merged:
                continue  # stale: one side was merged into something else since this entry was pushed
            piece[i], alive[j] = merged, False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            push(i)
            if prv[i] >= 0:
                push(prv[i])
        return [self.piece_to_id[piece[i]] for i in range(n) if alive[i]]

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        out, prev = bytearray(), None
        for tid in (int(t) for t in token_ids):
            p = self.pieces[tid]
            if prev == BOS_ID and p.startswith(" "):
                p = p[1:]  # the dummy prefix after BOS is not part of the text
            prev = tid
            if skip_special_tokens and tid in (UNK_ID, BOS_ID, EOS_ID):
                continue
            byte = BYTE_PIECE.fullmatch(p)
            out += bytes([int(byte.group(1), 16)]) if byte else p.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode([self.piece_to_id[t] for t in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = Path(save_directory) / name
        write_tokenizer(path, self.pieces, self.scores)
        return (str(path),)


def _find_tokenizer(checkpoint: Path, vocab_size: int) -> Path:
    tried = [checkpoint.parent / f"tok{vocab_size}.bin", checkpoint.parent / "tokenizer.bin"]
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"no llama2.c tokenizer for {checkpoint}: tried {', '.join(map(str, tried))}; pass tokenizer_path="
    )


def load_llama2c(
    checkpoint_path: str | Path, tokenizer_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, Llama2cTokenizer]:
    """A llama2.c checkpoint as `(LlamaForCausalLM, tokenizer)`.

    `tokenizer_path` defaults to `tok{vocab_size}.bin`, then `tokenizer.bin`, beside the checkpoint.
    """
    checkpoint_path = Path(checkpoint_path)
    model = load_llama2c_model(checkpoint_path, dtype)
    tok_path = Path(tokenizer_path) if tokenizer_path else _find_tokenizer(checkpoint_path, model.config.vocab_size)
    tokenizer = Llama2cTokenizer.from_file(tok_path, model_max_length=model.config.max_position_embeddings)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but checkpoint {checkpoint_path} "
            f"has vocab_size {model.config.vocab_size}; pass the matching tok*.bin as tokenizer_path"
        )
    return model, tokenizer
