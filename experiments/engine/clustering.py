"""The partition stage, for any `Task`: which cluster (expert) every unit and training example is in.

Spherical balanced k-means (`dfm.decentral.balanced_kmeans`) on the train units' features
(`Task.partition_input`), balanced in training examples (units weighted by their examples,
``[partition] balance = "examples"``) or in units; a random partition under the same balance (the
control, `random_partition`); val / test units assigned to the nearest centroid. Writes
``partition/partition.npz`` and ``partition/assignments.json`` (read back by
`experiments.engine.graph.load_assignments`). When ``config.partition.needs_stage1`` the features
come from the stage-1 model, which must have finished.

(`dfm.decentral.partition` is the library's k-means; this module is the job's stage around it.)
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from dfm.decentral import assign, balanced_kmeans, two_stage_balanced_kmeans, weighted_balanced_assignment
from experiments.engine.config import JobConfig
from experiments.engine.graph import StageError
from experiments.engine.locks import stage_lock
from experiments.engine.rundir import RunDir, atomic_write_json
from experiments.engine.task import Task
from experiments.engine.training import load_stage_model


def run_partition(task: Task, config: JobConfig, run: RunDir, data, *, log: Callable[..., None] = print) -> dict:
    """Balanced k-means on the train units, the random control, val / test assignment (idempotent).

    Raises:
      StageError: fewer train units than clusters, a cluster left without training examples, or
        (``config.partition.needs_stage1``) stage 1 has not finished.
    """
    if run.is_done("partition"):
        return run.stage_info("partition")
    with stage_lock(run, "partition", log):
        if run.is_done("partition"):          # finished by another process meanwhile
            return run.stage_info("partition")
        return _partition(task, config, run, data, log)


def _partition(task: Task, config: JobConfig, run: RunDir, data, log: Callable[..., None]) -> dict:
    t0 = time.perf_counter()
    pc = config.partition
    k = pc.num_clusters
    stage1 = (load_stage_model(run, task.stage1, lambda: task.new_model(config, data))
              if pc.needs_stage1 else None)
    inp = task.partition_input(config, run, data, stage1)
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
    run.partition.mkdir(parents=True, exist_ok=True)
    partition.save(run.partition / "partition.npz")
    assignments = {"train": labels.tolist(), "random": random_labels.tolist(),
                   "val": assign(partition, inp.features["val"]).tolist(),
                   "test": assign(partition, inp.features["test"]).tolist(),
                   "example_unit": np.asarray(inp.example_unit).tolist()}
    atomic_write_json(run.partition / "assignments.json", assignments)
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
    run.mark_done("partition", info)
    log(f"[partition] K={k}: {u} {info[f'{u}_per_cluster']}, {e} {info[f'{e}_per_cluster']}")
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
    return np.asarray(weighted_balanced_assignment(rng.random((len(labels), num_clusters)), weights), np.int64)
