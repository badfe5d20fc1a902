"""The engine's bookkeeping between the partition and the expert stages
(experiments/engine/stages.py): each training example's cluster, the priors `w_k`, the experts'
compute-matched budgets, and the random control, checked against values worked out by hand."""
import numpy as np
import pytest

from experiments.engine.batches import allocate_steps
from experiments.engine.stages import Assignments, random_partition

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
