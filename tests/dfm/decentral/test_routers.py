"""Routers: Bayes filter (THEORY S9), centroid top-k (S12, S13), temperature fit, learned router (S10)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

from dfm.decentral import (BayesFilterRouter, CentroidRouter, LearnedRouter, Partition, apply_threshold,
                           centroid_weights, fit_centroid_router, fit_temperature, oracle_weights, top_k,
                           train_learned_router, uniform_weights)
from dfm.models import DecoderConfig
from dfm.schedules import LinearScheduler, discretize
from dfm.train import TrainConfig

def centroid_weights_reference(cosines, temperature, top_k=None, threshold=None):
    """Independent float64 numpy reference: softmax(cos / T), keep the top-k cosines (stable order:
    lower index on ties), renormalize, drop weights under the threshold (keeping the largest)."""
    z = cosines / temperature
    w = np.exp(z - z.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    if top_k is not None and top_k < w.shape[1]:
        keep = np.zeros_like(w, dtype=bool)
        np.put_along_axis(keep, np.argsort(-cosines, axis=1, kind="stable")[:, :top_k], True, axis=1)
        w = np.where(keep, w, 0.0)
        w /= w.sum(axis=1, keepdims=True)
    if threshold is not None:
        keep = w >= threshold
        keep[np.arange(w.shape[0]), np.argmax(w, axis=1)] = True
        w = np.where(keep, w, 0.0)
        w /= w.sum(axis=1, keepdims=True)
    return w


weights_rows = st.integers(1, 6).flatmap(lambda k: st.lists(
    st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k).filter(lambda r: sum(r) > 1e-3),
    min_size=1, max_size=5))


def _partition(seed, k=5, dim=6):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return Partition(centroids=c, mean=None, config={"algorithm": "test"}, sizes=np.ones(k, np.int64))


@given(rows=weights_rows, data=st.data())
def test_top_k_keeps_k_largest_and_renormalizes(rows, data):
    w = np.asarray(rows, dtype=np.float64)
    w /= w.sum(axis=1, keepdims=True)
    k = data.draw(st.integers(1, w.shape[1]))
    out = np.asarray(top_k(jnp.asarray(w, jnp.float32), k), np.float64)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert ((out > 0).sum(axis=1) <= k).all()
    for row_in, row_out in zip(w, out):
        kept = np.argsort(-row_in, kind="stable")[:k]  # ties: lower index first
        expected = np.zeros_like(row_in)
        expected[kept] = row_in[kept] / row_in[kept].sum()
        np.testing.assert_allclose(row_out, expected, atol=1e-5)


def test_top_k_ties_are_deterministic():
    w = jnp.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])
    np.testing.assert_allclose(top_k(w, 2), [[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]])
    np.testing.assert_allclose(top_k(w, 1), [[1, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="k=5 is larger than the number of experts"):
        top_k(w, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(w, 0)


def test_threshold_uniform_oracle():
    w = jnp.array([[0.5, 0.3, 0.15, 0.05], [0.4, 0.35, 0.25, 0.0]])
    np.testing.assert_allclose(apply_threshold(w, 0.2), [[0.625, 0.375, 0, 0], [0.4, 0.35, 0.25, 0]], atol=1e-6)
    np.testing.assert_allclose(apply_threshold(w, 0.9), [[1, 0, 0, 0], [1, 0, 0, 0]])  # largest kept
    np.testing.assert_allclose(uniform_weights(3, 4), np.full((3, 4), 0.25))
    np.testing.assert_array_equal(oracle_weights(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="labels must be integers in \\[0, 3\\)"):
        oracle_weights(np.array([3]), 3)
    with pytest.raises(ValueError, match="threshold must be in"):
        apply_threshold(w, 1.5)


@given(seed=st.integers(0, 2**16), k=st.integers(1, 6), steps=st.integers(1, 8))
def test_bayes_filter_online_equals_batch_posterior(seed, k, steps):
    rng = np.random.default_rng(seed)
    priors = rng.dirichlet(np.ones(k))
    router = BayesFilterRouter.from_priors(priors)
    lp = np.log(rng.dirichlet(np.ones(5), size=(steps, k, 3))[..., 0])  # [steps, K, batch]
    with jax.enable_x64(True):
        r64 = BayesFilterRouter(jnp.asarray(np.log(priors)))
        state = r64.init(3)
        for s in range(steps):
            state = r64.update(state, jnp.asarray(lp[s]))
        online = np.asarray(r64.weights(state))
        batch = np.asarray(r64.posterior(jnp.asarray(lp.sum(axis=0).T)))
        exact = priors * np.exp(lp.sum(axis=0).T)
        exact /= exact.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(online, batch, atol=1e-12)
        np.testing.assert_allclose(online, exact, atol=1e-12)
        np.testing.assert_allclose(online.sum(axis=1), 1.0, atol=1e-12)
        # [batch, K] layout gives the same update
        s2 = r64.update(r64.init(3), jnp.asarray(lp[0].T), expert_axis=1)
        np.testing.assert_allclose(r64.weights(s2), r64.weights(r64.update(r64.init(3), jnp.asarray(lp[0]))))
    # float32 agrees to float32 rounding
    state32 = router.init(3)
    for s in range(steps):
        state32 = router.update(state32, jnp.asarray(lp[s], jnp.float32))
    np.testing.assert_allclose(router.weights(state32), online, atol=1e-4)


def test_bayes_filter_in_jit_and_scan():
    rng = np.random.default_rng(0)
    router = BayesFilterRouter.from_priors([0.5, 0.3, 0.2])
    lp = jnp.asarray(np.log(rng.dirichlet(np.ones(4), size=(7, 3, 2))[..., 0]), jnp.float32)

    @jax.jit
    def run(r, lp):
        final, _ = jax.lax.scan(lambda s, x: (r.update(s, x), None), r.init(2), lp)
        return r.weights(final)

    np.testing.assert_allclose(run(router, lp), router.posterior(lp.sum(axis=0).T), atol=1e-5)


@given(seed=st.integers(0, 2**16))
def test_permuting_experts_permutes_weights(seed):
    rng = np.random.default_rng(seed)
    k = 4
    perm = rng.permutation(k)
    priors = rng.dirichlet(np.ones(k))
    ll = jnp.asarray(rng.normal(size=(3, k)), jnp.float32)
    w = BayesFilterRouter.from_priors(priors).posterior(ll)
    wp = BayesFilterRouter.from_priors(priors[perm]).posterior(ll[:, perm])
    np.testing.assert_allclose(wp, w[:, perm], atol=1e-6)
    part = _partition(seed % 97, k=k)
    feats = rng.normal(size=(6, part.dim))
    router = CentroidRouter(part, temperature=0.3, top_k=2)
    permuted = CentroidRouter(Partition(part.centroids[perm], None, {}, part.sizes[perm]), 0.3, top_k=2)
    np.testing.assert_allclose(permuted.route(feats), router.route(feats)[:, perm], atol=1e-6)


@given(seed=st.integers(0, 2**16), temperature=st.floats(0.01, 10.0), k=st.integers(1, 5))
def test_centroid_router_weights_sum_to_one(seed, temperature, k):
    part = _partition(seed % 101)
    feats = np.random.default_rng(seed).normal(size=(4, part.dim))
    w = np.asarray(CentroidRouter(part, temperature, top_k=k, threshold=0.1).route(feats))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert ((w > 0).sum(axis=1) <= k).all() and (w >= 0).all()
    cos = part.cosine(feats)
    with jax.enable_x64(True):
        np.testing.assert_allclose(centroid_weights(jnp.asarray(cos), temperature, k, 0.1),
                                   centroid_weights_reference(cos, temperature, k, 0.1), atol=1e-12)


def test_centroid_router_on_centroids_small_temperature_is_top1():
    part = _partition(0, k=6)
    w = np.asarray(CentroidRouter(part, temperature=1e-3).route(part.centroids * 3.0))
    np.testing.assert_array_equal(np.argmax(w, axis=1), np.arange(6))
    np.testing.assert_allclose(w, np.eye(6), atol=1e-6)
    # top-1 equals nearest-centroid assignment at any temperature (THEORY S12)
    feats = np.random.default_rng(1).normal(size=(20, part.dim))
    w1 = np.asarray(CentroidRouter(part, temperature=5.0, top_k=1).route(feats))
    np.testing.assert_allclose(w1, np.eye(6)[np.argmax(part.cosine(feats), axis=1)], atol=1e-6)


def test_centroid_router_applies_partition_mean():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=4) * 0.1
    c = rng.normal(size=(3, 4))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    part = Partition(c, mean, {}, np.ones(3, np.int64))
    feats = rng.normal(size=(5, 4))
    z = feats / np.linalg.norm(feats, axis=1, keepdims=True) - mean
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    with jax.enable_x64(True):
        w = CentroidRouter(part, 0.5).route(feats)
        e = np.exp(z @ c.T / 0.5)
        np.testing.assert_allclose(w, e / e.sum(axis=1, keepdims=True), atol=1e-12)


def test_fit_temperature_recovers_generating_temperature():
    """Labels drawn from rho(T*=0.2) with one-hot expert likelihoods: the mixture likelihood is
    the labels' log-likelihood, whose maximizer is consistent; with N = 4000 it is within 10%."""
    rng = np.random.default_rng(0)
    part = _partition(3, k=6, dim=8)
    feats = rng.normal(size=(4000, 8))
    cos = part.cosine(feats)
    true_t = 0.2
    rho = centroid_weights_reference(cos, true_t)
    labels = (rho.cumsum(axis=1) > rng.random((4000, 1))).argmax(axis=1)
    ll = np.where(np.eye(6, dtype=bool)[labels], 0.0, -np.inf)
    fitted = fit_centroid_router(CentroidRouter(part, temperature=1.0), feats, ll)
    assert abs(np.log(fitted.temperature / true_t)) < 0.1, fitted.temperature
    # soft expert likelihoods (true expert 0.9, others share 0.1) still move T towards T*
    soft = np.where(np.eye(6, dtype=bool)[labels], np.log(0.9), np.log(0.02))
    t_soft = fit_temperature(cos, soft)
    assert 0.05 < t_soft < 0.5


def test_fit_temperature_bad_inputs():
    cos = np.zeros((3, 2))
    with pytest.raises(ValueError, match="expert_loglik has shape"):
        fit_temperature(cos, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="every expert has log-likelihood -inf"):
        fit_temperature(cos, np.full((3, 2), -np.inf))
    with pytest.raises(ValueError, match="expert_loglik contains NaN"):
        fit_temperature(cos, np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="bounds must satisfy"):
        fit_temperature(cos, np.zeros((3, 2)), bounds=(1.0, 0.5))


def test_router_bad_inputs():
    part = _partition(0, k=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        CentroidRouter(part, temperature=0.0)
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        CentroidRouter(part, top_k=4)
    with pytest.raises(ValueError, match="features has dimension 2"):
        CentroidRouter(part).route(np.ones((1, 2)))
    with pytest.raises(ValueError, match="features has zero-norm rows"):
        CentroidRouter(part).route(np.zeros((1, part.dim)))
    with pytest.raises(ValueError, match="log_priors must not contain NaN"):
        BayesFilterRouter(jnp.array([0.0, jnp.nan]))
    with pytest.raises(ValueError, match="priors must be a 1-D array"):
        BayesFilterRouter.from_priors([0.5, -0.1])
    router = BayesFilterRouter.from_priors([0.5, 0.5])
    with pytest.raises(ValueError, match="incompatible with state"):
        router.update(router.init(3), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="prefix_logliks must have shape"):
        router.posterior(jnp.zeros((2, 3)))


def test_learned_router_recovers_posterior_on_noised_states():
    """Two clusters with disjoint token sets and priors 0.7 / 0.3 (THEORY S10): on the all-mask
    state the exact router is the prior; once a token is revealed it is one-hot."""
    vocab, length, mask_id = 4, 6, 4
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.3).astype(np.int64)
    x1 = rng.integers(0, 2, size=(2000, length)) + 2 * labels[:, None]
    schedule = discretize(LinearScheduler(), length, 6)
    config = DecoderConfig(vocab_size=vocab + 1, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2)
    router = LearnedRouter(config, 2, num_steps=schedule.num_steps, rngs=nnx.Rngs(0))
    result = train_learned_router(router, x1, labels, schedule, TrainConfig(steps=150, learning_rate=3e-3,
                                  warmup_steps=10, log_every=50), mask_id=mask_id, batch_size=64,
                                  progress=False)
    assert result.steps_done == 150
    all_mask = jnp.full((1, length), mask_id)
    w0 = np.asarray(router.weights(None, all_mask, jnp.zeros((1,))))
    np.testing.assert_allclose(w0[0], [0.7, 0.3], atol=0.08)
    probe = np.full((4, length), mask_id)
    probe[:, 2] = [0, 1, 2, 3]
    w = np.asarray(router.weights(None, jnp.asarray(probe), jnp.full((4,), 3)))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert (w[:2, 0] > 0.9).all() and (w[2:, 1] > 0.9).all(), w
    with pytest.raises(ValueError, match="labels must be integers in \\[0, 2\\)"):
        train_learned_router(router, x1, labels + 1, schedule, TrainConfig(steps=1), mask_id=mask_id,
                             batch_size=4)


def test_router_interface_subset_top_k_and_context_without_type_checks():
    """`needs_context`, `uses_evidence`, `subset` and `with_top_k` let callers pick experts without
    knowing the router's type; each restriction is checked against a NumPy computation."""
    from dfm.decentral import FixedRouter

    part = Partition(np.eye(3, 4), None, {}, np.array([1, 2, 3]))
    centroid = CentroidRouter(part, temperature=0.5, top_k=2)
    bayes = BayesFilterRouter.from_priors([0.2, 0.3, 0.5])
    fixed = FixedRouter(jnp.asarray([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]], jnp.float32))
    assert [r.needs_context for r in (centroid, bayes, fixed)] == [True, False, False]
    assert [r.uses_evidence for r in (centroid, bayes, fixed)] == [False, True, False]
    # Bayes filter over experts [2, 0]: the posterior of their mixture, priors renormalized
    sub = bayes.subset([2, 0])
    np.testing.assert_allclose(np.asarray(sub.weights(sub.init(1))), [[0.5 / 0.7, 0.2 / 0.7]], rtol=1e-6)
    # fixed weights: row 0 keeps its bits (nothing dropped), row 1 is renormalized over [0, 1]
    got = np.asarray(fixed.subset([0, 1]).table)
    assert got[0].tolist() == [0.25, 0.75]
    np.testing.assert_allclose(got[1], [2 / 3, 1 / 3], rtol=1e-6)
    # centroid: the subset's softmax over its cosines / T, top-k capped at its size
    feats = np.array([[0.9, 0.1, 0.3, 0.0], [0.0, 0.2, 1.0, 0.1]])
    cos = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    z = np.exp(cos[:, [0, 2]] / 0.5)
    np.testing.assert_allclose(np.asarray(centroid.subset([0, 2]).route(feats)), z / z.sum(1, keepdims=True), rtol=1e-5)
    assert centroid.with_top_k(1).top_k == 1 and centroid.with_top_k(None) is centroid
    assert bayes.with_top_k(1) is bayes and fixed.with_top_k(2) is fixed
    with pytest.raises(ValueError, match=r"^experts: expected distinct indices in \[0, 3\), got \[0, 0\]$"):
        bayes.subset([0, 0])
    with pytest.raises(NotImplementedError, match=r"^LearnedRouter.subset: this router cannot be restricted"):
        LearnedRouter(DecoderConfig(vocab_size=5, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                                    causal=False), 3, rngs=nnx.Rngs(0)).subset([0])
