"""A lost expert (`available=`): the ensemble never calls it, the router's weights are renormalized
over the available experts before top-k, and the Bayes filter over the available experts is the
exact posterior of their mixture (THEORY S9) -- all against independent numpy computations."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from dfm.decentral import (BayesFilterRouter, CallableRouter, FixedRouter, ensemble_init_state,
                           ensemble_posterior_fn, mixture_token_log_probs, oracle_weights)
from dfm.decentral.mixing import available_mask, available_weights
from dfm.paths import mask_source
from dfm.samplers import sample_discrete
from dfm.schedules import autoregressive

K, V, L, B = 3, 4, 3, 2


# ------------------------------------------------------------------ the `available` argument
@pytest.mark.parametrize("available, mask", [([True, False, True], [1, 0, 1]), ([2, 0], [1, 0, 1]),
                                             (np.array([1]), [0, 1, 0]), (jnp.asarray([0, 1, 2]), [1, 1, 1])])
def test_available_mask_accepts_masks_and_indices(available, mask):
    np.testing.assert_array_equal(available_mask(available, K), np.asarray(mask, bool))
    assert available_mask(None, K) is None


@pytest.mark.parametrize("available, message", [
    ([True, False], "bool mask of length 2"), ([0, 3], r"indices must lie in \[0, 3\)"),
    ([-1], r"indices must lie in \[0, 3\)"), ([1, 1], "repeated"), ([], "empty selection"),
    ([False, False, False], "empty selection"), ([0.5, 1.0], "dtype float64"), ([[0, 1]], "shape")])
def test_bad_available_is_named(available, message):
    with pytest.raises(ValueError, match=r"^available: .*" + message):
        available_mask(available, K)
    with pytest.raises(ValueError, match=r"^available: .*" + message):
        mixture_token_log_probs(FixedRouter(np.full((1, K), 1 / K)), np.zeros((K, 1, 2)), available=available)


def test_traced_available_is_refused():
    with pytest.raises(ValueError, match="available: must be concrete"):
        jax.jit(lambda a: available_mask(a, K))(jnp.ones(K, bool))


# ------------------------------------------------------------------ teacher-forced scoring
def test_fixed_weights_renormalized_over_available_before_top_k_float64():
    rng = np.random.default_rng(0)
    n, length = 4, 5
    lp = np.log(rng.uniform(0.05, 1.0, (K, n, length)))
    w = rng.dirichlet(np.ones(K), n)
    mask = np.array([True, False, True])
    lp_given = lp.copy()
    lp_given[1] = np.nan                                          # the missing expert's rows: anything
    restricted = w * mask / (w * mask).sum(1, keepdims=True)
    with jax.enable_x64(True):
        out = mixture_token_log_probs(FixedRouter(jnp.asarray(w)), jnp.asarray(lp_given), available=[0, 2])
        top1 = mixture_token_log_probs(FixedRouter(jnp.asarray(w)), jnp.asarray(lp_given), available=mask,
                                       top_k=1)
    assert out.missing == (1,) and top1.missing == (1,)
    np.testing.assert_allclose(np.asarray(out.weights), np.broadcast_to(restricted[:, None], (n, length, K)),
                               rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out.log_probs), np.log(np.einsum("nk,knt->nt", restricted, np.exp(lp))),
                               rtol=1e-12)
    best = np.where(w[:, 0] >= w[:, 2], 0, 2)                     # top-1 among the available experts
    np.testing.assert_allclose(np.asarray(top1.log_probs), lp[best, np.arange(n)], rtol=1e-12)


@pytest.mark.parametrize("missing", [(0,), (2,), (0, 3)])
def test_bayes_filter_over_available_is_the_exact_posterior_of_their_mixture(missing):
    """THEORY S9 for the available experts: weights before token j are w_k q_k(x^{<j}) renormalized
    over them, and the per-token mixtures telescope to log sum_{k avail} w_k q_k(x)."""
    rng = np.random.default_rng(len(missing) + missing[0])
    k, n, length = 4, 3, 6
    lp = np.log(rng.uniform(0.02, 1.0, (k, n, length)))
    priors = rng.dirichlet(np.ones(k))
    mask = np.ones(k, bool)
    mask[list(missing)] = False
    given = np.where(mask[:, None, None], lp, 0.0)                # zeros in the missing rows
    with jax.enable_x64(True):
        router = BayesFilterRouter.from_priors(priors)
        out = mixture_token_log_probs(router, jnp.asarray(given), available=mask)
        final = np.asarray(available_weights(router, out.final_state, None, None, mask)[0])
    assert out.missing == missing
    avail = np.flatnonzero(mask)
    prefix = np.concatenate([np.zeros((k, n, 1)), np.cumsum(lp, axis=2)], axis=2)   # log q_k(x^{<j})
    want_w = np.zeros((n, length + 1, k))
    want_w[..., avail] = softmax(np.log(priors[avail])[None, None] + np.moveaxis(prefix[avail], 0, -1), axis=-1)
    np.testing.assert_allclose(np.asarray(out.weights), want_w[:, :length], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(final, want_w[:, length], rtol=1e-10, atol=1e-14)
    want_lp = logsumexp(np.log(want_w[:, :length, avail]) + np.moveaxis(lp[avail], 0, -1), axis=-1)
    np.testing.assert_allclose(np.asarray(out.log_probs), want_lp, rtol=1e-10)
    total = logsumexp(np.log(priors[avail] / priors[avail].sum())[:, None] + lp[avail].sum(axis=2), axis=0)
    np.testing.assert_allclose(np.asarray(out.log_probs).sum(axis=1), total, rtol=1e-10)


def test_bayes_filter_restriction_does_not_underflow_in_float32():
    """A missing expert with a large prior and no evidence keeps most of the filter's mass; the
    available experts' probabilities underflow (exp(-300) = 0 in float32), their log-weights do not."""
    length = 60
    lp = np.zeros((3, 1, length), np.float32)
    lp[1], lp[2] = -5.0, -5.02
    priors = np.array([0.9, 0.05, 0.05])
    out = mixture_token_log_probs(BayesFilterRouter.from_priors(priors), jnp.asarray(lp), available=[1, 2])
    gap = 0.02 * np.arange(length)                               # log q_1(prefix) - log q_2(prefix)
    want = np.stack([np.zeros(length), 1 / (1 + np.exp(-gap)), 1 / (1 + np.exp(gap))], axis=-1)
    np.testing.assert_allclose(np.asarray(out.weights[0]), want, rtol=2e-4, atol=1e-7)


def test_row_without_available_weight_raises_eager_and_is_uniform_under_jit():
    rng = np.random.default_rng(2)
    lp = np.log(rng.uniform(0.05, 1.0, (K, B, 4))).astype(np.float32)
    router = FixedRouter(oracle_weights(np.array([1, 0]), K))      # row 0: all weight on missing expert 1
    with pytest.raises(ValueError, match=re.escape("available: 4 router weight rows give no weight to any "
                                                   "available expert (first at index (0, 0))")):
        mixture_token_log_probs(router, jnp.asarray(lp), available=[0, 2])
    out = jax.jit(lambda x: mixture_token_log_probs(router, x, available=[0, 2]))(jnp.asarray(lp))
    np.testing.assert_allclose(np.asarray(out.weights[0]), np.tile([0.5, 0.0, 0.5], (4, 1)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.weights[1]), np.tile([1.0, 0.0, 0.0], (4, 1)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.log_probs[0]), np.log(np.exp(lp[[0, 2], 0]).mean(0)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.log_probs[1]), lp[0, 1], rtol=1e-6)


def test_all_available_is_exactly_none():
    rng = np.random.default_rng(3)
    lp = jnp.asarray(np.log(rng.uniform(0.05, 1.0, (K, B, 5))).astype(np.float32))
    for router in (FixedRouter(jnp.asarray(rng.dirichlet(np.ones(K), B), jnp.float32)),
                   BayesFilterRouter.from_priors([0.2, 0.3, 0.5])):
        plain = mixture_token_log_probs(router, lp, top_k=2)
        full = mixture_token_log_probs(router, lp, top_k=2, available=[0, 1, 2])
        assert plain.missing == () and full.missing == ()
        np.testing.assert_array_equal(np.asarray(plain.log_probs), np.asarray(full.log_probs))
        np.testing.assert_array_equal(np.asarray(plain.weights), np.asarray(full.weights))


# ------------------------------------------------------------------ the ensemble in the sampler
TABLES = np.random.default_rng(5).normal(size=(K, L, V)) * 2.0   # expert k: logits per position, any prefix


def expert(k, *, forbidden=False):
    def fn(x_t, t, positions, state):
        if forbidden:
            raise AssertionError(f"expert {k} is not available and must not be called")
        logits = jnp.take(jnp.asarray(TABLES[k]), jnp.asarray(positions), axis=0)
        return jnp.broadcast_to(logits[None], (x_t.shape[0],) + logits.shape), state
    return fn


def test_bayes_ensemble_never_calls_a_missing_expert_and_mixes_the_exact_posterior():
    priors = np.array([0.5, 0.3, 0.2])
    mask = np.array([False, True, True])
    fns = [expert(0, forbidden=True), expert(1), expert(2)]
    tokens = np.array([[1, 3, 0], [2, 2, 1]])
    p = softmax(TABLES, axis=-1)                                   # [K, L, V]
    with jax.enable_x64(True):
        router = BayesFilterRouter.from_priors(priors)
        fn = ensemble_posterior_fn(fns, router, mask_id=V, available=mask)
        assert fn.missing == (0,)
        state = ensemble_init_state(router, [None] * K, batch=B, num_moving=1, vocab=V, dtype=jnp.float64)
        x = np.full((B, L), V)
        for j in range(L):
            out, state = fn(jnp.asarray(x), j, np.array([j], np.int32), state)
            log_prefix = np.log(p[:, np.arange(j)[None, :], tokens[:, :j]]).sum(-1)      # [K, B]
            rho = softmax(np.log(priors[1:, None]) + log_prefix[1:], axis=0)         # [2, B]
            want = np.log(np.einsum("kb,kv->bv", rho, p[1:, j]))
            np.testing.assert_allclose(np.asarray(out[:, 0]), want, rtol=1e-12)
            x[:, j] = tokens[:, j]
        # inside the sampler's scan: same samples as the ensemble of the two available experts alone
        sub_router = BayesFilterRouter.from_priors(priors[1:] / priors[1:].sum())
        sub = ensemble_posterior_fn(fns[1:], sub_router, mask_id=V)
        x0 = mask_source((8, L), V)

        def sample(f, r, num):
            state0 = ensemble_init_state(r, [None] * num, batch=8, num_moving=1, vocab=V, dtype=jnp.float64)
            return np.asarray(sample_discrete(jax.random.PRNGKey(7), f, autoregressive(L), x0, mask_id=V,
                                              state=state0))

        a, b = sample(fn, router, K), sample(sub, sub_router, 2)
    np.testing.assert_array_equal(a, b)


def test_top_k_picks_among_the_available_and_only_they_are_called():
    table = np.array([[0.5, 0.3, 0.2]])
    fns = [expert(0, forbidden=True), expert(1), expert(2, forbidden=True)]
    fn = ensemble_posterior_fn(fns, FixedRouter(jnp.asarray(table, jnp.float32)), top_k=1, available=[1, 2])
    assert fn.missing == (0,)
    out, _ = fn(jnp.zeros((1, L), jnp.int32), 0, np.arange(L, dtype=np.int32),
                ensemble_init_state(FixedRouter(table), [None] * K, batch=1, num_moving=L, vocab=V))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(jax.nn.log_softmax(TABLES[1], axis=-1)), atol=1e-6)
    assert ensemble_posterior_fn(fns[1:2] * K, FixedRouter(table)).missing == ()


def test_missing_positions_may_hold_none_but_available_ones_may_not():
    table = np.full((1, K), 1 / K)
    fn = ensemble_posterior_fn([None, expert(1), expert(2)], FixedRouter(table), available=[1, 2])
    out, _ = fn(jnp.zeros((1, L), jnp.int32), 0, np.arange(L, dtype=np.int32),
                ensemble_init_state(FixedRouter(table), [None] * K, batch=1, num_moving=L, vocab=V))
    want = np.log(softmax(TABLES[1:], axis=-1).mean(0))
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=1e-6)
    with pytest.raises(ValueError, match=r"expert_posterior_fns\[0\]: expert 0 is available"):
        ensemble_posterior_fn([None, expert(1), expert(2)], FixedRouter(table), available=[0, 1])


def test_ensemble_row_without_available_weight():
    """Concrete weights (a FixedRouter table, an eager call) raise; traced weights (jit) fall back to
    uniform weights over the available experts."""
    fns = [expert(0), expert(1), expert(2)]
    with pytest.raises(ValueError, match=r"available: 1 router weight rows give no weight .* index \(0,\)"):
        ensemble_posterior_fn(fns, FixedRouter(oracle_weights(np.array([1, 0]), K)), available=[0, 2])
    router = CallableRouter(lambda x_t, t: oracle_weights(np.array([1, 2]), K), K)
    fn = ensemble_posterior_fn(fns, router, available=[0, 2])
    state = ensemble_init_state(router, [None] * K, batch=B, num_moving=L, vocab=V)
    positions = np.arange(L, dtype=np.int32)
    x = jnp.zeros((B, L), jnp.int32)
    with pytest.raises(ValueError, match=r"available: 1 router weight rows .* index \(0,\)"):
        fn(x, 0, positions, state)
    out, _ = jax.jit(lambda x_t: fn(x_t, 0, positions, state))(x)
    p = softmax(TABLES, axis=-1)
    np.testing.assert_allclose(np.asarray(out[0]), np.log((p[0] + p[2]) / 2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out[1]), np.log(p[2]), atol=1e-6)
