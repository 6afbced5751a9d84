"""Stand-in checkpoints: the published configs of the paper's models with seeded random weights.

They have the exact shapes of Llama-3.2-1B, Llama-3-8B, Llama-3-70B and Mixtral-8x7B (plus a small Mixtral-style
MoE), so they measure time, memory and the machinery (sharded loading, per-expert quantization, layer-by-layer
pipelines) where the hub's weights are out of reach. Their weights model no language: never report their accuracy.
Each one says so in its config (`any4_standin`) and in a README beside it.

`StandinWeights` generates any tensor from (seed, tensor name) alone, so one decoder layer at a time can be produced
on the fly (`layer_tensors(i)`): Llama-3-70B in bf16 is 140 GB, more than a disk or a GPU holds. `write_standin`
writes the same tensors as a Hugging Face folder, sharded as the hub shards them (`model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json`, the hub's tensor names). `CheckpointWeights` reads a folder's shards through
the same interface.

The tokenizer is a stand-in too (by default the shared ref-en-16m one, 8,192 tokens): the configs keep their
published vocabulary sizes, so embedding and LM-head shapes are exact; the tokenizer only ever produces ids below
its own size (it must not exceed the model's), and the config's bos / eos / pad ids are set to the tokenizer's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

NOTE = "random weights with the published shapes: for time, memory and machinery, never for accuracy"
_LLAMA3 = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256,
    num_key_value_heads=8, attention_bias=False, mlp_bias=False, initializer_range=0.02, tie_word_embeddings=False,
)
_MIXTRAL = dict(
    model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e6, vocab_size=32000,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None,
    initializer_range=0.02, tie_word_embeddings=False,
)
# name -> (the hub model it stands in for, its config.json's shape fields)
STANDINS: dict[str, tuple[str, dict]] = {
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", _LLAMA3 | dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64,
        max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192),
    )),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", _LLAMA3 | dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=8192,
    )),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", _LLAMA3 | dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        max_position_embeddings=8192,
    )),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", _MIXTRAL | dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=32768,
    )),
    # Not a published model: Mixtral's structure (8 experts, top 2, GQA 4:1) at 0.8B parameters, small enough to
    # run every stage of the suite on one GPU in minutes.
    "moe-small": ("(none: a small Mixtral-style MoE)", _MIXTRAL | dict(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096,
    )),
}  # fmt: skip
DEFAULT_TOKENIZER = "ref-en-16m"
SHARD_BYTES = 5 * 10**9  # the hub's shard size for these models


def standin_config(name: str, seed: int = 0, **overrides):
    """The transformers config of stand-in `name` (see STANDINS), labelled as a stand-in; `overrides` replace fields
    (scaled_down uses them for test-sized copies)."""
    from transformers import AutoConfig

    if name not in STANDINS:
        raise ValueError(f"unknown stand-in {name!r}; choose one of {', '.join(STANDINS)}")
    source, fields = STANDINS[name]
    fields = fields | overrides
    label = {"name": name, "stands_in_for": source, "seed": seed, "note": NOTE}
    if overrides:
        label["scaled_down"] = overrides
    return AutoConfig.for_model(**fields, dtype="bfloat16", any4_standin=label)


def scaled_down(name: str, seed: int = 0, vocab_size: int | None = None, layers: int = 2):
    """A test-sized copy of stand-in `name`: the same structure (GQA ratio, RoPE scaling, tied embeddings, experts
    and top-k) with hidden size 128, 2 layers and `vocab_size` (default: the published one)."""
    fields = STANDINS[name][1] if name in STANDINS else {}  # an unknown name: standin_config says so
    group = fields.get("num_attention_heads", 8) // fields.get("num_key_value_heads", 8)
    overrides = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_key_value_heads=2,
        num_attention_heads=2 * group, head_dim=128 // (2 * group),
    )
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return standin_config(name, seed, **overrides)


def layer_shapes(config, i: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of decoder layer `i`, named as the hub's checkpoints name them."""
    h, p = config.hidden_size, f"model.layers.{i}."
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
    }
    inter = config.intermediate_size
    if config.model_type == "mixtral":
        shapes[p + "block_sparse_moe.gate.weight"] = (config.num_local_experts, h)
        for e in range(config.num_local_experts):
            expert = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {expert + "w1.weight": (inter, h), expert + "w2.weight": (h, inter), expert + "w3.weight": (inter, h)}
    elif config.model_type == "llama":
        shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}  # fmt: skip
    else:
        raise ValueError(f"stand-ins cover llama and mixtral models, not {config.model_type!r}")
    return shapes


def other_shapes(config) -> dict[str, tuple[int, ...]]:
    """The tensors outside the decoder layers: embeddings, final norm, and the LM head unless tied."""
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


class StandinWeights:
    """Every tensor of a stand-in, generated on demand from (seed, name): norms are ones, the rest N(0, 0.02)
    (transformers' initialisation). The same name gives the same tensor in any order, on a given device type."""

    def __init__(self, config, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
        self.config, self.seed, self.device, self.dtype = config, seed, torch.device(device), dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        generator = torch.Generator(self.device).manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        values = torch.empty(shape, device=self.device).normal_(0.0, self.config.initializer_range, generator=generator)
        return values.to(self.dtype)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer `i`'s tensors by their checkpoint names."""
        return {name: self.tensor(name, shape) for name, shape in layer_shapes(self.config, i).items()}

    def other_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, shape) for name, shape in other_shapes(self.config).items()}


class CheckpointWeights:
    """A Hugging Face folder's tensors through StandinWeights' interface, read from its safetensors shards."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            with safe_open(os.fspath(self.folder / "model.safetensors"), "pt") as f:
                self.files = {name: "model.safetensors" for name in f.keys()}

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for file in sorted({self.files[n] for n in names}):
            with safe_open(os.fspath(self.folder / file), "pt") as f:
                out |= {n: f.get_tensor(n) for n in names if self.files[n] == file}
        return out

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        return self._read([n for n in self.files if n.startswith(prefix)])

    def other_tensors(self) -> dict[str, torch.Tensor]:
        return self._read([n for n in self.files if not n.startswith("model.layers.")])


def _shard_plan(config, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in checkpoint order (embeddings, layers, final norm, head), cut into shards of at most
    max_shard_bytes (a tensor larger than that gets a shard of its own)."""
    others = other_shapes(config)
    order = [("model.embed_tokens.weight", others.pop("model.embed_tokens.weight"))]
    for i in range(config.num_hidden_layers):
        order += layer_shapes(config, i).items()
    order += others.items()
    shards, size = [[]], 0
    for name, shape in order:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def standin_bytes(config) -> int:
    """The size of a stand-in's bf16 weights."""
    shapes = other_shapes(config) | {n: s for i in range(config.num_hidden_layers) for n, s in layer_shapes(config, i).items()}
    return 2 * sum(torch.Size(s).numel() for s in shapes.values())


def standin_label(model: str | os.PathLike) -> dict | None:
    """The `any4_standin` label of a local model folder (or a name under data_root()/models), None for any other
    model: records and tables made from a stand-in carry it."""
    from .paths import resolve_model

    source = resolve_model(model)
    config = Path(source) / "config.json" if not isinstance(source, str) else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("any4_standin")


def load_tokenizer(tokenizer=None):
    """A tokenizer object: given, or loaded from a folder / a model name under data_root()/models."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    from .paths import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(tokenizer or DEFAULT_TOKENIZER))


def write_standin(
    config,
    folder: str | os.PathLike,
    tokenizer=None,
    seed: int = 0,
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write stand-in `config` (a STANDINS name or a config from standin_config / scaled_down) to `folder` as a
    Hugging Face checkpoint; returns the folder. tokenizer: object, folder or model name (default ref-en-16m).

    The folder appears only when complete (written beside it, then renamed); a folder already holding the same
    stand-in (config and seed) is kept as it is.
    """
    config = standin_config(config, seed) if isinstance(config, str) else copy.deepcopy(config)
    config.any4_standin = {**config.any4_standin, "seed": seed}
    folder = Path(folder)
    tokenizer = load_tokenizer(tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
                         f"{config.vocab_size}: pick a tokenizer with at most that many")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if (folder / "config.json").is_file():
        if json.loads((folder / "config.json").read_text()).get("any4_standin") == config.any4_standin:
            return folder
        raise FileExistsError(f"{folder} exists and holds something else than this stand-in; remove it or pick another")

    needed = standin_bytes(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if needed > free:
        raise OSError(f"{config.any4_standin['name']} needs {needed / 1e9:.1f} GB and {folder.parent} has "
                      f"{free / 1e9:.1f} GB free; use StandinWeights(config).layer_tensors(i) to generate it per layer")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _write_shards(StandinWeights(config, seed), _shard_plan(config, max_shard_bytes), partial, progress)
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    label = config.any4_standin
    (partial / "README.md").write_text(
        f"# Stand-in for {label['stands_in_for']}\n\nWritten by any4lib.standins (seed {seed}): {NOTE}.\n"
        "The tokenizer is a stand-in too (not the model's own).\n"
    )
    partial.rename(folder)
    return folder


def _write_shards(weights: StandinWeights, shards, folder: Path, progress: bool) -> None:
    from safetensors.torch import save_file

    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    weight_map, total = {}, 0
    bar = tqdm(total=sum(len(s) for s in shards), desc=f"writing {folder.name}", disable=not progress, unit="tensor")
    for filename, shard in zip(names, shards):
        tensors = {}
        for name, shape in shard:
            tensors[name] = weights.tensor(name, shape)
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = filename
            bar.update()
        save_file(tensors, os.fspath(folder / filename), metadata={"format": "pt"})
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
