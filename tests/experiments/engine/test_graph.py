"""The engine's stage graph and its bookkeeping between the partition and the expert stages
(experiments/engine/graph.py, .clustering, .training): the stage names of a config, the run options,
each training example's cluster, the priors `w_k`, the experts' compute-matched budgets, and the
random control, checked against values worked out by hand; and what the configs decide about the
graph (extra stages, frozen parameters, the partition's need of stage 1, ``--schedule``)."""
import numpy as np
import pytest

from experiments.engine.batches import allocate_steps
from experiments.engine.clustering import random_partition
from experiments.engine.config import UsageError
from experiments.engine.graph import (
    Assignments,
    RunOptions,
    StageError,
    available_experts,
    expert_names,
    expert_stage,
    run_options,
    stage_section,
    training_stages,
)
from experiments.engine.training import stage_steps
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.mllm.task import MultimodalTask
from experiments.text.config import load_config
from experiments.text.task import TextTask

# 4 train units (documents) -> 7 training examples (chunks): unit 0 has 1 example, unit 1 has 2,
# unit 2 has 3, unit 3 has 1. K-means put units in clusters [0, 1, 1, 2]; the random control in
# [2, 0, 1, 1].
ASSIGNMENTS = Assignments(
    units={"train": np.array([0, 1, 1, 2]), "random": np.array([2, 0, 1, 1]),
           "val": np.array([1, 0]), "test": np.array([2])},
    example_unit=np.array([0, 1, 1, 2, 2, 2, 3]))


def test_each_example_takes_its_units_cluster():
    assert ASSIGNMENTS.examples().tolist() == [0, 1, 1, 1, 1, 1, 2]
    assert ASSIGNMENTS.examples(random=True).tolist() == [2, 0, 0, 1, 1, 1, 1]


def test_priors_are_the_clusters_shares_of_training_examples():
    # examples per cluster: k-means 1, 5, 1 of 7; random control 2, 4, 1 of 7 (shares of examples,
    # not of units: by units both would be 1/4, 2/4, 1/4)
    np.testing.assert_array_equal(ASSIGNMENTS.priors(3), np.array([1, 5, 1]) / 7)
    np.testing.assert_array_equal(ASSIGNMENTS.priors(3, random=True), np.array([2, 4, 1]) / 7)
    # a cluster without examples has prior 0 and keeps its place
    np.testing.assert_array_equal(ASSIGNMENTS.priors(4), np.array([1, 5, 1, 0]) / 7)


def test_expert_budgets_follow_the_example_counts():
    """What `stage_steps` computes for expert-k / random-k with stage2.steps = 10: largest-remainder
    shares of the example counts (quotas 10/7, 50/7, 10/7 = 1.43, 7.14, 1.43; random 2.86, 5.71, 1.43)."""
    counts = np.bincount(ASSIGNMENTS.examples(), minlength=3)
    assert allocate_steps(10, counts) == [2, 7, 1]      # remainders .43 (tie, lower index), .14, .43
    counts = np.bincount(ASSIGNMENTS.examples(random=True), minlength=3)
    assert allocate_steps(10, counts) == [3, 6, 1]      # floors 2, 5, 1; remainders .86, .71, .43


def test_stage_steps_are_those_budgets():
    task, config = TextTask(), load_config("tiny")
    config = config.replace(partition=config.partition.__class__(**{**config.partition.__dict__, "num_clusters": 3}),
                            stage2=config.stage2.__class__(**{**config.stage2.__dict__, "steps": 10}))
    assert [stage_steps(task, config, f"expert-{k}", ASSIGNMENTS) for k in range(3)] == [2, 7, 1]
    assert [stage_steps(task, config, f"random-{k}", ASSIGNMENTS) for k in range(3)] == [3, 6, 1]
    assert stage_steps(task, config, "dense") == 10
    assert stage_steps(task, config, "base") == config.base.steps
    with pytest.raises(ValueError, match="assignments"):
        stage_steps(task, config, "expert-0")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_control_without_weights_keeps_each_clusters_unit_count(seed):
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    got = random_partition(labels, None, 3, seed)
    assert got.shape == labels.shape
    assert np.bincount(got, minlength=3).tolist() == [4, 2, 4]
    np.testing.assert_array_equal(got, random_partition(labels, None, 3, seed))      # seeded


def test_random_control_differs_from_the_partition_and_between_seeds():
    labels = np.repeat(np.arange(4), 25)
    draws = [random_partition(labels, None, 4, seed) for seed in range(3)]
    assert all((d != labels).any() for d in draws)
    assert (draws[0] != draws[1]).any() and (draws[1] != draws[2]).any()


@pytest.mark.parametrize("seed", [0, 3])
def test_random_control_with_weights_balances_examples_within_the_bound(seed):
    """Weights = examples per unit: every cluster's examples W_k within w_max of W / K
    (`weighted_balanced_assignment`'s bound), so the control's budgets match the experts'."""
    weights = np.array([5, 1, 1, 3, 2, 2, 4, 1, 1, 1, 3, 2], dtype=np.int64)   # W = 26, K = 3
    labels = np.zeros(len(weights), np.int64)                                  # only its length is used
    got = random_partition(labels, weights, 3, seed)
    assert got.shape == weights.shape and set(got.tolist()) <= {0, 1, 2}
    per_cluster = np.bincount(got, weights=weights, minlength=3)
    assert per_cluster.sum() == 26
    assert np.all(per_cluster > 0)
    assert np.all(np.abs(per_cluster - 26 / 3) <= weights.max()), per_cluster
    np.testing.assert_array_equal(got, random_partition(labels, weights, 3, seed))


def test_training_stages_in_order_without_the_skipped_experts():
    config = load_config("tiny")
    k = config.partition.num_clusters
    experts = [f"expert-{i}" for i in range(k)]
    randoms = [f"random-{i}" for i in range(k)] if config.partition.random_control else []
    assert expert_names(config) == experts and expert_names(config, random=True) == randoms
    assert training_stages(config, "base") == ["base", "dense", *experts, *randoms]
    assert training_stages(config, "base", (0,)) == ["base", "dense", *experts[1:], *randoms]
    masked = config.with_schedule("masked")
    assert masked.name == f"{config.name}-masked" and masked.extra_stages == ("router",)
    assert training_stages(masked, "base")[-1] == "router"
    assert config.with_schedule(None) is config and config.with_schedule("ar") is config
    assert config.extra_stages == ()


def test_run_options_check_the_skipped_experts():
    config = load_config("tiny")
    k = config.partition.num_clusters
    assert run_options(config, skip_experts=[k - 1, k - 1]).skip_experts == (k - 1,)     # sorted, no duplicates
    assert run_options(config) == RunOptions()
    for bad in ([k], [-1], list(range(k))):
        with pytest.raises(StageError, match="--skip-expert"):
            run_options(config, skip_experts=bad)
    assert available_experts(config, (0,)).tolist() == [False] + [True] * (k - 1)


def test_expert_stage_names_and_range():
    config = load_config("tiny")
    assert expert_stage(config, 0) == "expert-0" and expert_stage(config, 1, random=True) == "random-1"
    with pytest.raises(StageError, match="out of range"):
        expert_stage(config, config.partition.num_clusters)


def test_what_the_multimodal_config_decides():
    """Stage 2 freezes the tower (the routing features come from it), stage 1 trains everything;
    tower features need stage 1, CLIP features do not; ``--schedule`` accepts only "ar"."""
    task, config = MultimodalTask(), MultimodalExperimentConfig()
    assert stage_section(config, task.stage1, "stage1") is config.stage1
    assert stage_section(config, task.stage1, "expert-0") is config.stage2
    assert config.stage1.frozen == () and config.stage2.frozen == ("vision_tower",)
    assert config.partition.needs_stage1
    clip = config.replace(partition=config.partition.__class__(**{**config.partition.__dict__,
                                                                  "features": "clip:/some/dir"}))
    assert not clip.partition.needs_stage1
    assert config.with_schedule("ar") is config and config.extra_stages == ()
    with pytest.raises(UsageError, match="autoregressive"):
        config.with_schedule("masked")
    text = load_config("tiny")
    assert text.base.frozen == () and not text.partition.needs_stage1
