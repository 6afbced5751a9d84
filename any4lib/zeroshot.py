"""Zero-shot (and few-shot) tasks through lm-eval: its own task registry when the hub is reachable, else local files.

Where a task comes from (resolve_task): with a tasks folder named explicitly (`data_dir`, `$ANY4_TASKS`) a shipped
task reads its local files; otherwise, when the Hugging Face hub is reachable, lm-eval's registry runs any task it
knows by name (downloading its data); offline, the shipped tasks read their local files from `data_root()/tasks`.

Each shipped task is a YAML in `any4lib/tasks/` with lm-eval's prompts and metrics for the built-in task of that
name and `data_files` naming a JSONL file (the hub dataset's records, one per line), found in `<tasks dir>/<task>/`.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import yaml

from .hub import hub_reachable
from .paths import data_root

TASKS_ENV = "ANY4_TASKS"
ALIASES = {"lambada": "lambada_openai"}


def list_tasks() -> list[str]:
    """Names of the shipped task configs."""
    folder = resources.files("any4lib").joinpath("tasks")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def tasks_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(TASKS_ENV):
        return Path(os.environ[TASKS_ENV]).expanduser()
    return data_root() / "tasks"


def task_config(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """The lm-eval config of task `name` with its data files resolved under `tasks_dir(data_dir)/<name>/`."""
    name = ALIASES.get(name, name)
    if name not in list_tasks():
        raise ValueError(f"unknown zero-shot task {name!r}; shipped tasks: {', '.join(list_tasks())}")
    text = resources.files("any4lib").joinpath(f"tasks/{name}.yaml").read_text()
    config = yaml.safe_load(text)
    folder = tasks_dir(data_dir) / name
    files = {}
    for split, filename in config["dataset_kwargs"]["data_files"].items():
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"zero-shot task {name!r}: its {split} split is not at {path}. Put the hub dataset's {split} split "
                f"there as JSONL (one record per line, the hub's fields), or point data_dir= / ${TASKS_ENV} at a "
                f"folder holding {name}/{filename}"
            )
        files[split] = str(path)
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


@functools.cache
def task_registry():
    """lm-eval's index of its built-in tasks (built once: it reads a few thousand YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_task(name: str, data_dir: str | os.PathLike | None = None) -> dict | str:
    """What lm-eval runs for task `name`: a shipped task's config with its local files, or the name itself for
    lm-eval's registry (see the module doc for the order)."""
    explicit = data_dir is not None or bool(os.environ.get(TASKS_ENV))
    if explicit and ALIASES.get(name, name) in list_tasks():
        return task_config(name, data_dir)
    if hub_reachable():
        if name in task_registry().all_tasks:
            return name
        raise ValueError(f"lm-eval has no task {name!r} (`lm-eval ls tasks` lists them); shipped local tasks: "
                         f"{', '.join(list_tasks())}")
    try:
        return task_config(name, data_dir)
    except (ValueError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"zero-shot task {name!r}: the Hugging Face hub is unreachable, so lm-eval's registry cannot fetch its "
            f"data, and no local copy serves it: {err}"
        ) from err


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int = 0,
) -> dict[str, dict[str, float]]:
    """Metrics per task, e.g. `{"piqa": {"acc": .., "acc_stderr": .., "acc_norm": .., ...}}`.

    tasks: any lm-eval task name when the hub is reachable, else the shipped ones (resolve_task). `model` is any
    in-memory HF causal LM (quantized or not) on the device it should run on; `num_fewshot` examples precede each
    question (0: zero-shot, as the paper); `limit` caps the examples per task (for quick checks: not comparable
    with full-set numbers).
    """
    try:  # lazily: lm-eval is slow to import
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"zero-shot tasks need lm-eval's HF backend: pip install 'lm-eval[hf]' ({err})") from err

    resolved = [resolve_task(t, data_dir) for t in tasks]  # fail on a missing task or file before running any
    from_registry = any(isinstance(r, str) for r in resolved)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = simple_evaluate(
        model=lm,
        tasks=resolved,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,
        task_manager=task_registry() if from_registry else TaskManager(include_defaults=False),
    )
    # lm-eval keys metrics "acc,none" (metric, filter); every task here has the single default filter
    return {
        task: {key.split(",")[0]: value for key, value in metrics.items() if "," in key and value != "N/A"}
        for task, metrics in out["results"].items()
    }
