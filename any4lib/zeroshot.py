"""Zero-shot tasks through lm-eval, read from local files (no hub needed).

Each task is a YAML in `any4lib/tasks/` with lm-eval's prompts and metrics for the built-in task of that name and
`data_files` naming a JSONL file (the hub dataset's records, one per line). The folder holding those files is
`<tasks dir>/<task>/`, the tasks dir being the `data_dir` argument, else `$ANY4_TASKS`, else `data_root()/tasks`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

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


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Zero-shot metrics per task, e.g. `{"piqa": {"acc": .., "acc_stderr": .., "acc_norm": .., ...}}`.

    `model` is any in-memory HF causal LM (quantized or not) on the device it should run on; `limit` caps the
    examples per task (for quick checks: not comparable with full-set numbers).
    """
    configs = [task_config(t, data_dir) for t in tasks]  # fail on a missing file before loading lm-eval
    try:  # lazily: lm-eval is slow to import
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"zero-shot tasks need lm-eval's HF backend: pip install 'lm-eval[hf]' ({err})") from err

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = simple_evaluate(
        model=lm,
        tasks=configs,
        num_fewshot=0,
        limit=limit,
        log_samples=False,
        task_manager=TaskManager(include_defaults=False),
    )
    # lm-eval keys metrics "acc,none" (metric, filter); every task here has the single default filter
    return {
        task: {key.split(",")[0]: value for key, value in metrics.items() if "," in key and value != "N/A"}
        for task, metrics in out["results"].items()
    }
