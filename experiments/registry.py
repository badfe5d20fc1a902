"""Which task runs a config: the config's ``task`` key ("text" when absent, "mllm").

The one place that knows every task, so that the engine never imports a task and the tasks
never import each other. Tasks are imported when asked for (keeps `dfm --help` fast).
"""
from __future__ import annotations

from experiments.engine.config import ConfigError, parse_config, read_toml, resolve_path
from experiments.engine.task import Task

TASKS = ("text", "mllm")
DEFAULT_TASK = "text"


def task_named(name: str) -> Task:
    """The `Task` of a config's ``task`` value.

    Raises:
      ConfigError: an unknown task (naming the known ones).
    """
    if name == "text":
        from experiments.text.task import TextTask

        return TextTask()
    if name == "mllm":
        from experiments.mllm.task import MultimodalTask

        return MultimodalTask()
    raise ConfigError(f"task: must be one of {list(TASKS)}, got {name!r}")


def load_job(name_or_path: str, schedule: str | None = None) -> tuple[Task, object]:
    """The task and validated config of a config NAME (in experiments/configs/) or PATH, with the
    command line's ``--schedule`` applied (`Task.with_schedule`).

    Raises:
      ConfigError: unknown file, TOML syntax error, unknown task, key or bad value (naming the file).
      UsageError: a `schedule` the task does not accept.
    """
    path = resolve_path(name_or_path)
    raw = read_toml(path)
    try:
        task = task_named(raw.get("task", DEFAULT_TASK))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return task, task.with_schedule(parse_config(task.config_class, raw, path), schedule)
