"""Training stages, for any `Task`: stage 1, dense, the experts, the random control and the extras.

Compute matching: every stage-2 step processes `stage2.batch_size` examples, so dense and the K
experts together see exactly the same number of training examples, ``stage2.steps * batch_size``
(`stage_steps`: the experts split `stage2.steps` in proportion to their clusters' examples).

A training stage reads only the config, the run directory's data, the partition files and the
stage-1 model; it is finished when its marker ``stages/<stage>.json`` exists (written after the
final model, `finish_training`). An interrupted stage resumes from its last orbax checkpoint
(`dfm.train.train`). Every expert reads only stage 1, its own cluster's data and the partition:
experts never communicate.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dfm.sharding import MeshConfig, make_mesh
from dfm.train import TrainConfig, TrainingDiverged, load_model, save_model
from dfm.train.loop import read_metrics, train
from experiments.engine.batches import EpochBatches, allocate_steps
from experiments.engine.config import JobConfig
from experiments.engine.graph import (
    Assignments,
    RunOptions,
    StageError,
    finished,
    load_assignments,
    stage_section,
    training_stages,
)
from experiments.engine.locks import stage_lock
from experiments.engine.rundir import RunDir
from experiments.engine.task import Task
from experiments.engine.validation import make_validate, validation_units


def stage_steps(task: Task, config: JobConfig, stage: str, assignments: Assignments | None = None) -> int:
    """Optimizer steps of a training stage (experts: compute-matched share of stage2.steps, from
    the partition's `assignments`, which expert and random-control stages need)."""
    if stage == task.stage1:
        return getattr(config, task.stage1).steps
    if stage == "dense":
        return config.stage2.steps
    if assignments is None:
        raise ValueError(f"stage_steps: stage {stage!r} needs the partition's assignments")
    kind, k = stage.split("-")
    counts = np.bincount(assignments.examples(random=kind == "random"), minlength=config.partition.num_clusters)
    return allocate_steps(config.stage2.steps, counts)[int(k)]


def train_config(task: Task, config: JobConfig, stage: str, steps: int) -> TrainConfig:
    """`dfm.train.TrainConfig` of a stage: its section's optimizer; experts keep the dense
    schedule's shape, compressed to their steps (warmup scaled by ``steps_k / stage2.steps``, but
    never to 0 when the section has a warmup: an expert continues from stage 1 with a fresh AdamW
    state, and starting it at the peak learning rate is what the warmup exists to avoid). Stage 2
    with `continue_schedule` peaks where stage 1's schedule ended. Validation: `validations`
    evenly spaced points (``validate_every = ceil(steps / validations)``) and the section's `keep`.
    The frozen parameters are the section's (`StageConfig.frozen`)."""
    opt = stage_section(config, task.stage1, stage)
    warmup, lr = opt.warmup_steps, opt.learning_rate
    if stage != task.stage1 and opt.continue_schedule:
        lr = getattr(config, task.stage1).learning_rate * TrainConfig(steps=1).min_lr_ratio
    if stage not in (task.stage1, "dense"):
        warmup = round(opt.warmup_steps * steps / config.stage2.steps)
        if opt.warmup_steps > 0:
            warmup = max(1, warmup)
    validate_every = -(-steps // opt.validations) if opt.validations else 0
    return TrainConfig(steps=steps, learning_rate=lr, warmup_steps=min(steps, warmup),
                       weight_decay=opt.weight_decay, seed=config.seed, checkpoint_every=opt.checkpoint_every,
                       log_every=max(1, steps // 100), frozen=opt.frozen,
                       microbatches=config.numerics.microbatches,
                       async_checkpoint=config.numerics.async_checkpoint,
                       validate_every=validate_every, keep_best=validate_every > 0 and opt.keep == "best")


def training_mesh(mesh_section):
    """The `[mesh]` section as a `jax.sharding.Mesh`, or None for the default unsharded layout."""
    if not mesh_section.sharded:
        return None
    m = mesh_section
    return make_mesh(MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor))


def load_stage_model(run: RunDir, stage: str, factory: Callable[[], Any]):
    """The final model of a finished stage of `run` (`factory` builds the empty model, e.g.
    ``lambda: task.new_model(config, data)``).

    Raises:
      StageError: the stage has not finished, or its model does not load.
    """
    if not run.is_done(stage):
        raise StageError(f"stage {stage!r} has not finished in {run.root}; run `dfm train` for it first")
    try:
        return load_model(factory, run.model(stage))
    except Exception as exc:  # noqa: BLE001 - orbax raises many types; name the model instead
        raise StageError(f"stage {stage!r}: its model {run.model(stage)} does not load "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); re-run `dfm run` to "
                         f"re-train it (the stage is re-run when its model fails its checksum)") from None


def metrics_kwargs(run: RunDir, stage: str) -> dict:
    """The `dfm.train.train` keyword arguments that log a stage's rows as they are logged:
    ``metrics_path=logs/<stage>/metrics.jsonl`` and ``tensorboard_dir=logs/<stage>/tensorboard``
    (used when tensorboardX or torch + tensorboard is installed). Every training stage passes them,
    the tasks' extra stages too (`Task.run_extra`)."""
    return {"metrics_path": run.metrics(stage), "tensorboard_dir": run.tensorboard(stage)}


def finish_training(run: RunDir, stage: str, model, result, tc, batch_size: int, num_examples: int, *,
                    log: Callable[..., None] = print, extra: dict | None = None,
                    t0: float | None = None) -> dict | None:
    """Save the final model and write the stage's marker; None (and a log line) if stopped early.

    The marker holds steps, batch size, training examples, examples seen, wall time, the final
    loss, the loss history (and any other logged metric, e.g. accuracy), the validation rows
    (`result.validation`, or else the rows of ``logs/<stage>/metrics.jsonl`` with a "val_loss";
    the loss-curve plot draws them), the model kept ("best" with its `best_step` and
    `best_val_loss`, or "last") and `extra`.
    """
    if result.steps_done < tc.steps:
        log(f"[{stage}] stopped at step {result.steps_done}/{tc.steps}; re-run to resume")
        return None
    save_model(model, run.model(stage))
    h = result.history
    info = {
        "steps": tc.steps, "batch_size": batch_size, "train_examples": int(num_examples),
        "examples_seen": int(tc.steps * batch_size), "frozen": list(tc.frozen),
        "wall_time_s": float(h[-1]["wall"]) if h else result.wall_time_s,
        "final_loss": float(h[-1]["loss"]) if h else None,
        "history": [{k: r[k] for k in ("step", "loss", "accuracy") if k in r} for r in h],
        "validation": [{"step": r["step"], "val_loss": r["val_loss"]}
                       for r in (getattr(result, "validation", None) or read_metrics(run.metrics(stage)))
                       if "val_loss" in r and "step" in r],
        "kept": "best" if tc.keep_best and getattr(result, "best_step", None) is not None else "last",
        "best_step": getattr(result, "best_step", None),
        "best_val_loss": getattr(result, "best_val_loss", None),
        **(extra or {}),
    }
    run.mark_done(stage, info, model=True)
    took = f" (this call {time.perf_counter() - t0:.1f} s)" if t0 is not None else ""
    kept = ""
    if info["best_step"] is not None:
        kept = (f", validation {info['best_val_loss']:.4f} at step {info['best_step']}"
                f"{' (kept)' if info['kept'] == 'best' else ''}")
    log(f"[{stage}] {tc.steps} steps on {num_examples} examples, loss {info['final_loss']:.4f}{kept}, "
        f"{info['wall_time_s']:.1f} s{took}")
    return info


def run_train(task: Task, config: JobConfig, run: RunDir, data, stage: str, options: RunOptions = RunOptions(), *,
              stop_after: int | None = None) -> dict | None:
    """Train one stage (skipped if finished; resumed if interrupted).

    Args:
      stage: stage 1, "dense", "expert-k", "random-k" or one of the config's extra stages.
      options: progress bars, the log, and the skipped experts (not stages of this run).
      stop_after: stop after this many steps in total (testing resume); the stage then stays
        unfinished and a later call resumes it.

    Returns:
      the stage's marker info, or None if stopped early by `stop_after`.

    Raises:
      StageError: an unknown stage, or a prerequisite stage is missing.
    """
    names = training_stages(config, task.stage1, options.skip_experts)
    if stage not in names:
        raise StageError(f"unknown stage {stage!r}; stages of this config: {', '.join(names)}")
    if finished(run, stage, options.log):
        options.log(f"[{stage}] already finished, skipped")
        return run.stage_info(stage)
    with stage_lock(run, stage, options.log):
        if run.is_done(stage):               # finished by another process meanwhile
            return run.stage_info(stage)
        try:
            if stage in config.extra_stages:
                return task.run_extra(config, run, data, stage, progress=options.progress, log=options.log,
                                      stop_after=stop_after)
            return _train_stage(task, config, run, data, stage, options, stop_after)
        except TrainingDiverged as exc:
            raise StageError(str(exc)) from None


def _train_stage(task: Task, config: JobConfig, run: RunDir, data, stage: str, options: RunOptions,
                 stop_after: int | None) -> dict | None:
    t0 = time.perf_counter()
    log = options.log
    if stage == task.stage1:
        steps = stage_steps(task, config, stage)
        index = np.arange(data.num_train_examples)
        model = task.new_model(config, data)
    else:
        assignments = load_assignments(run, config.partition.num_clusters)
        if not run.is_done(task.stage1):
            raise StageError(f"stage {stage!r} continues from {task.stage1}: run `dfm train --base` first")
        steps = stage_steps(task, config, stage, assignments)
        if stage == "dense":
            index = np.arange(len(assignments.example_unit))
        else:
            kind, k = stage.split("-")
            index = np.flatnonzero(assignments.examples(random=kind == "random") == int(k))
        model = load_stage_model(run, task.stage1, lambda: task.new_model(config, data))
    tc = train_config(task, config, stage, steps)
    section = stage_section(config, task.stage1, stage)
    if section.warmup_steps > section.steps:
        log(f"[{stage}] warning: warmup_steps = {section.warmup_steps} > steps = {section.steps}: the learning "
            f"rate never reaches its peak ({section.learning_rate:g}); the warmup is cut to the {steps} steps")
    batch_size = section.batch_size
    batches = EpochBatches(len(index), batch_size, config.seed, stage, steps=steps)
    loss_fn, validate = task.loss_fn(config, data), None
    if tc.validate_every:
        units = None if stage == task.stage1 else validation_units(stage, assignments)
        val_batches = task.validation_batches(config, data, units)
        if val_batches:
            validate = make_validate(loss_fn, val_batches)
        else:
            log(f"[{stage}] no validation examples for this model: it keeps its last parameters")
    inputs = task.stage_batches(config, data, index, batches, log=log)
    result = train(model, loss_fn, inputs.batch, tc, checkpoint_dir=run.checkpoints(stage), desc=stage,
                   stop_after=stop_after, progress=options.progress, mesh=training_mesh(config.mesh),
                   validate=validate, **metrics_kwargs(run, stage))
    return finish_training(run, stage, model, result, tc, batch_size, len(index), log=log, extra=inputs.marker,
                           t0=t0)
