"""The one training loop used by every stage (base, dense, expert, router).

`train(model, loss_fn, batch_fn, config)` runs AdamW (`make_optimizer`) on
`loss_fn(model, batch_fn(step), fold_in(PRNGKey(seed), step))`, with resumable orbax
checkpoints. Because the batch and the key are functions of the step, a run that is stopped and
resumed produces exactly the parameters and history of an uninterrupted run. With `metrics_path`,
every logged row is also appended to a JSON-lines file as it is logged (and, with `tensorboard_dir`
and tensorboardX or torch + tensorboard installed, written as TensorBoard scalars), so a long
run can be watched while it trains.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dfm.io import atomic_write_bytes
from dfm.progress import progress_bar
from dfm.sharding.distributed import is_main_process
from dfm.train.checkpoint import (
    MODEL_STATE,
    abstract_tree,
    model_state_dict,
    open_manager,
    restore_into,
)
from dfm.train.optim import TrainConfig, learning_rate_schedule, make_optimizer
from dfm.train.preemption import Preempted, PreemptionFlag, preemption_signals
from dfm.train.selection import BEST_SUBDIR, BestCheckpoint
from dfm.train.steps import LossFn, make_train_step


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or inf; the message names the stage, the step, the last good checkpoint
    and what to try (a lower learning rate)."""


class CheckpointFallbackWarning(RuntimeWarning):
    """The latest checkpoint did not restore; an earlier one (or a fresh start) was used instead."""


@dataclass
class TrainResult:
    """Outcome of `train`.

    Attributes:
      model: the trained model (the same object that was passed in, updated in place).
      history: one row per logged step: `{"step", "loss", "lr", "grad_norm", <loss_fn metrics>,
        "wall"}`; `step` counts completed updates (1-based), `lr` is the rate used by that
        update, `wall` the cumulative training seconds (across resumes). Restored rows included.
      steps_done: completed optimizer steps (restored ones included).
      wall_time_s: seconds spent in this call.
      validation: one row `{"step", "val_loss"}` per validation (step 0 = before training;
        restored rows included); [] without validation.
      best_step, best_val_loss: the step with the lowest validation loss so far and that loss
        (None without validation). With `config.keep_best` and a finished run, `model` holds
        the parameters of `best_step`.
    """

    model: nnx.Module
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    wall_time_s: float = 0.0
    validation: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_val_loss: float | None = None


def _optimizer_for(config: TrainConfig) -> optax.GradientTransformation:
    # One transformation object per optimizer setting: the optimizer's `tx` is static in the
    # jitted step, so reusing the object lets repeated `train` calls (resume, stages, seeds)
    # reuse the compilation. The learning rate is an argument of each step (`lr_argument`), so
    # only the fields that shape the update rule itself key the cache: stages that differ in
    # steps, learning rate, warmup or schedule share one compiled step.
    return _cached_optimizer(config.b1, config.b2, config.weight_decay, config.grad_clip, config.frozen)


@functools.lru_cache(maxsize=32)
def _cached_optimizer(b1: float, b2: float, weight_decay: float, grad_clip: float,
                      frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
    return make_optimizer(TrainConfig(steps=1, b1=b1, b2=b2, weight_decay=weight_decay, grad_clip=grad_clip,
                                      frozen=frozen),
                          lr_argument=True)


def _learning_rates(config: TrainConfig) -> np.ndarray:
    """`learning_rate_schedule(config)(s)` for every step `s`, `[steps]` float32 (host)."""
    schedule = learning_rate_schedule(config)
    return np.asarray(jax.jit(jax.vmap(schedule))(np.arange(config.steps, dtype=np.int32)), np.float32)


def _train_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {"model": model_state_dict(model), "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def train(model: nnx.Module, loss_fn: LossFn, batch_fn: Callable[[int], Any], config: TrainConfig, *,
          checkpoint_dir=None, desc: str = "train", stop_after: int | None = None,
          progress: bool = True, mesh: jax.sharding.Mesh | None = None, rules=None,
          metrics_path=None, tensorboard_dir=None,
          validate: Callable[[nnx.Module], float] | None = None) -> TrainResult:
    """Train `model` in place for `config.steps` AdamW steps, resuming from `checkpoint_dir`.

    Args:
      model: an NNX module; its `nnx.Param`s are optimized.
      loss_fn: `loss_fn(model, batch, key) -> (loss scalar, metrics dict of scalars)`. It is
        traced under `nnx.jit` once per distinct `loss_fn` object; metrics (e.g. "tokens")
        are copied into the history rows.
      batch_fn: `batch_fn(step) -> batch pytree` for the 0-based step; must be deterministic in
        `step` for resume to be exact.
      config: `TrainConfig`.
      checkpoint_dir: if given, orbax checkpoints (params, optimizer state, step, history) are
        saved every `config.checkpoint_every` steps and when the call ends; an existing
        checkpoint is restored first and training continues from its step. A directory holding a
        finished run (step == steps) returns at once without training.
      desc: progress bar label.
      stop_after: stop once this many steps are done in total (restored steps count), after
        saving a checkpoint; None = run to `config.steps`.
      progress: report progress with the loss (on process 0 only): a tqdm bar on a terminal, a
        line every 10% of the steps otherwise (`dfm.progress.progress_bar`).
      mesh: None = train on one device (default). A mesh from `dfm.sharding.make_mesh`: the
        model and optimizer state are moved onto it as their logical axis names say (the model
        stays sharded after the call), each step is jitted with `NamedSharding` inputs/outputs
        (`dfm.train.steps.make_train_step`), and `batch_fn(step)` returns this process's rows of
        the global batch (all rows on one process). A checkpoint saved on another mesh (or
        unsharded) is restored onto this one.
      rules: logical-axis rules table for `mesh` (default `dfm.sharding.DEFAULT_RULES`).
      metrics_path: if given (process 0 only), every logged history row is appended to this
        JSON-lines file as it is logged (one object per line, flushed): the row's keys (`step`,
        `loss`, `lr`, `grad_norm`, the loss_fn metrics, `wall`) plus `tokens_per_s` when the
        loss_fn reports a "tokens" metric (that step's tokens times the steps since the previous
        row, over the seconds since it). On a (re)start the file keeps only its rows of steps up to
        the restored step (rewritten atomically), so a resumed run continues it without
        duplicates; rows without a `step` are kept.
      tensorboard_dir: if given and tensorboardX (or torch with tensorboard) is installed, the
        same rows as TensorBoard scalars (events after the restored step are purged on resume);
        silently skipped otherwise.
      validate: `validate(model) -> float`, the validation loss of the current parameters (a
        deterministic function of them: fixed examples, fixed key; e.g. nats per target token).
        Called before the first step, every `config.validate_every` steps and after the last
        step (never when `validate_every` is 0); each value is a row `{"step", "val_loss"}` of
        `TrainResult.validation`, of the metrics file and of TensorBoard (`val/loss`). The
        lowest so far is kept (`dfm.train.selection.BestCheckpoint`, in
        ``<checkpoint_dir>/best`` when checkpointing, so a resumed run continues the same
        selection); with `config.keep_best` the model ends with those parameters.

    Preemption: with `checkpoint_dir`, in the main thread of a single process, SIGTERM and SIGUSR1
    (when their handler is the default one) are recorded during the loop instead of ending the process
    (`dfm.train.preemption`); after the step in progress a checkpoint of that step is saved and
    written (also with `config.async_checkpoint`) and `Preempted` is raised. A later call with
    the same arguments resumes from it exactly. The previous handlers are restored on return.

    Returns:
      `TrainResult(model, history, steps_done, wall_time_s)`.

    Raises:
      ValueError: `checkpoint_dir` not writable or holding a run longer than `config.steps`;
        `stop_after` < 1; `config` not a TrainConfig.
      TrainingDiverged (a FloatingPointError): the loss became NaN or inf (checked at every logged
        and every checkpointed step, so no diverged state is ever saved); the message names the
        step, the last good checkpoint and suggests a lower learning rate.
      dfm.train.preemption.Preempted: SIGTERM / SIGUSR1 arrived during the loop (see Preemption
        above); it carries `desc`, the checkpointed `step`, the `checkpoint` directory and the
        `signal`'s name.

    Warns:
      CheckpointFallbackWarning: the latest checkpoint does not restore (truncated, corrupt);
        it is deleted and the previous one is tried, down to a fresh start.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after: must be a positive int or None, got {stop_after!r}")
    t_start = time.perf_counter()
    optimizer = nnx.Optimizer(model, _optimizer_for(config), wrt=nnx.Param)
    step_fn = make_train_step(loss_fn, model, optimizer, mesh=mesh, rules=rules,   # places state on mesh
                              microbatches=config.microbatches)
    learning_rates = _learning_rates(config)
    manager = None if checkpoint_dir is None else open_manager(checkpoint_dir, async_save=config.async_checkpoint)
    start, history, wall_before, validation = 0, [], 0.0, []
    if manager is not None and manager.latest_step() is not None:
        start, history, wall_before, validation = _restore_latest_good(manager, model, optimizer, desc)
        if start > config.steps:
            raise ValueError(
                f"checkpoint_dir: {str(checkpoint_dir)!r} holds a run at step {start} > config.steps={config.steps}")
    end = config.steps if stop_after is None else min(stop_after, config.steps)
    validating = validate is not None and config.validate_every > 0
    best = None
    if validating:
        best = BestCheckpoint(None if checkpoint_dir is None else Path(checkpoint_dir) / BEST_SUBDIR,
                              fresh=start == 0)
    if start >= end:
        if manager is not None:
            manager.close()
        return _finish(TrainResult(model, history, start, time.perf_counter() - t_start, validation),
                       best, config)

    base_key = jax.random.PRNGKey(config.seed)
    log = _MetricsLog(metrics_path, tensorboard_dir, start) if is_main_process() else None

    def check(done: int) -> None:
        value = float(validate(model))
        row = {"step": done, "val_loss": value}
        validation.append(row)
        if log is not None:
            log.write(row)
        best.offer(done, value, model)

    bar = progress_bar(config.steps, initial=start, desc=desc, disable=not (progress and is_main_process()))
    t_loop = time.perf_counter()
    handlers = contextlib.ExitStack()
    try:
        # several processes could see a signal at different steps and disagree on the checkpoint
        # step (a hung collective save): there the signals keep their default action
        preemptible = manager is not None and jax.process_count() == 1
        preempt = handlers.enter_context(preemption_signals()) if preemptible else PreemptionFlag()
        if validating and start == 0:
            check(0)
        for step in range(start, end):
            loss, metrics, grad_norm = step_fn(batch_fn(step), jax.random.fold_in(base_key, step),
                                               learning_rate=learning_rates[step])
            done = step + 1
            logging_step = done % config.log_every == 0 or done == config.steps
            stopping = preempt.requested           # checked once per step: save and stop on it
            saving_step = manager is not None and (done % config.checkpoint_every == 0 or done == end or stopping)
            if logging_step or saving_step:          # never log or save a diverged state
                value = float(loss)
                if not math.isfinite(value):
                    raise TrainingDiverged(_diverged_message(desc, value, done, manager, config))
            if logging_step:
                row = {"step": done, "loss": value, "lr": float(learning_rates[step]), "grad_norm": float(grad_norm)}
                row.update({k: float(v) for k, v in metrics.items()})
                row["wall"] = wall_before + time.perf_counter() - t_loop
                history.append(row)
                if log is not None:
                    log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if validating and (done % config.validate_every == 0 or done == config.steps):
                check(done)
            bar.update(1)
            if saving_step:
                _save(manager, done, model, optimizer, history, wall_before + time.perf_counter() - t_loop,
                      validation, wait=not config.async_checkpoint or stopping)
            if stopping:
                raise Preempted(desc, done, manager.directory, preempt.signal)
    except BaseException:
        if best is not None:
            best.close()
        raise
    finally:
        handlers.close()
        bar.close()
        if log is not None:
            log.close()
        if manager is not None:
            manager.close()
    return _finish(TrainResult(model, history, end, time.perf_counter() - t_start, validation), best, config)


def _finish(result: TrainResult, best: BestCheckpoint | None, config: TrainConfig) -> TrainResult:
    """Fill in the selection and, for a finished run with `keep_best`, load the best parameters."""
    if best is None:
        return result
    try:
        result.best_step, result.best_val_loss = best.step, best.val_loss
        if config.keep_best and result.steps_done == config.steps:
            best.restore(result.model)
    finally:
        best.close()
    return result


def read_metrics(path) -> list[dict]:
    """The rows of a metrics JSON-lines file (`train`'s `metrics_path`); a line that does not
    parse (cut short by a crash) is skipped. A missing file: []."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_metrics(path, row: dict) -> None:
    """Append one row (e.g. ``{"step": 200, "val_loss": 2.1}``) to a metrics JSON-lines file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


class _MetricsLog:
    """The JSON-lines file (and optional TensorBoard writer) of one `train` call."""

    def __init__(self, path, tensorboard_dir, start: int):
        self.file, self.writer = None, None
        self.last_step, self.last_time = start, time.perf_counter()
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(path):        # drop rows of steps the restored checkpoint does not hold
                keep = [r for r in read_metrics(path) if not isinstance(r.get("step"), (int, float)) or r["step"] <= start]
                atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode("utf-8"))
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole call
        if tensorboard_dir is not None:
            writer_cls = _summary_writer()
            if writer_cls is not None:
                self.writer = writer_cls(str(tensorboard_dir), purge_step=start + 1 if start else None)

    def write(self, row: dict) -> None:
        now = time.perf_counter()
        out = dict(row)
        if "tokens" in row and now > self.last_time:
            out["tokens_per_s"] = row["tokens"] * (row["step"] - self.last_step) / (now - self.last_time)
        if "loss" in row:                  # a validation row does not restart the throughput window
            self.last_step, self.last_time = row["step"], now
        if self.file is not None:
            self.file.write(json.dumps(out) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in out.items():
                if key != "step":
                    tag = "val/loss" if key == "val_loss" else f"train/{key}"
                    self.writer.add_scalar(tag, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _summary_writer():
    """tensorboardX's `SummaryWriter`, else torch's (which needs the tensorboard package), else None;
    checked without importing torch when tensorboard is absent."""
    try:
        if importlib.util.find_spec("tensorboardX") is not None:
            from tensorboardX import SummaryWriter

            return SummaryWriter
        if importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
    except Exception:  # noqa: BLE001 - an optional extra that does not import: no TensorBoard
        return None
    return None


def _save(manager: ocp.CheckpointManager, step: int, model, optimizer, history, wall: float,
          validation: list[dict], *, wait: bool = True) -> None:
    """Save a checkpoint; `wait=False` (async) returns once the arrays are copied to host and
    orbax writes them in the background (the next save, or closing the manager, waits for it)."""
    meta = {"step": step, "history": list(history), "wall": wall, "validation": list(validation)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_train_state(model, optimizer)), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
        manager.wait_until_finished()


def _diverged_message(desc: str, value: float, step: int, manager, config: TrainConfig) -> str:
    where = "no checkpoint yet"
    if manager is not None and manager.latest_step() is not None:
        where = f"the last good checkpoint is step {manager.latest_step()} in {manager.directory}"
    return (f"{desc}: the loss is {value} at step {step} ({where}); the learning rate "
            f"{config.learning_rate:g} is probably too high: lower it (or the warmup's peak) and re-run")


def _restore_latest_good(manager: ocp.CheckpointManager, model, optimizer,
                         desc: str) -> tuple[int, list[dict], float, list[dict]]:
    """`_restore` of the newest checkpoint that restores; a broken one is deleted (with a warning)
    and the next older one tried; none restores: a fresh start (with a warning)."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore(manager, step, model, optimizer)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back, say why
            warnings.warn(f"{desc}: checkpoint step {step} in {manager.directory} does not restore "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); deleting it and trying "
                          f"an earlier one", CheckpointFallbackWarning, stacklevel=3)
            manager.delete(step)
    if manager.all_steps():  # pragma: no cover - delete failed
        raise ValueError(f"checkpoint_dir: {manager.directory}: broken checkpoints could not be removed")
    warnings.warn(f"{desc}: no checkpoint in {manager.directory} restores; starting the stage over",
                  CheckpointFallbackWarning, stacklevel=3)
    return 0, [], 0.0, []


def _restore(manager: ocp.CheckpointManager, step: int, model,
             optimizer) -> tuple[int, list[dict], float, list[dict]]:
    target = abstract_tree(_train_state(model, optimizer))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    restore_into(model, restored["state"]["model"], MODEL_STATE)
    restore_into(optimizer, restored["state"]["optimizer"])
    meta = restored["meta"]
    if int(meta["step"]) != step:
        raise ValueError(f"checkpoint_dir: step {step} has inconsistent metadata step {meta['step']}")
    return step, list(meta["history"]), float(meta["wall"]), list(meta.get("validation", []))
