"""The stage graph of a job, for any `Task`: stage names, the run options, the partition's
assignments and whether a stage's marker can be trusted.

    data       the task's data stage (`Task.prepare_data`)
    <stage 1>  one model on all training examples ("base" in the text job, "stage1" in the
               multimodal job; `Task.stage1`)
    partition  balanced k-means of the train units and the random control
               (`experiments.engine.clustering`)
    dense      stage 2: continues from stage 1 on all training examples for `stage2.steps` steps
    expert-k   stage 2: continues from stage 1 on cluster k only, `steps_k` steps with
               sum_k steps_k = stage2.steps (proportional to the clusters' training examples)
    random-k   the same for the random partition (control)
    extras     the config's extra stages (`JobConfig.extra_stages`, e.g. the learned router)
    evaluate   `Task.evaluate` (`experiments.engine.evaluation`)
    export     `Task.export` (tasks with `has_export`)

A stage is finished when its marker ``stages/<stage>.json`` exists (`RunDir.mark_done`) and, for a
training stage, its model passes the checksum the marker recorded (`finished`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from experiments.engine.config import JobConfig, StageConfig
from experiments.engine.rundir import RunDir, RunDirError, read_json


class StageError(RuntimeError):
    """A stage cannot run (missing prerequisite, bad stage argument); the message says why."""


@dataclass(frozen=True)
class RunOptions:
    """How a run reports and which experts it leaves out (`run_options` checks them against a config).

    Attributes:
      progress: show progress bars.
      log: prints one line (``print`` by default).
      skip_experts: cluster experts left out (lost, e.g. a failed job): not trained, not required by
        the evaluation, whose ensembles renormalise their routers over the remaining experts.
    """

    progress: bool = True
    log: Callable[..., None] = print
    skip_experts: tuple[int, ...] = ()


def run_options(config: JobConfig, *, progress: bool = True, log: Callable[..., None] = print,
                skip_experts: tuple[int, ...] | list[int] = ()) -> RunOptions:
    """`RunOptions` with `skip_experts` checked against the config's K (sorted, duplicates dropped).

    Raises:
      StageError: a skipped expert index outside [0, K), or every expert skipped.
    """
    k = config.partition.num_clusters
    bad = [i for i in skip_experts if not 0 <= i < k]
    if bad or len(set(skip_experts)) >= k:
        raise StageError(f"--skip-expert {bad or list(skip_experts)}: expert indices must be in 0..{k - 1} and at "
                         f"least one expert must remain")
    return RunOptions(progress, log, tuple(sorted(set(skip_experts))))


def available_experts(config: JobConfig, skip_experts: tuple[int, ...] = ()) -> np.ndarray:
    """``[K]`` bool: the cluster experts that are not skipped."""
    mask = np.ones(config.partition.num_clusters, bool)
    mask[list(skip_experts)] = False
    return mask


# ----------------------------------------------------------------------------------------------
# stage names
# ----------------------------------------------------------------------------------------------
def expert_names(config: JobConfig, random: bool = False) -> list[str]:
    """``expert-0 .. expert-{K-1}`` (or the random-partition ``random-k``; [] if the control is off)."""
    if random and not config.partition.random_control:
        return []
    return [f"{'random' if random else 'expert'}-{i}" for i in range(config.partition.num_clusters)]


def training_stages(config: JobConfig, stage1: str, skip_experts: tuple[int, ...] = ()) -> list[str]:
    """All training stages of the run (skipped experts left out), in the order the pipeline runs
    them: `stage1` (the task's `Task.stage1`), dense, the experts, the random control, the extras."""
    experts = [e for i, e in enumerate(expert_names(config)) if i not in skip_experts]
    return [stage1, "dense", *experts, *expert_names(config, random=True), *config.extra_stages]


def expert_stage(config: JobConfig, k: int, random: bool = False) -> str:
    """Stage name of expert `k` ("expert-k", or "random-k" for the random partition).

    Raises:
      StageError: k outside [0, K), or the random control disabled in the config.
    """
    num = config.partition.num_clusters
    if not 0 <= k < num:
        raise StageError(f"expert index {k} out of range: the config has K={num} experts (0..{num - 1})")
    if random and not config.partition.random_control:
        raise StageError("partition.random_control is false in this config: no random-partition experts")
    return f"{'random' if random else 'expert'}-{k}"


def stage_section(config: JobConfig, stage1: str, stage: str) -> StageConfig:
    """The optimizer section of a training stage: stage 1's section (named `stage1`) or `stage2`."""
    return getattr(config, stage1) if stage == stage1 else config.stage2


# ----------------------------------------------------------------------------------------------
# the partition's assignments
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


def load_assignments(run: RunDir, num_clusters: int) -> Assignments:
    """The partition of the run in `run` (labels checked against `num_clusters` = K).

    Raises:
      StageError: the partition has not run yet.
      RunDirError: the assignments file is not a partition's (naming it).
    """
    if not run.is_done("partition"):
        raise StageError(f"{run.root}: no partition yet; run `dfm partition` first")
    path = run.partition / "assignments.json"
    raw = read_json(path)
    k = num_clusters
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


# ----------------------------------------------------------------------------------------------
# markers
# ----------------------------------------------------------------------------------------------
def finished(run: RunDir, stage: str, log: Callable[..., None] = print) -> bool:
    """The stage's marker exists and its model passes the recorded checksum; a marker that cannot be
    trusted is removed (with a log line) so that the stage runs again."""
    if not run.is_done(stage):
        return False
    problem = run.stage_problem(stage)
    if problem is None:
        return True
    log(f"[{stage}] the finished stage cannot be trusted: {problem}; re-running it (from its checkpoints)")
    run.forget(stage)
    return False
