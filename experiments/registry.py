"""Which task runs a config: the config's ``task`` key ("text" when absent, "mllm").

The one place that knows every task, so that the engine never imports a task and the tasks
never import each other. It imports both tasks (and with them jax); the `dfm` console script
imports it only for a command that loads a config, so `dfm --help` stays fast.
"""
from __future__ import annotations

from collections.abc import Sequence

from experiments.engine.config import ConfigError, apply_overrides, parse_config, read_toml, resolve_path
from experiments.engine.task import Task
from experiments.mllm.task import MultimodalTask
from experiments.text.task import TextTask

TASKS = ("text", "mllm")
DEFAULT_TASK = "text"


def task_named(name: str) -> Task:
    """The `Task` of a config's ``task`` value.

    Raises:
      ConfigError: an unknown task (naming the known ones).
    """
    if name == "text":
        return TextTask()
    if name == "mllm":
        return MultimodalTask()
    raise ConfigError(f"task: must be one of {list(TASKS)}, got {name!r}")


def load_job(name_or_path: str, schedule: str | None = None,
             overrides: Sequence[str] = ()) -> tuple[Task, object]:
    """The task and validated config of a config NAME (in experiments/configs/) or PATH, with the
    command line's ``KEY=VALUE`` overrides applied to the file before validation
    (`experiments.engine.config.apply_overrides`) and its ``--schedule`` applied last
    (`JobConfig.with_schedule`).

    Raises:
      ConfigError: unknown file, TOML syntax error, malformed override, unknown task, key or bad
        value (naming the file, the overrides and the key).
      UsageError: a `schedule` the task does not accept.
    """
    path = resolve_path(name_or_path)
    overrides = tuple(overrides)
    raw = apply_overrides(read_toml(path), overrides)
    try:
        task = task_named(raw.get("task", DEFAULT_TASK))
    except ConfigError as exc:
        where = f"{path} with overrides {' '.join(overrides)}" if overrides else f"{path}"
        raise ConfigError(f"{where}: {exc}") from None
    return task, parse_config(task.config_class, raw, path, overrides).with_schedule(schedule)
