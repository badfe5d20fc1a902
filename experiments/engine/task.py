"""The `Task` interface: what differs between jobs (text, multimodal); the engine does the rest.

The engine (`experiments.engine.stages`) owns the run directory, the stage graph

    data -> stage 1 -> partition -> dense / expert-k / random-k -> extras -> evaluate -> [export]

(the partition runs before stage 1 when its features do not come from the stage-1 model), the
balanced k-means and the random control, the compute-matched step allocation, training (one loop,
`dfm.train.train`, with the config's `[mesh]`) and evaluate-and-report. A task supplies its data,
the features it partitions by, its model, loss and batches, optional extra stages, its evaluation
and report body, and optionally an export stage. Tasks import the engine and `dfm`, never each
other; the engine never imports a task (`experiments.registry` maps config names to tasks).
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from experiments.engine.config import JobConfig, StageConfig


class UsageError(ValueError):
    """A command-line flag that does not apply to the chosen task (exit status 2)."""


class DataError(ValueError):
    """A task's input data cannot be used (exit status 1); the message names the record and file."""


@dataclass(frozen=True)
class PartitionInput:
    """What the engine clusters (spherical balanced k-means, `dfm.decentral.balanced_kmeans`).

    Units are what is partitioned (documents, images); training examples (sequences,
    conversations) inherit their unit's cluster.

    Attributes:
      features: ``{"train" | "val" | "test": [n_units, D]}`` features of each split's units.
      example_unit: ``[num_train_examples]`` index of each training example's train unit.
      units, examples: plural nouns for the report ("documents", "sequences").
    """

    features: dict[str, np.ndarray]
    example_unit: np.ndarray
    units: str
    examples: str


class Task(abc.ABC):
    """One job of the pipeline. Subclasses set the class attributes and implement the methods.

    Attributes:
      name: the config's ``task`` value ("text", "mllm").
      config_class: the task's `JobConfig` dataclass (sections `partition` with
        ``num_clusters``, ``random_control``, ``seed``; `stage2`; `mesh`; `eval` with ``top_k``;
        and the stage-1 section named `stage1`).
      stage1: name of the shared first training stage and of its config section.
      partition_needs_stage1: the partition features come from the stage-1 model.
      has_export: the task has an export stage after evaluation.
    """

    name: str
    config_class: type[JobConfig]
    stage1: str
    partition_needs_stage1: bool = False
    has_export: bool = False

    # ---------------------------------------------------------------- config
    def with_schedule(self, config: JobConfig, schedule: str | None) -> JobConfig:
        """The config with the command line's ``--schedule`` applied (default: none accepted).

        Raises:
          UsageError: the task has no schedule choice.
        """
        if schedule is not None:
            raise UsageError(f"--schedule: the {self.name} task has no schedule choice; drop --schedule")
        return config

    def stage_config(self, config: JobConfig, stage: str) -> StageConfig:
        """The optimizer section of a training stage: stage 1's section or `stage2`."""
        return getattr(config, self.stage1) if stage == self.stage1 else config.stage2

    # ---------------------------------------------------------------- data
    @abc.abstractmethod
    def prepare_data(self, ctx) -> Any:
        """Run the data stage if needed (idempotent, writes ``<run>/data``) and return the loaded
        data object that every later stage receives."""

    @abc.abstractmethod
    def num_train_examples(self, data) -> int:
        """Number of training examples (sequences, conversations) of stage 1 and the dense model."""

    @abc.abstractmethod
    def num_train_units(self, data) -> int:
        """Number of train units the partition clusters (documents, images)."""

    def training_memory_bytes(self, ctx, data) -> int | None:
        """Estimated bytes of one training step (`experiments.engine.memory`), or None (no check)."""
        del ctx, data
        return None

    # ---------------------------------------------------------------- partition
    def partition_after_stage1(self, config: JobConfig) -> bool:
        """Whether this config's partition features come from the stage-1 model (then stage 1 runs
        before the partition); default the class attribute `partition_needs_stage1`."""
        del config
        return self.partition_needs_stage1

    @abc.abstractmethod
    def partition_input(self, ctx, data, stage1_model) -> PartitionInput:
        """Features of the units of every split (and any files the evaluation needs, written to
        ``ctx.run.partition``); `stage1_model` is None unless `partition_after_stage1(config)`."""

    # ---------------------------------------------------------------- training
    @abc.abstractmethod
    def new_model(self, ctx, data):
        """A freshly initialized model of this run (seeded by the config)."""

    @abc.abstractmethod
    def loss_fn(self, ctx, data) -> Callable:
        """``loss_fn(model, batch, key) -> (scalar loss, metrics)`` of every training stage."""

    @abc.abstractmethod
    def batch_fn(self, ctx, data, index: np.ndarray, batches) -> Callable[[int], Any]:
        """``batch(step)`` of the training examples `index` (an `EpochBatches` gives the rows)."""

    def validation_batches(self, ctx, data, units: np.ndarray | None):
        """Fixed batches of validation examples for `loss_fn` (model selection during training;
        `experiments.engine.validation`): the examples of the validation units `units` (indices
        into the validation split's units; None = all), in a fixed order, as a list (or any
        sequence with `len` and indexing, e.g. one that builds each batch when read). Empty = no
        validation (the default; the stage then keeps its last model)."""
        del ctx, data, units
        return []

    def frozen(self, stage_config: StageConfig) -> tuple[str, ...]:
        """Dotted parameter prefixes that a stage does not update (default: none)."""
        del stage_config
        return ()

    def stage_marker(self, ctx, stage: str, steps: int, batch_size: int) -> dict:
        """Task-specific entries of a training stage's completion marker (e.g. token counts)."""
        del ctx, stage, steps, batch_size
        return {}

    def extra_stages(self, config: JobConfig) -> list[str]:
        """Training stages after the experts (e.g. the text job's learned router)."""
        del config
        return []

    def run_extra(self, ctx, data, stage: str, *, stop_after: int | None = None) -> dict | None:
        """Train an extra stage (see `extra_stages`)."""
        raise UsageError(f"stage {stage!r}: the {self.name} task has no extra stages")

    # ---------------------------------------------------------------- evaluation
    @abc.abstractmethod
    def evaluate(self, ctx, data) -> dict:
        """Score every system; returns the results the report renders."""

    @abc.abstractmethod
    def write_report(self, ctx, data, results: dict) -> dict:
        """Write report.json, report.md and the plots; returns the report dict."""

    @abc.abstractmethod
    def print_summary(self, report: dict) -> None:
        """Print the report's table."""

    def plan_model(self, config: JobConfig, vocab: int | None = None):
        """``(factory, dims)`` for `dfm plan` (`experiments.engine.plan`): a zero-argument builder
        of the config's freshly initialized model (only traced, with `nnx.eval_shape`) and its
        `plan.Dims`; `vocab` overrides the config's vocabulary. Raises NotImplementedError for a
        task without a plan."""
        raise NotImplementedError(f"task {self.name!r}: dfm plan is not available for it")

    def export(self, ctx, data) -> dict:
        """Export the trained models (when `has_export`); returns the stage's marker info."""
        raise UsageError(f"the {self.name} task has no export stage")
