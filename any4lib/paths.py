"""Where data lives: models by name, and the named text sets the evaluations and calibration read.

The data folder is never part of the repository: it is `$ANY4_DATA`, else `../shared/data` beside the checkout.
A named set is read from its local file under that folder when present, else from the Hugging Face hub (when the
hub is reachable: offline, the error says at once where to put a local copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .hub import OFFLINE_ENV, hub_reachable

DATA_ENV = "ANY4_DATA"
CACHE_ENV = "ANY4_CACHE"
# The any4 paper's perplexity slice of the large sets: the first 256 windows of 2048 tokens of the stream. Reading
# 8 characters per token of it bounds the download while leaving enough text for any tokenizer.
PAPER_WINDOWS, PAPER_SEQ_LEN = 256, 2048
STREAM_CHARS = 8 * PAPER_WINDOWS * PAPER_SEQ_LEN


def cache_root() -> Path:
    """Where JIT-built extensions are cached: `$ANY4_CACHE` if set, else ~/.cache/any4lib."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "any4lib"))


def data_root() -> Path:
    """`$ANY4_DATA` if set, else `shared/data` next to the checkout (`<checkout>/../shared/data`)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class TextSet:
    """A named text: its file under data_root(), and where it lives on the hub (None: local only)."""

    local: str
    hub: tuple[str, str | None, str, str] | None = None  # (dataset id, config, split, text field)
    hub_files: str | None = None  # data_files, for hub sets read from one shard
    joiner: str = "\n\n"
    max_chars: int | None = None  # streamed: the first records, up to this many characters (None: the whole split)


TEXT_SETS: dict[str, TextSet] = {
    "wikitext2": TextSet("wikitext-2-v1/test.txt", ("wikitext", "wikitext-2-v1", "test", "text")),
    "wikitext2_valid": TextSet("wikitext-2-v1/valid.txt", ("wikitext", "wikitext-2-v1", "validation", "text")),
    "ptb": TextSet("ptb/test.txt", ("ptb_text_only", "penn_treebank", "test", "sentence"), joiner="\n"),
    "ptb_valid": TextSet("ptb/valid.txt", ("ptb_text_only", "penn_treebank", "validation", "sentence"), joiner="\n"),
    "c4": TextSet(
        "c4/validation.txt", ("allenai/c4", None, "validation", "text"),
        hub_files="en/c4-validation.00000-of-00008.json.gz", joiner=" ", max_chars=STREAM_CHARS,
    ),
    # GPTQ's calibration shard of C4.
    "c4_train": TextSet(
        "c4/train.txt", ("allenai/c4", None, "train", "text"),
        hub_files="en/c4-train.00000-of-01024.json.gz", joiner=" ", max_chars=STREAM_CHARS,
    ),
    "codeparrot": TextSet(
        "codeparrot/validation.txt", ("huggingface-course/codeparrot-ds-valid", None, "validation", "content"),
        max_chars=STREAM_CHARS,
    ),
    "pile": TextSet("pile/train.txt", ("monology/pile-uncopyrighted", None, "train", "text"), max_chars=STREAM_CHARS),
    "heldout": TextSet("corpora/ref-en/heldout.txt"),
}


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """A local model folder / llama2.c file, a model name under data_root()/models, or else a hub id (returned as is)."""
    for candidate in (Path(name_or_path).expanduser(), data_root() / "models" / str(name_or_path)):
        if candidate.exists():
            return candidate
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not a hub id "org/name"
        raise FileNotFoundError(f"model path {text!r} does not exist (also looked under {data_root() / 'models'})")
    return text


def calibration_prompt() -> str:
    """The paper's one diverse calibration prompt, shipped with the package."""
    return resources.files("any4lib").joinpath("data/calibration_prompt.txt").read_text()


def text_file(name_or_path: str | os.PathLike) -> Path | None:
    """The local file behind a set name or a path, or None when there is none."""
    if str(name_or_path) in TEXT_SETS:
        path = data_root() / TEXT_SETS[str(name_or_path)].local
    else:
        path = Path(name_or_path).expanduser()
    return path if path.is_file() else None


def load_text(name_or_path: str | os.PathLike) -> str:
    """The full text of a named set (see TEXT_SETS) or of a local text file.

    Raises FileNotFoundError naming every place tried when the text is neither local nor on the hub.
    """
    local = text_file(name_or_path)
    if local is not None:
        return local.read_text(encoding="utf-8")
    name = str(name_or_path)
    if name not in TEXT_SETS:
        raise FileNotFoundError(
            f"text {name!r} is neither a file nor a known set name; known sets: {', '.join(TEXT_SETS)} "
            f"(looked under {DATA_ENV}={data_root()})"
        )
    spec = TEXT_SETS[name]
    tried = [str(data_root() / spec.local)]
    if spec.hub is None:
        raise FileNotFoundError(f"text set {name!r} is local only and was not found at {tried[0]}; set {DATA_ENV}")
    hub_id, config, split, _ = spec.hub
    tried.append(f"hub {hub_id}" + (f"/{config}" if config else "") + f" [{split}]")
    how = f"Put the text at {tried[0]} or point {DATA_ENV} at a folder holding {spec.local}."
    if not hub_reachable():
        raise FileNotFoundError(f"text set {name!r} not found; tried: {'; '.join(tried)} (the hub is unreachable: "
                                f"offline, or {', '.join(OFFLINE_ENV[:1])} is set). {how}")
    try:
        return _hub_text(spec)
    except Exception as err:  # the hub's errors vary (offline, missing config, auth): report them all the same way
        raise FileNotFoundError(
            f"text set {name!r} not found; tried: {'; '.join(tried)} ({type(err).__name__}: {err}). {how}"
        ) from err


def _hub_text(spec: TextSet) -> str:
    import datasets  # lazily: only the hub fallback needs it

    hub_id, config, split, field = spec.hub
    kwargs = {"data_files": {split: spec.hub_files}} if spec.hub_files else {}
    if spec.max_chars is None:
        return spec.joiner.join(datasets.load_dataset(hub_id, config, split=split, **kwargs)[field])
    texts, size = [], 0
    for row in datasets.load_dataset(hub_id, config, split=split, streaming=True, **kwargs):
        texts.append(row[field])
        size += len(row[field]) + len(spec.joiner)
        if size >= spec.max_chars:
            break
    return spec.joiner.join(texts)
