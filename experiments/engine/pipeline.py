"""The whole job in order, for any `Task`: open the run directory, load the data, run every stage.

    open_run             the run directory (default ``runs/<config name>``), config pinned
    load_data            the task's data stage, then the checks that need no training
    run_until_partition  stage 1 when the partition needs it, then the partition
    run_all              every stage in order, in this process; finished stages are skipped

The stages themselves: `experiments.engine.graph` (names, assignments, markers),
`.clustering` (partition), `.training` (stage 1, dense, experts, extras), `.evaluation`
(evaluate, export). Each is a function of the task, the config, the run directory, the loaded data
and the `RunOptions` it uses.
"""
from __future__ import annotations

import time
from pathlib import Path

from experiments.engine.clustering import run_partition
from experiments.engine.config import JobConfig
from experiments.engine.evaluation import run_evaluate, run_export
from experiments.engine.graph import RunOptions, StageError, training_stages
from experiments.engine.locks import stage_lock
from experiments.engine.memory import physical_memory_bytes
from experiments.engine.rundir import RunDir, prepare_run_dir
from experiments.engine.task import Task
from experiments.engine.training import run_train


def open_run(config: JobConfig, out: str | Path | None = None) -> RunDir:
    """Prepare the run directory `out` (default ``runs/<config name>``; `prepare_run_dir`).

    Raises:
      RunDirError: the directory is not writable or holds a run of another config.
    """
    return prepare_run_dir(Path(out) if out is not None else Path("runs") / config.name, config)


def load_data(task: Task, config: JobConfig, run: RunDir, options: RunOptions = RunOptions()):
    """The task's data (its data stage under the "data" lock when not yet done), then the checks
    that need no training: K against the train units, and (while a training stage is left) the
    memory a training stage needs against this machine's RAM (a warning).

    Raises:
      StageError: more clusters than train units.
    """
    if run.data_summary.is_file():
        data = task.prepare_data(config, run, log=options.log)
    else:
        with stage_lock(run, "data", options.log):
            data = task.prepare_data(config, run, log=options.log)
    k, units = config.partition.num_clusters, data.num_train_units
    if k > units:
        raise StageError(f"partition.num_clusters: K={k} experts but only {units} train units to partition; "
                         f"lower partition.num_clusters")
    if all(run.is_done(stage) for stage in training_stages(config, task.stage1, options.skip_experts)):
        return data                               # nothing left to train: no estimate needed
    need, ram = task.training_memory_bytes(config, data), physical_memory_bytes()
    if need is not None and ram is not None and need > ram:
        options.log(f"[data] warning: a training stage needs about {need / 2**30:.1f} GiB (parameters, AdamW "
                    f"state and float32 activations of one batch) but this machine has {ram / 2**30:.1f} GiB of "
                    f"RAM; lower the sequence length or the batch size")
    return data


def run_until_partition(task: Task, config: JobConfig, run: RunDir, data, options: RunOptions = RunOptions()) -> dict:
    """Stage 1 when the partition needs it (``config.partition.needs_stage1``), then the partition."""
    if config.partition.needs_stage1:
        run_train(task, config, run, data, task.stage1, options)
    return run_partition(task, config, run, data, log=options.log)


def run_all(task: Task, config: JobConfig, run: RunDir, options: RunOptions = RunOptions()) -> dict:
    """Every stage in order, in this process; finished stages are skipped. Returns the report."""
    t0 = time.perf_counter()
    data = load_data(task, config, run, options)
    run_until_partition(task, config, run, data, options)
    for stage in training_stages(config, task.stage1, options.skip_experts):
        run_train(task, config, run, data, stage, options)
    rep = run_evaluate(task, config, run, data, options)
    run_export(task, config, run, data, options)
    options.log(f"[run] done in {time.perf_counter() - t0:.1f} s; report: {run.report_md}")
    return rep
