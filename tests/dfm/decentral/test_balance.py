"""Weight-balanced partitions (`weights=`): the documented balance bound, the cost bound against an
independent LP and brute force, equal weights = the unweighted partition, config report, errors."""
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

from dfm.decentral import (
    Partition,
    balanced_assignment,
    balanced_kmeans,
    weighted_balanced_assignment,
)


def _doc_lengths(rng, n, zeros=False):
    """Heavy-tailed integer weights, like training sequences per document (Pareto tail)."""
    w = np.floor(rng.pareto(1.3, n) * 4).astype(np.int64) + (0 if zeros else 1)
    if zeros and w.sum() == 0:
        w[0] = 1
    return w


def _check_guarantee(labels, w, k):
    """Every cluster non-empty and |W_k - W/K| <= max(w) (the documented bound)."""
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < k
    assert np.bincount(labels, minlength=k).min() >= 1
    got = np.bincount(labels, weights=w, minlength=k)
    assert np.abs(got - w.sum() / k).max() <= w.max() + 1e-9 * w.sum(), (got.tolist(), w.sum() / k, w.max())
    return got


def _lp_reference(cost, w):
    """Fractional optimum with every cluster receiving exactly W/K (dense, independent of the library)."""
    n, k = cost.shape
    a_eq = np.zeros((n + k, n * k))
    for i in range(n):
        a_eq[i, i * k:(i + 1) * k] = 1.0
    for j in range(k):
        a_eq[n + j, j::k] = w
    b_eq = np.concatenate([np.ones(n), np.full(k, w.sum() / k)])
    res = scipy.optimize.linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun


def _cost(cost, labels):
    return float(cost[np.arange(len(labels)), labels].sum())


@given(seed=st.integers(0, 2**16), n=st.integers(2, 60), k=st.integers(2, 6), zeros=st.booleans())
def test_weighted_assignment_bound_and_cost_bound(seed, n, k, zeros):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    cost = rng.random((n, k))
    w = _doc_lengths(rng, n, zeros)
    lp = _lp_reference(cost, w.astype(float))
    slack = (k - 1) * (cost.max() - cost.min()) + 1e-7
    for max_placements in (2**16, 1):          # enumeration, and the proof's tree rounding
        labels = weighted_balanced_assignment(cost, w, max_placements=max_placements)
        _check_guarantee(labels, w, k)
        if w.max() < w.sum() / k:              # no empty-cluster repair: documented cost bound
            assert _cost(cost, labels) <= lp + slack


def _equal_split_instance(rng, n, k):
    """Heavy-tailed integer weights that CAN be split into K groups of exactly equal weight."""
    groups = np.array_split(rng.permutation(n), k)
    w = np.zeros(n, dtype=np.int64)
    for g in groups:
        w[g] = _doc_lengths(rng, len(g))
    target = max(w[g].sum() for g in groups)
    for g in groups:
        w[g[-1]] += target - w[g].sum()
    return w


@pytest.mark.parametrize("n,k", [(6, 2), (8, 2), (7, 3), (8, 3)])
def test_weighted_assignment_against_brute_force(n, k):
    rng = np.random.default_rng(100 * n + k)
    labelings = np.indices((k,) * n, dtype=np.int8).reshape(n, -1).T.astype(np.int64)   # [k**n, n]
    for trial in range(4):
        cost = rng.random((n, k))
        w = _equal_split_instance(rng, n, k) if trial % 2 == 0 else _doc_lengths(rng, n)
        target = w.sum() / k
        totals = cost[np.arange(n), labelings].sum(axis=1)
        weights = np.stack([(w * (labelings == j)).sum(axis=1) for j in range(k)], axis=1)
        nonempty = np.stack([(labelings == j).any(axis=1) for j in range(k)], axis=1).all(axis=1)
        within = nonempty & (np.abs(weights - target) <= w.max()).all(axis=1)
        exact = nonempty & (weights == weights[:, :1]).all(axis=1)
        lp = _lp_reference(cost, w.astype(float))
        for max_placements in (2**16, 1):
            labels = weighted_balanced_assignment(cost, w, max_placements=max_placements)
            ours = _cost(cost, labels)
            _check_guarantee(labels, w, k)
            assert ours >= totals[within].min() - 1e-12          # brute-force optimum under the bound
            if exact.any():                                     # brute-force optimum, exactly equal
                assert lp <= totals[exact].min() + 1e-7
                if w.max() < target:
                    assert ours <= totals[exact].min() + (k - 1) * (cost.max() - cost.min()) + 1e-9
        if trial % 2 == 0:
            assert exact.any()


def test_empty_cluster_is_filled_when_one_point_outweighs_a_share():
    # the heavy point must sit alone; both light points prefer cluster 0, yet each cluster needs a point
    cost = np.array([[0.5, 0.4, 0.6], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    w = np.array([100, 1, 1])
    for max_placements in (2**16, 1):
        labels = weighted_balanced_assignment(cost, w, max_placements=max_placements)
        _check_guarantee(labels, w, 3)
        assert labels[0] == 1 and sorted(labels[1:].tolist()) == [0, 2]


def test_star_forest_needs_more_than_largest_share_rounding():
    # LP (unique): each heavy point (weight 10) puts 6 in cluster 0 and 4 in its own cluster i, which
    # holds 14 light points of weight 1: T = 72 / 4 = 18. Largest-share rounding (all heavies to
    # cluster 0) gives W_0 = 30, deviation 12 > max weight 10. Best placement: two heavies in cluster 0
    # (deviations 2, 6, 4, 4); the tree rounding of the proof meets the bound 10.
    heavy = np.array([[0.0, 0.5, 1.0, 1.0], [0.0, 1.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.5]])
    light = np.ones((42, 4))
    light[np.arange(42), 1 + np.arange(42) // 14] = 0.0
    cost, w = np.vstack([heavy, light]), np.r_[np.full(3, 10), np.ones(42, dtype=np.int64)]
    labels = weighted_balanced_assignment(cost, w)
    got = _check_guarantee(labels, w, 4)
    np.testing.assert_array_equal(labels[3:], 1 + np.arange(42) // 14)
    assert (labels[:3] == 0).sum() == 2 and np.abs(got - 18).max() == 6
    _check_guarantee(weighted_balanced_assignment(cost, w, max_placements=1), w, 4)


def test_one_cluster_and_one_point_per_cluster():
    np.testing.assert_array_equal(weighted_balanced_assignment(np.zeros((3, 1)), [1, 5, 2]), [0, 0, 0])
    cost = np.random.default_rng(0).random((3, 3))
    labels = weighted_balanced_assignment(cost, [1, 50, 2])
    assert sorted(labels.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("value", [1, 3.5])
def test_equal_weights_give_the_unweighted_partition(value):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(45, 6))
    ref, ref_labels = balanced_kmeans(x, 4, rng=7, max_iter=30)
    part, labels = balanced_kmeans(x, 4, rng=7, max_iter=30, weights=np.full(45, value))
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(part.centroids, ref.centroids)
    assert part.config["objective"] == ref.config["objective"]
    cost = rng.random((45, 4))
    np.testing.assert_array_equal(weighted_balanced_assignment(cost, np.full(45, value)), balanced_assignment(cost))


@pytest.mark.parametrize("seed", range(3))
def test_weighted_kmeans_balances_weight_and_reports_it(seed, tmp_path):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(240, 8)) + np.repeat(rng.normal(size=(4, 8)) * 2, 60, axis=0)
    w = _doc_lengths(rng, 240, zeros=True)
    part, labels = balanced_kmeans(x, 4, rng=seed, weights=w, max_iter=30)
    got = _check_guarantee(labels, w, 4)
    cfg = part.config
    assert cfg["weighted"] is True and cfg["weight_total"] == int(w.sum()) and cfg["weight_max"] == int(w.max())
    assert cfg["weight_per_cluster"] == got.astype(int).tolist()
    assert all(isinstance(v, int) for v in cfg["weight_per_cluster"])
    assert cfg["weight_max_deviation"] == pytest.approx(np.abs(got - w.sum() / 4).max())
    np.testing.assert_array_equal(part.sizes, np.bincount(labels, minlength=4))   # sizes stay in points
    _, plain = balanced_kmeans(x, 4, rng=seed, max_iter=30)
    plain_dev = np.abs(np.bincount(plain, weights=w, minlength=4) - w.sum() / 4).max()
    assert cfg["weight_max_deviation"] <= plain_dev
    part.save(tmp_path / "p.npz")
    assert Partition.load(tmp_path / "p.npz").config == cfg


def test_float_weights_reported_as_floats():
    rng = np.random.default_rng(5)
    w = rng.lognormal(0.0, 1.0, 30)
    part, labels = balanced_kmeans(rng.normal(size=(30, 5)), 3, weights=w, max_iter=10)
    got = _check_guarantee(labels, w, 3)
    np.testing.assert_allclose(part.config["weight_per_cluster"], got)
    assert "weighted" not in balanced_kmeans(rng.normal(size=(30, 5)), 3, max_iter=5)[0].config


@pytest.mark.parametrize("weights,match", [
    (np.ones(9), r"weights must have shape \[10\]"),
    (np.ones((10, 1)), r"weights must have shape \[10\]"),
    (np.r_[np.ones(9), np.nan], "weights contains NaN or inf"),
    (np.r_[np.ones(9), np.inf], "weights contains NaN or inf"),
    (np.r_[np.ones(9), -1.0], "weights must be >= 0"),
    (np.zeros(10), "weights are all zero"),
    (np.array(["a"] * 10), "weights must be numeric"),
    (np.ones(10, dtype=bool), "weights must be numeric"),
])
def test_bad_weights(weights, match):
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=match):
        balanced_kmeans(x, 2, weights=weights)
    with pytest.raises(ValueError, match=match):
        weighted_balanced_assignment(np.random.default_rng(0).random((10, 2)), weights)


def test_weighted_assignment_other_errors():
    with pytest.raises(ValueError, match="num_clusters=3 is larger"):
        weighted_balanced_assignment(np.zeros((2, 3)), [1, 2])
    with pytest.raises(ValueError, match="method must be"):
        weighted_balanced_assignment(np.zeros((4, 2)), [1, 2, 3, 4], method="greedy")
    with pytest.raises(ValueError, match="cost contains NaN"):
        weighted_balanced_assignment(np.full((4, 2), np.nan), [1, 2, 3, 4])
