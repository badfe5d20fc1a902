"""The `Task` interface: what differs between jobs (text, multimodal); the engine does the rest.

The engine owns the run directory (`experiments.engine.rundir`), the stage graph
(`experiments.engine.graph`)

    data -> stage 1 -> partition -> dense / expert-k / random-k -> extras -> evaluate -> [export]

(the partition runs before stage 1 when its features do not come from the stage-1 model,
`PartitionBalance.needs_stage1`), the balanced k-means and the random control
(`experiments.engine.clustering`), the compute-matched step allocation and training (one loop,
`dfm.train.train`, with the config's `[mesh]`; `experiments.engine.training`), evaluate-and-report
and export (`experiments.engine.evaluation`), and the order of it all (`experiments.engine.pipeline`).
A task supplies its data, the features it partitions by, its model, loss and batches, its extra
stages' training, its evaluation and report, and optionally an export stage.

Every method receives the values it reads, never an object that holds the task: the config, the
run directory (`RunDir`), the data `prepare_data` returned, and where needed how to report
(``log``, ``progress``) and which experts are left out (``skip_experts``). What a config decides
(extra stages, frozen parameters, whether the partition needs stage 1, ``--schedule``) is read
from the config (`experiments.engine.config`). Tasks import the engine and `dfm`, never each
other; the engine never imports a task (`experiments.registry` maps config names to tasks).
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from experiments.engine.config import JobConfig, UsageError

if TYPE_CHECKING:   # annotations only: this module stays light (the tasks' data modules import its errors)
    from experiments.engine.rundir import RunDir

__all__ = ["DataError", "PartitionInput", "StageBatches", "Task", "TaskData", "UsageError"]


class DataError(ValueError):
    """A task's input data cannot be used (exit status 1); the message names the record and file."""


class TaskData(Protocol):
    """What the engine reads of a task's loaded data (`Task.prepare_data`); the rest is the task's."""

    @property
    def num_train_examples(self) -> int:
        """Training examples (sequences, conversations) of stage 1 and the dense model."""

    @property
    def num_train_units(self) -> int:
        """Train units the partition clusters (documents, images)."""


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


@dataclass(frozen=True)
class StageBatches:
    """The batches of one training stage.

    Attributes:
      batch: ``batch(step)``, the input of the task's `loss_fn` at optimizer step `step`.
      marker: the task's entries of the stage's completion marker (e.g. token counts, packing).
    """

    batch: Callable[[int], Any]
    marker: dict


class Task(abc.ABC):
    """One job of the pipeline. Subclasses set the class attributes and implement the methods.

    Attributes:
      name: the config's ``task`` value ("text", "mllm").
      config_class: the task's `JobConfig` dataclass (sections `partition` with
        ``num_clusters``, ``random_control``, ``seed``; `stage2`; `mesh`; `eval` with ``top_k``;
        and the stage-1 section named `stage1`).
      stage1: name of the shared first training stage and of its config section.
      has_export: the task has an export stage after evaluation.
    """

    name: str
    config_class: type[JobConfig]
    stage1: str
    has_export: bool = False

    # ---------------------------------------------------------------- data
    @abc.abstractmethod
    def prepare_data(self, config: JobConfig, run: RunDir, *, log: Callable[..., None] = print) -> TaskData:
        """Run the data stage if needed (idempotent, writes ``<run>/data``) and return the loaded
        data object that every later stage receives."""

    def training_memory_bytes(self, config: JobConfig, data) -> int | None:
        """Estimated bytes of one training step (`experiments.engine.memory`), or None (no check)."""
        del config, data
        return None

    # ---------------------------------------------------------------- partition
    @abc.abstractmethod
    def partition_input(self, config: JobConfig, run: RunDir, data, stage1_model) -> PartitionInput:
        """Features of the units of every split (and any files the evaluation needs, written to
        ``run.partition``); `stage1_model` is None unless ``config.partition.needs_stage1``."""

    # ---------------------------------------------------------------- training
    @abc.abstractmethod
    def new_model(self, config: JobConfig, data):
        """A freshly initialized model of this run (seeded by the config)."""

    @abc.abstractmethod
    def loss_fn(self, config: JobConfig, data) -> Callable:
        """``loss_fn(model, batch, key) -> (scalar loss, metrics)`` of every training stage."""

    @abc.abstractmethod
    def stage_batches(self, config: JobConfig, data, index: np.ndarray, batches, *,
                      log: Callable[..., None] = print) -> StageBatches:
        """The batches of the training examples `index` (an `EpochBatches` named after the stage,
        with its `steps` and `batch_size`, gives the rows of each step) and the task's entries of
        the stage's marker."""

    def validation_batches(self, config: JobConfig, data, units: np.ndarray | None):
        """Fixed batches of validation examples for `loss_fn` (model selection during training;
        `experiments.engine.validation`): the examples of the validation units `units` (indices
        into the validation split's units; None = all), in a fixed order, as a list (or any
        sequence with `len` and indexing, e.g. one that builds each batch when read). Empty = no
        validation (the default; the stage then keeps its last model)."""
        del config, data, units
        return []

    def run_extra(self, config: JobConfig, run: RunDir, data, stage: str, *, progress: bool = True,
                  log: Callable[..., None] = print, stop_after: int | None = None) -> dict | None:
        """Train an extra stage (one of ``config.extra_stages``); returns its marker info, or None
        when stopped early by `stop_after`."""
        raise UsageError(f"stage {stage!r}: the {self.name} task has no extra stages")

    # ---------------------------------------------------------------- evaluation
    @abc.abstractmethod
    def evaluate(self, config: JobConfig, run: RunDir, data, *, skip_experts: tuple[int, ...] = (),
                 progress: bool = True) -> dict:
        """Score every system (the experts `skip_experts` left out) and write report.json,
        report.md and the plots; returns the report dict."""

    @abc.abstractmethod
    def print_summary(self, report: dict) -> None:
        """Print the report's table."""

    def plan_model(self, config: JobConfig, vocab: int | None = None):
        """``(factory, dims)`` for `dfm plan` (`experiments.engine.plan`): a zero-argument builder
        of the config's freshly initialized model (only traced, with `nnx.eval_shape`) and its
        `plan.Dims`; `vocab` overrides the config's vocabulary. Raises NotImplementedError for a
        task without a plan."""
        raise NotImplementedError(f"task {self.name!r}: dfm plan is not available for it")

    def export(self, config: JobConfig, run: RunDir, data, *, skip_experts: tuple[int, ...] = (),
               log: Callable[..., None] = print) -> dict:
        """Export the trained models (when `has_export`); returns the stage's marker info."""
        raise UsageError(f"the {self.name} task has no export stage")
