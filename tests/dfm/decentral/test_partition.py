"""Balanced partitions (exact balance, optimality, recovery, determinism, save/load) and featurizers."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from sklearn.metrics import adjusted_rand_score

from dfm.decentral import (Partition, PrecomputedFeaturizer, TextFeaturizer, assign, assign_balanced,
                           balanced_assignment, balanced_kmeans, transport, two_stage_balanced_kmeans)
from dfm.decentral.partition import centroids_from_labels, spherical_features


def _planted(seed, k=4, per=30, dim=12, noise=0.15):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim))
    truth = np.repeat(np.arange(k), per)
    x = centers[truth] * 3.0 + rng.normal(size=(k * per, dim)) * noise * 3.0
    perm = rng.permutation(k * per)
    return x[perm], truth[perm]


def _assert_balanced(labels, n, k):
    sizes = np.bincount(labels, minlength=k)
    assert sizes.sum() == n and sizes.min() >= n // k and sizes.max() <= -(-n // k), sizes
    assert (sizes == -(-n // k)).sum() == (n % k if n % k else k)


@given(n=st.integers(1, 40), data=st.data())
def test_balanced_kmeans_exact_balance(n, data):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).normal(size=(n, 5))
    # one point minus the mean is the zero vector (a ValueError, tested below): no centring at n = 1
    part, labels = balanced_kmeans(x, k, rng=seed, max_iter=20, subtract_mean=n > 1)
    _assert_balanced(labels, n, k)
    np.testing.assert_array_equal(part.sizes, np.bincount(labels, minlength=k))
    np.testing.assert_allclose(np.linalg.norm(part.centroids, axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("n,k", [(7, 3), (9, 4), (9, 3), (7, 5), (6, 6)])
def test_balanced_assignment_is_optimal_against_brute_force(n, k):
    rng = np.random.default_rng(n * 10 + k)
    lo, hi = n // k, -(-n // k)
    combos = np.indices((k,) * n, dtype=np.int8).reshape(n, -1).T  # every labelling [k**n, n]
    sizes = np.stack([(combos == j).sum(axis=1) for j in range(k)], axis=1)
    feasible = combos[(sizes >= lo).all(axis=1) & (sizes <= hi).all(axis=1)]
    for _ in range(3):
        cost = rng.random((n, k))
        best = cost[np.arange(n), feasible].sum(axis=1).min()
        for method in ("lsa", "lp"):
            labels = balanced_assignment(cost, method=method)
            _assert_balanced(labels, n, k)
            assert cost[np.arange(n), labels].sum() == pytest.approx(best, abs=1e-9)


def test_lsa_and_lp_agree_on_larger_problem():
    rng = np.random.default_rng(0)
    cost = rng.random((503, 7))
    a = balanced_assignment(cost, method="lsa")
    b = balanced_assignment(cost, method="lp")
    _assert_balanced(a, 503, 7)
    _assert_balanced(b, 503, 7)
    assert cost[np.arange(503), a].sum() == pytest.approx(cost[np.arange(503), b].sum(), abs=1e-9)


def test_transport_respects_supplies_and_bounds():
    rng = np.random.default_rng(1)
    supply = rng.integers(1, 20, size=15)
    total = supply.sum()
    lo, hi = total // 4, -(-total // 4)
    flow = transport(rng.random((15, 4)), supply, np.full(4, lo), np.full(4, hi))
    np.testing.assert_array_equal(flow.sum(axis=1), supply)
    assert flow.sum(axis=0).min() >= lo and flow.sum(axis=0).max() <= hi
    assert (flow > 0).sum() <= 15 + 4 - 1  # a vertex of the transportation polytope


@pytest.mark.parametrize("seed", range(5))
def test_recovers_planted_clusters(seed):
    x, truth = _planted(seed)
    _, labels = balanced_kmeans(x, 4, rng=seed)
    assert adjusted_rand_score(truth, labels) == 1.0


@pytest.mark.parametrize("fine_algorithm", ["minibatch", "kmeans"])
def test_two_stage_balance_and_recovery(fine_algorithm):
    x, truth = _planted(3, k=4, per=50)
    part, labels = two_stage_balanced_kmeans(x, 4, num_fine=24, fine_algorithm=fine_algorithm, rng=0)
    _assert_balanced(labels, 200, 4)
    assert adjusted_rand_score(truth, labels) == 1.0
    # N not divisible by K: still exact balance in points
    x2 = np.random.default_rng(5).normal(size=(1003, 6))
    part2, labels2 = two_stage_balanced_kmeans(x2, 7, rng=1)
    _assert_balanced(labels2, 1003, 7)
    np.testing.assert_array_equal(part2.sizes, np.bincount(labels2, minlength=7))
    assert part2.config["algorithm"] == "two_stage_balanced_kmeans"


def test_seeded_determinism():
    x = np.random.default_rng(0).normal(size=(90, 8))
    p1, l1 = balanced_kmeans(x, 5, rng=3)
    p2, l2 = balanced_kmeans(x, 5, rng=3)
    p3, l3 = balanced_kmeans(x, 5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(l1, l3)
    np.testing.assert_array_equal(p1.centroids, p2.centroids)
    t1 = two_stage_balanced_kmeans(x, 5, num_fine=30, rng=4)[1]
    t2 = two_stage_balanced_kmeans(x, 5, num_fine=30, rng=4)[1]
    np.testing.assert_array_equal(t1, t2)
    # different seeds give different k-means++ starts (objective is a real number either way)
    assert p1.config["objective"] > 0


def test_objective_not_worse_with_more_restarts():
    x = np.random.default_rng(2).normal(size=(120, 6))
    one = balanced_kmeans(x, 6, rng=0, n_init=1)[0].config["objective"]
    five = balanced_kmeans(x, 6, rng=0, n_init=5)[0].config["objective"]
    assert five <= one + 1e-12


@pytest.mark.parametrize("subtract_mean", [True, False])
def test_save_load_round_trip(tmp_path, subtract_mean):
    x, _ = _planted(1)
    part, labels = balanced_kmeans(x, 4, rng=0, subtract_mean=subtract_mean)
    path = tmp_path / "sub" / "partition.npz"
    part.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["partition.npz"]  # no temp file left
    back = Partition.load(path)
    np.testing.assert_array_equal(back.centroids, part.centroids)
    np.testing.assert_array_equal(back.sizes, part.sizes)
    if subtract_mean:
        np.testing.assert_array_equal(back.mean, part.mean)
    else:
        assert back.mean is None
    assert back.config == part.config
    np.testing.assert_array_equal(assign(back, x), assign(part, x))


def test_assign_nearest_and_balanced():
    x, truth = _planted(2)
    part, labels = balanced_kmeans(x, 4, rng=0)
    np.testing.assert_array_equal(assign(part, x), labels)  # well separated: nearest == balanced
    # without centring, a (scaled) centroid is its own nearest centroid
    part_nomean, _ = balanced_kmeans(x, 4, rng=0, subtract_mean=False)
    np.testing.assert_array_equal(assign(part_nomean, part_nomean.centroids * 7.0), np.arange(4))
    new = np.random.default_rng(9).normal(size=(33, x.shape[1]))
    _assert_balanced(assign_balanced(part, new), 33, 4)


def test_spherical_features_maps_to_unit_sphere_and_centres():
    x = np.random.default_rng(0).normal(size=(50, 4)) + 3.0
    z = spherical_features(x, None)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0)
    mean = z.mean(axis=0)
    zc = spherical_features(x, mean)
    np.testing.assert_allclose(zc, (z - mean) / np.linalg.norm(z - mean, axis=1, keepdims=True))


def test_bad_inputs():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="num_clusters=11 is larger"):
        balanced_kmeans(x, 11)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="features contains NaN"):
        balanced_kmeans(bad, 2)
    zero = x.copy()
    zero[4] = 0.0
    with pytest.raises(ValueError, match=r"features has zero-norm rows \[4\]"):
        balanced_kmeans(zero, 2)
    with pytest.raises(ValueError, match=r"after subtracting the global mean\) has zero-norm"):
        balanced_kmeans(x[:1], 1)
    with pytest.raises(ValueError, match="features must be a 2-D"):
        balanced_kmeans(x[0], 2)
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        balanced_kmeans(x, 0)
    with pytest.raises(ValueError, match=r"labels leave cluster\(s\) \[2\] empty"):
        centroids_from_labels(x / np.linalg.norm(x, axis=1, keepdims=True), np.array([0, 1] * 5), 3)
    with pytest.raises(ValueError, match="num_fine must be in"):
        two_stage_balanced_kmeans(x, 4, num_fine=3)
    dup = np.repeat(x[:2], 5, axis=0)  # only 2 distinct points: at most 2 non-empty fine clusters
    with pytest.raises(ValueError, match="non-empty fine clusters"), pytest.warns(UserWarning):
        two_stage_balanced_kmeans(dup, 3, num_fine=6, fine_algorithm="kmeans")
    part, _ = balanced_kmeans(x, 2)
    with pytest.raises(ValueError, match="features has dimension 4, expected 3"):
        assign(part, np.ones((2, 4)))
    with pytest.raises(ValueError, match="fewer than the 2 clusters"):
        assign_balanced(part, np.ones((1, 3)))
    with pytest.raises(ValueError, match="method must be"):
        balanced_assignment(np.ones((3, 2)), method="greedy")
    with pytest.raises(ValueError, match="cost contains NaN"):
        balanced_assignment(np.full((3, 2), np.nan))


def test_duplicate_points_still_balanced():
    x = np.repeat(np.eye(3)[:2], 6, axis=0)  # two distinct directions, 12 points, K = 3
    _, labels = balanced_kmeans(x, 3, rng=0, subtract_mean=False)
    _assert_balanced(labels, 12, 3)


TOPICS = {
    "sport": "football match goal team player league score coach stadium season",
    "cooking": "recipe oven flour sugar butter bake dough kitchen salt pepper",
    "space": "rocket orbit planet telescope galaxy astronaut launch moon star nasa",
}


def _corpus(seed, per=20):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for lab, words in enumerate(TOPICS.values()):
        vocab = words.split()
        for _ in range(per):
            texts.append(" ".join(rng.choice(vocab, size=8)))
            labels.append(lab)
    return texts, np.array(labels)


def test_text_featurizer_partition_recovers_topics(tmp_path):
    texts, truth = _corpus(0)
    feat = TextFeaturizer(n_components=5, seed=0)
    z = feat.fit_transform(texts)
    assert z.shape == (60, 5) and z.dtype == np.float64
    _, labels = balanced_kmeans(z, 3, rng=0)
    assert adjusted_rand_score(truth, labels) == 1.0
    feat.save(tmp_path / "feat.pkl")
    back = TextFeaturizer.load(tmp_path / "feat.pkl")
    np.testing.assert_allclose(back.transform(texts[:7]), z[:7], atol=1e-12)


def test_text_featurizer_bad_inputs():
    with pytest.raises(ValueError, match="n_components=50 must be smaller"):
        TextFeaturizer(n_components=50).fit(["a rocket", "a moon"])
    with pytest.raises(ValueError, match="not fitted"):
        TextFeaturizer().transform(["x"])
    with pytest.raises(ValueError, match="texts is empty"):
        TextFeaturizer().fit([])
    with pytest.raises(ValueError, match="texts must contain only strings"):
        TextFeaturizer().fit(["ok", 3])


def test_precomputed_featurizer(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    f = PrecomputedFeaturizer().fit(x)
    np.testing.assert_array_equal(f.transform(x), x.astype(np.float64))
    with pytest.raises(ValueError, match="features has dimension 3, expected 4"):
        f.transform(x[:, :3])
    f.save(tmp_path / "f.pkl")
    assert PrecomputedFeaturizer.load(tmp_path / "f.pkl").dim == 4
    with pytest.raises(ValueError, match="not a TextFeaturizer"):
        TextFeaturizer.load(tmp_path / "f.pkl")


def test_subset_routes_among_the_remaining_clusters():
    """A centroid router on `Partition.subset` is the full router's softmax renormalised over the
    kept clusters, and its top-1 is the nearest kept centroid (a lost expert)."""
    from dfm.decentral import CentroidRouter

    rng = np.random.default_rng(0)
    c = rng.normal(size=(4, 5))
    part = Partition(c / np.linalg.norm(c, axis=1, keepdims=True), rng.normal(size=5) * 0.05, {}, np.arange(1, 5))
    feats = rng.normal(size=(7, 5))
    keep = [0, 2, 3]
    sub = part.subset(keep)
    full = np.asarray(CentroidRouter(part, 0.3).route(feats), np.float64)
    want = full[:, keep] / full[:, keep].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(CentroidRouter(sub, 0.3).route(feats)), want, atol=1e-6)
    top1 = np.asarray(CentroidRouter(sub, 0.3, top_k=1).route(feats))
    np.testing.assert_array_equal(np.argmax(top1, axis=1), np.argmax(part.cosine(feats)[:, keep], axis=1))
    np.testing.assert_array_equal(sub.sizes, [1, 3, 4])
    with pytest.raises(ValueError, match="clusters must be distinct indices"):
        part.subset([0, 0])
    with pytest.raises(ValueError, match="clusters must be distinct indices"):
        part.subset([4])
