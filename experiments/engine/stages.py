"""The engine: the stages of a job, each idempotent on a run directory, for any `Task`.

    data       the task's data stage (`Task.prepare_data`)
    <stage 1>  one model on all training examples ("base" in the text job, "stage1" in the
               multimodal job; `Task.stage1`)
    partition  spherical balanced k-means (`dfm.decentral.balanced_kmeans`) on the train units'
               features (`Task.partition_input`), balanced in training examples (units weighted
               by their examples, `[partition] balance = "examples"`) or in units; a random
               partition under the same balance (the control, `random_partition`); val / test
               units assigned to the nearest centroid
    dense      stage 2: continues from stage 1 on all training examples for `stage2.steps` steps
    expert-k   stage 2: continues from stage 1 on cluster k only, `steps_k` steps with
               sum_k steps_k = stage2.steps (proportional to the clusters' training examples)
    random-k   the same for the random partition (control)
    extras     the task's extra stages (`Task.extra_stages`, e.g. the learned router)
    evaluate   `Task.evaluate`, then `Task.write_report` and `Task.print_summary`
    export     `Task.export` (tasks with `has_export`)

Compute matching: every stage-2 step processes `stage2.batch_size` examples, so dense and the K
experts together see exactly the same number of training examples, ``stage2.steps * batch_size``.

A training stage reads only the config, the run directory's data, the partition files and the
stage-1 model; it is finished when its marker ``stages/<stage>.json`` exists (written after the
final model). An interrupted stage resumes from its last orbax checkpoint (`dfm.train.train`).
Every expert reads only stage 1, its own cluster's data and the partition: experts never
communicate.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.engine.config import JobConfig
from experiments.engine.locks import stage_lock
from experiments.engine.rundir import (
    RunDir,
    RunDirError,
    atomic_write_json,
    prepare_run_dir,
    read_json,
)
from experiments.engine.task import Task


class StageError(RuntimeError):
    """A stage cannot run (missing prerequisite, bad stage argument); the message says why."""


@dataclass(frozen=True)
class Context:
    """What every stage needs: the task, its config, the run directory and how to report progress.

    Attributes:
      skip_experts: cluster experts left out (lost, e.g. a failed job): not trained, not required by
        the evaluation, whose ensembles renormalise their routers over the remaining experts.
    """

    task: Task
    config: JobConfig
    run: RunDir
    progress: bool = True
    log: Callable[..., None] = print
    skip_experts: tuple[int, ...] = ()

    @property
    def available(self) -> np.ndarray:
        """``[K]`` bool: the cluster experts that are not skipped."""
        mask = np.ones(self.config.partition.num_clusters, bool)
        mask[list(self.skip_experts)] = False
        return mask


def open_context(task: Task, config: JobConfig, out: str | Path | None = None, *, progress: bool = True,
                 log=print, skip_experts: tuple[int, ...] = ()) -> Context:
    """Prepare the run directory (default ``runs/<config name>``; `prepare_run_dir`) and a `Context`.

    Raises:
      RunDirError: the directory is not writable or holds a run of another config.
      StageError: a skipped expert index outside [0, K), or every expert skipped.
    """
    k = config.partition.num_clusters
    bad = [i for i in skip_experts if not 0 <= i < k]
    if bad or len(set(skip_experts)) >= k:
        raise StageError(f"--skip-expert {bad or list(skip_experts)}: expert indices must be in 0..{k - 1} and at "
                         f"least one expert must remain")
    root = Path(out) if out is not None else Path("runs") / config.name
    return Context(task, config, prepare_run_dir(root, config), progress, log, tuple(sorted(set(skip_experts))))


# ----------------------------------------------------------------------------------------------
# the stage graph
# ----------------------------------------------------------------------------------------------
def expert_names(config: JobConfig, random: bool = False) -> list[str]:
    """``expert-0 .. expert-{K-1}`` (or the random-partition ``random-k``; [] if the control is off)."""
    if random and not config.partition.random_control:
        return []
    return [f"{'random' if random else 'expert'}-{i}" for i in range(config.partition.num_clusters)]


def training_stages(ctx: Context) -> list[str]:
    """All training stages of the run (skipped experts left out), in the order `run_all` runs them."""
    c = ctx.config
    experts = [e for i, e in enumerate(expert_names(c)) if i not in ctx.skip_experts]
    return [ctx.task.stage1, "dense", *experts, *expert_names(c, random=True), *ctx.task.extra_stages(c)]


def expert_stage(ctx: Context, k: int, random: bool = False) -> str:
    """Stage name of expert `k` ("expert-k", or "random-k" for the random partition).

    Raises:
      StageError: k outside [0, K), or the random control disabled in the config.
    """
    num = ctx.config.partition.num_clusters
    if not 0 <= k < num:
        raise StageError(f"expert index {k} out of range: the config has K={num} experts (0..{num - 1})")
    if random and not ctx.config.partition.random_control:
        raise StageError("partition.random_control is false in this config: no random-partition experts")
    return f"{'random' if random else 'expert'}-{k}"


# ----------------------------------------------------------------------------------------------
# partition
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignments:
    """The partition's cluster labels, as written to ``partition/assignments.json``.

    Attributes:
      units: ``{"train" | "random" | "val" | "test": [n_units] int}`` the cluster of every unit
        (document, image) of each split; "random" is the random control's train labels.
      example_unit: ``[num_train_examples]`` each training example's train unit.
    """

    units: dict[str, np.ndarray]
    example_unit: np.ndarray

    def examples(self, random: bool = False) -> np.ndarray:
        """Cluster of every training example ``[num_train_examples]`` (its unit's cluster)."""
        return self.units["random" if random else "train"][self.example_unit]

    def priors(self, num_clusters: int, random: bool = False) -> np.ndarray:
        """``w_k``: the clusters' shares of the training examples, ``[K]`` float64."""
        labels = self.examples(random)
        return np.bincount(labels, minlength=num_clusters) / len(labels)


def load_assignments(ctx: Context) -> Assignments:
    """The partition of this run.

    Raises:
      StageError: the partition has not run yet.
    """
    if not ctx.run.is_done("partition"):
        raise StageError(f"{ctx.run.root}: no partition yet; run `dfm partition` first")
    path = ctx.run.partition / "assignments.json"
    raw = read_json(path)
    k = ctx.config.partition.num_clusters
    try:
        units = {name: np.asarray(raw[name], np.int64) for name in ("train", "random", "val", "test")}
        example_unit = np.asarray(raw["example_unit"], np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{path}: not a partition's assignments ({type(exc).__name__}: {exc}); "
                          f"delete the partition directory and its marker to rebuild it") from None
    for name, labels in units.items():
        if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= k)):
            raise RunDirError(f"{path}: {name!r} must be cluster labels in [0, {k}); delete the partition "
                              f"directory and its marker to rebuild it")
    if example_unit.ndim != 1 or (example_unit.size and not 0 <= example_unit.min() <= example_unit.max()
                                  < len(units["train"])):
        raise RunDirError(f"{path}: 'example_unit' must index the train units; delete the partition directory "
                          f"and its marker to rebuild it")
    return Assignments(units, example_unit)


def run_partition(ctx: Context, data) -> dict:
    """Balanced k-means on the train units, the random control, val / test assignment (idempotent).

    Raises:
      StageError: fewer train units than clusters, or a cluster left without training examples.
    """
    if ctx.run.is_done("partition"):
        return ctx.run.stage_info("partition")
    with stage_lock(ctx.run, "partition", ctx.log):
        if ctx.run.is_done("partition"):          # finished by another process meanwhile
            return ctx.run.stage_info("partition")
        return _partition(ctx, data)


def _partition(ctx: Context, data) -> dict:
    from dfm.decentral import assign, balanced_kmeans, two_stage_balanced_kmeans

    t0 = time.perf_counter()
    pc = ctx.config.partition
    k = pc.num_clusters
    after = ctx.task.partition_after_stage1(ctx.config)
    stage1 = load_stage_model(ctx, data, ctx.task.stage1) if after else None
    inp = ctx.task.partition_input(ctx, data, stage1)
    if len(inp.features["train"]) < k:
        raise StageError(f"partition.num_clusters: K={k} clusters but only {len(inp.features['train'])} train "
                         f"{inp.units}")
    by_examples = pc.balance == "examples"          # every partition section is a PartitionBalance
    weights = np.bincount(inp.example_unit, minlength=len(inp.features["train"])) if by_examples else None
    if pc.kmeans == "two_stage":                    # PartitionBalance requires balance = "units" with it
        partition, labels = two_stage_balanced_kmeans(inp.features["train"], k, rng=pc.seed)
    else:
        partition, labels = balanced_kmeans(inp.features["train"], k, rng=pc.seed, weights=weights)
    random_labels = random_partition(labels, weights, k, pc.seed)
    counts = np.bincount(labels[inp.example_unit], minlength=k)
    if counts.min() == 0:
        raise StageError(f"partition: cluster {int(np.argmin(counts))} has no training {inp.examples} "
                         f"({inp.examples} per cluster {counts.tolist()}); lower partition.num_clusters")
    ctx.run.partition.mkdir(parents=True, exist_ok=True)
    partition.save(ctx.run.partition / "partition.npz")
    assignments = {"train": labels.tolist(), "random": random_labels.tolist(),
                   "val": assign(partition, inp.features["val"]).tolist(),
                   "test": assign(partition, inp.features["test"]).tolist(),
                   "example_unit": np.asarray(inp.example_unit).tolist()}
    atomic_write_json(ctx.run.partition / "assignments.json", assignments)
    u, e = inp.units, inp.examples
    info = {
        "num_clusters": k,
        "balance": "examples" if by_examples else "units",
        f"{u}_per_cluster": np.bincount(labels, minlength=k).tolist(),
        f"{e}_per_cluster": counts.tolist(),
        f"random_{e}_per_cluster": np.bincount(random_labels[inp.example_unit], minlength=k).tolist(),
        f"test_{u}_per_cluster": np.bincount(assignments["test"], minlength=k).tolist(),
        "kmeans": partition.config,
        "wall_time_s": time.perf_counter() - t0,
    }
    ctx.run.mark_done("partition", info)
    ctx.log(f"[partition] K={k}: {u} {info[f'{u}_per_cluster']}, {e} {info[f'{e}_per_cluster']}")
    return info


def random_partition(labels: np.ndarray, weights: np.ndarray | None, num_clusters: int, seed: int) -> np.ndarray:
    """The random control's labels ``[n_units]``: without weights a seeded permutation of `labels`
    (exactly the same units per cluster); with weights (examples per unit) a random assignment
    under the same balance in examples as the k-means partition
    (`dfm.decentral.weighted_balanced_assignment` of uniform random costs), so the control's
    experts get the same budgets as the cluster experts up to that balance's bound."""
    rng = np.random.default_rng(seed)
    if weights is None:
        return rng.permutation(labels)
    from dfm.decentral import weighted_balanced_assignment

    return np.asarray(weighted_balanced_assignment(rng.random((len(labels), num_clusters)), weights), np.int64)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def stage_steps(ctx: Context, stage: str, assignments: Assignments | None = None) -> int:
    """Optimizer steps of a training stage (experts: compute-matched share of stage2.steps)."""
    from experiments.engine.batches import allocate_steps

    c = ctx.config
    if stage == ctx.task.stage1:
        return getattr(c, ctx.task.stage1).steps
    if stage == "dense":
        return c.stage2.steps
    kind, k = stage.split("-")
    assignments = assignments or load_assignments(ctx)
    counts = np.bincount(assignments.examples(random=kind == "random"), minlength=c.partition.num_clusters)
    return allocate_steps(c.stage2.steps, counts)[int(k)]


def train_config(ctx: Context, stage: str, steps: int):
    """`dfm.train.TrainConfig` of a stage: its section's optimizer; experts keep the dense
    schedule's shape, compressed to their steps (warmup scaled by ``steps_k / stage2.steps``, but
    never to 0 when the section has a warmup: an expert continues from stage 1 with a fresh AdamW
    state, and starting it at the peak learning rate is what the warmup exists to avoid). Stage 2
    with `continue_schedule` peaks where stage 1's schedule ended. Validation: `validations`
    evenly spaced points (``validate_every = ceil(steps / validations)``) and the section's `keep`."""
    from dfm.train import TrainConfig

    opt = ctx.task.stage_config(ctx.config, stage)
    warmup, lr = opt.warmup_steps, opt.learning_rate
    if stage != ctx.task.stage1 and opt.continue_schedule:
        lr = getattr(ctx.config, ctx.task.stage1).learning_rate * TrainConfig(steps=1).min_lr_ratio
    if stage not in (ctx.task.stage1, "dense"):
        warmup = round(opt.warmup_steps * steps / ctx.config.stage2.steps)
        if opt.warmup_steps > 0:
            warmup = max(1, warmup)
    validate_every = -(-steps // opt.validations) if opt.validations else 0
    return TrainConfig(steps=steps, learning_rate=lr, warmup_steps=min(steps, warmup),
                       weight_decay=opt.weight_decay, seed=ctx.config.seed, checkpoint_every=opt.checkpoint_every,
                       log_every=max(1, steps // 100), frozen=ctx.task.frozen(opt),
                       microbatches=ctx.config.numerics.microbatches,
                       async_checkpoint=ctx.config.numerics.async_checkpoint,
                       validate_every=validate_every, keep_best=validate_every > 0 and opt.keep == "best")


def training_mesh(mesh_section):
    """The `[mesh]` section as a `jax.sharding.Mesh`, or None for the default unsharded layout."""
    if not mesh_section.sharded:
        return None
    from dfm.sharding import MeshConfig, make_mesh

    m = mesh_section
    return make_mesh(MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor))


def load_stage_model(ctx: Context, data, stage: str, factory: Callable[[], Any] | None = None):
    """The final model of a finished stage (`factory` builds the empty model; default the task's).

    Raises:
      StageError: the stage has not finished.
    """
    from dfm.train import load_model

    if not ctx.run.is_done(stage):
        raise StageError(f"stage {stage!r} has not finished in {ctx.run.root}; run `dfm train` for it first")
    try:
        return load_model(factory or (lambda: ctx.task.new_model(ctx, data)), ctx.run.model(stage))
    except Exception as exc:  # noqa: BLE001 - orbax raises many types; name the model instead
        raise StageError(f"stage {stage!r}: its model {ctx.run.model(stage)} does not load "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); re-run `dfm run` to "
                         f"re-train it (the stage is re-run when its model fails its checksum)") from None


def metrics_kwargs(ctx: Context, stage: str) -> dict:
    """The `dfm.train.train` keyword arguments that log a stage's rows as they are logged:
    ``metrics_path=logs/<stage>/metrics.jsonl`` and ``tensorboard_dir=logs/<stage>/tensorboard``
    (used when tensorboardX or torch + tensorboard is installed). Every training stage passes them,
    the tasks' extra stages too (`Task.run_extra`)."""
    return {"metrics_path": ctx.run.metrics(stage), "tensorboard_dir": ctx.run.tensorboard(stage)}


def finish_training(ctx: Context, stage: str, model, result, tc, batch_size: int, num_examples: int, *,
                    extra: dict | None = None, t0: float | None = None) -> dict | None:
    """Save the final model and write the stage's marker; None (and a log line) if stopped early.

    The marker holds steps, batch size, training examples, examples seen, wall time, the final
    loss, the loss history (and any other logged metric, e.g. accuracy), the validation rows
    (`result.validation`, or else the rows of ``logs/<stage>/metrics.jsonl`` with a "val_loss";
    the loss-curve plot draws them), the model kept ("best" with its `best_step` and
    `best_val_loss`, or "last") and `extra`.
    """
    from dfm.train import save_model
    from dfm.train.loop import read_metrics

    if result.steps_done < tc.steps:
        ctx.log(f"[{stage}] stopped at step {result.steps_done}/{tc.steps}; re-run to resume")
        return None
    save_model(model, ctx.run.model(stage))
    h = result.history
    info = {
        "steps": tc.steps, "batch_size": batch_size, "train_examples": int(num_examples),
        "examples_seen": int(tc.steps * batch_size), "frozen": list(tc.frozen),
        "wall_time_s": float(h[-1]["wall"]) if h else result.wall_time_s,
        "final_loss": float(h[-1]["loss"]) if h else None,
        "history": [{k: r[k] for k in ("step", "loss", "accuracy") if k in r} for r in h],
        "validation": [{"step": r["step"], "val_loss": r["val_loss"]}
                       for r in (getattr(result, "validation", None) or read_metrics(ctx.run.metrics(stage)))
                       if "val_loss" in r and "step" in r],
        "kept": "best" if tc.keep_best and getattr(result, "best_step", None) is not None else "last",
        "best_step": getattr(result, "best_step", None),
        "best_val_loss": getattr(result, "best_val_loss", None),
        **(extra or {}),
    }
    ctx.run.mark_done(stage, info, model=True)
    took = f" (this call {time.perf_counter() - t0:.1f} s)" if t0 is not None else ""
    kept = ""
    if info["best_step"] is not None:
        kept = (f", validation {info['best_val_loss']:.4f} at step {info['best_step']}"
                f"{' (kept)' if info['kept'] == 'best' else ''}")
    ctx.log(f"[{stage}] {tc.steps} steps on {num_examples} examples, loss {info['final_loss']:.4f}{kept}, "
            f"{info['wall_time_s']:.1f} s{took}")
    return info


def run_train(ctx: Context, data, stage: str, *, stop_after: int | None = None) -> dict | None:
    """Train one stage (skipped if finished; resumed if interrupted).

    Args:
      stage: stage 1, "dense", "expert-k", "random-k" or one of the task's extra stages.
      stop_after: stop after this many steps in total (testing resume); the stage then stays
        unfinished and a later call resumes it.

    Returns:
      the stage's marker info, or None if stopped early by `stop_after`.

    Raises:
      StageError: an unknown stage, or a prerequisite stage is missing.
    """
    from dfm.train import TrainingDiverged

    names = training_stages(ctx)
    if stage not in names:
        raise StageError(f"unknown stage {stage!r}; stages of this config: {', '.join(names)}")
    if _finished(ctx, stage):
        ctx.log(f"[{stage}] already finished, skipped")
        return ctx.run.stage_info(stage)
    with stage_lock(ctx.run, stage, ctx.log):
        if ctx.run.is_done(stage):               # finished by another process meanwhile
            return ctx.run.stage_info(stage)
        try:
            if stage in ctx.task.extra_stages(ctx.config):
                return ctx.task.run_extra(ctx, data, stage, stop_after=stop_after)
            return _train_stage(ctx, data, stage, stop_after)
        except TrainingDiverged as exc:
            raise StageError(str(exc)) from None


def _finished(ctx: Context, stage: str) -> bool:
    """The stage's marker exists and its model passes the recorded checksum; a marker that cannot be
    trusted is removed (with a log line) so that the stage runs again."""
    if not ctx.run.is_done(stage):
        return False
    problem = ctx.run.stage_problem(stage)
    if problem is None:
        return True
    ctx.log(f"[{stage}] the finished stage cannot be trusted: {problem}; re-running it (from its checkpoints)")
    ctx.run.forget(stage)
    return False


def _train_stage(ctx: Context, data, stage: str, stop_after: int | None) -> dict | None:
    from dfm.train.loop import train
    from experiments.engine.batches import EpochBatches
    from experiments.engine.validation import make_validate, validation_units

    t0 = time.perf_counter()
    if stage == ctx.task.stage1:
        steps = stage_steps(ctx, stage)
        index = np.arange(ctx.task.num_train_examples(data))
        model = ctx.task.new_model(ctx, data)
    else:
        assignments = load_assignments(ctx)
        if not ctx.run.is_done(ctx.task.stage1):
            raise StageError(f"stage {stage!r} continues from {ctx.task.stage1}: run `dfm train --base` first")
        steps = stage_steps(ctx, stage, assignments)
        if stage == "dense":
            index = np.arange(len(assignments.example_unit))
        else:
            kind, k = stage.split("-")
            index = np.flatnonzero(assignments.examples(random=kind == "random") == int(k))
        model = load_stage_model(ctx, data, ctx.task.stage1)
    tc = train_config(ctx, stage, steps)
    section = ctx.task.stage_config(ctx.config, stage)
    if section.warmup_steps > section.steps:
        ctx.log(f"[{stage}] warning: warmup_steps = {section.warmup_steps} > steps = {section.steps}: the learning "
                f"rate never reaches its peak ({section.learning_rate:g}); the warmup is cut to the {steps} steps")
    batch_size = section.batch_size
    batches = EpochBatches(len(index), batch_size, ctx.config.seed, stage, steps=steps)
    loss_fn, validate = ctx.task.loss_fn(ctx, data), None
    if tc.validate_every:
        units = None if stage == ctx.task.stage1 else validation_units(stage, assignments)
        val_batches = ctx.task.validation_batches(ctx, data, units)
        if val_batches:
            validate = make_validate(loss_fn, val_batches)
        else:
            ctx.log(f"[{stage}] no validation examples for this model: it keeps its last parameters")
    result = train(model, loss_fn, ctx.task.batch_fn(ctx, data, index, batches), tc,
                   checkpoint_dir=ctx.run.checkpoints(stage), desc=stage, stop_after=stop_after,
                   progress=ctx.progress, mesh=training_mesh(ctx.config.mesh), validate=validate,
                   **metrics_kwargs(ctx, stage))
    return finish_training(ctx, stage, model, result, tc, batch_size, len(index),
                           extra=ctx.task.stage_marker(ctx, stage, steps, batch_size), t0=t0)


# ----------------------------------------------------------------------------------------------
# evaluation, export, everything
# ----------------------------------------------------------------------------------------------
def run_evaluate(ctx: Context, data) -> dict:
    """`Task.evaluate`, then `Task.write_report` and `Task.print_summary` (skipped, summary
    printed, when done).

    Raises:
      StageError: a training stage has not finished.
    """
    if ctx.run.is_done("evaluate"):
        try:
            rep = read_json(ctx.run.report_json)
            ctx.log("[evaluate] already finished, skipped")
            ctx.task.print_summary(rep)
            return rep
        except RunDirError as exc:
            ctx.log(f"[evaluate] the finished report cannot be read: {exc}; evaluating again")
            ctx.run.marker("evaluate").unlink(missing_ok=True)
    missing = [s for s in training_stages(ctx) if not ctx.run.is_done(s)]
    if missing:
        raise StageError(f"cannot evaluate: unfinished stages {', '.join(missing)}; run `dfm run` "
                         f"or `dfm train` for them")
    with stage_lock(ctx.run, "evaluate", ctx.log):
        t0 = time.perf_counter()
        results = ctx.task.evaluate(ctx, data)
        rep = ctx.task.write_report(ctx, data, results)
        ctx.run.mark_done("evaluate", {"wall_time_s": time.perf_counter() - t0,
                                       "skipped_experts": list(ctx.skip_experts)})
    ctx.task.print_summary(rep)
    return rep


def run_export(ctx: Context, data) -> dict | None:
    """`Task.export` after the evaluation (skipped when done; None for tasks without export).

    Raises:
      StageError: the evaluation has not finished.
    """
    if not ctx.task.has_export:
        return None
    if ctx.run.is_done("export"):
        return ctx.run.stage_info("export")
    if not ctx.run.is_done("evaluate"):
        raise StageError("export needs the evaluation (its fitted router temperature): run `dfm evaluate`")
    with stage_lock(ctx.run, "export", ctx.log):
        t0 = time.perf_counter()
        info = ctx.task.export(ctx, data) | {"wall_time_s": time.perf_counter() - t0}
        ctx.run.mark_done("export", info)
    return info


def load_data(ctx: Context):
    """The task's data (its data stage under the "data" lock when not yet done), then the checks
    that need no training: K against the train units, and (while a training stage is left) the
    memory a training stage needs against this machine's RAM (a warning).

    Raises:
      StageError: more clusters than train units.
    """
    if ctx.run.data_summary.is_file():
        data = ctx.task.prepare_data(ctx)
    else:
        with stage_lock(ctx.run, "data", ctx.log):
            data = ctx.task.prepare_data(ctx)
    k, units = ctx.config.partition.num_clusters, ctx.task.num_train_units(data)
    if k > units:
        raise StageError(f"partition.num_clusters: K={k} experts but only {units} train units to partition; "
                         f"lower partition.num_clusters")
    if all(ctx.run.is_done(stage) for stage in training_stages(ctx)):
        return data                               # nothing left to train: no estimate needed
    need, ram = ctx.task.training_memory_bytes(ctx, data), physical_memory_bytes()
    if need is not None and ram is not None and need > ram:
        ctx.log(f"[data] warning: a training stage needs about {need / 2**30:.1f} GiB (parameters, AdamW state "
                f"and float32 activations of one batch) but this machine has {ram / 2**30:.1f} GiB of RAM; "
                f"lower the sequence length or the batch size")
    return data


def physical_memory_bytes() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def run_until_partition(ctx: Context, data) -> dict:
    """The data stage, stage 1 when the partition needs it, and the partition."""
    if ctx.task.partition_after_stage1(ctx.config):
        run_train(ctx, data, ctx.task.stage1)
    return run_partition(ctx, data)


def run_all(ctx: Context) -> dict:
    """Every stage in order, in this process; finished stages are skipped."""
    t0 = time.perf_counter()
    data = load_data(ctx)
    run_until_partition(ctx, data)
    for stage in training_stages(ctx):
        run_train(ctx, data, stage)
    rep = run_evaluate(ctx, data)
    run_export(ctx, data)
    ctx.log(f"[run] done in {time.perf_counter() - t0:.1f} s; report: {ctx.run.report_md}")
    return rep

