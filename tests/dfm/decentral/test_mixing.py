"""Teacher-forced mixture scoring (`dfm.decentral.mixture_token_log_probs`, THEORY S8 / S9) against
independent numpy references, in float64; the router interface's routers inside it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.special import logsumexp

from dfm.decentral import (BayesFilterRouter, CallableRouter, CentroidRouter, FixedRouter, Partition,
                           mixture_token_log_probs)


def _lp(rng, k, n, length):
    return np.log(rng.uniform(0.02, 1.0, (k, n, length)))


@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), n=st.integers(1, 3), length=st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_fixed_weights_mix_token_probabilities(seed, k, n, length):
    rng = np.random.default_rng(seed)
    lp = _lp(rng, k, n, length)
    w = rng.dirichlet(np.ones(k), n)
    with jax.enable_x64(True):
        out = mixture_token_log_probs(FixedRouter(jnp.asarray(w)), jnp.asarray(lp))
        got, weights = np.asarray(out.log_probs), np.asarray(out.weights)
    np.testing.assert_allclose(got, np.log(np.einsum("nk,knt->nt", w, np.exp(lp))), rtol=1e-12)
    np.testing.assert_allclose(weights, np.broadcast_to(w[:, None, :], (n, length, k)), rtol=1e-12)


@given(seed=st.integers(0, 2**16), k=st.integers(2, 4), length=st.integers(1, 7))
@settings(max_examples=40, deadline=None)
def test_bayes_filter_telescopes_to_the_mixture_of_sequence_likelihoods(seed, k, length):
    """THEORY S9: the product of the filtered per-token mixtures is sum_k w_k q_k(sequence); the
    weights before token j are w_k q_k(x^{<j}) / sum; padding adds no evidence."""
    rng = np.random.default_rng(seed)
    n = 4
    lp = _lp(rng, k, n, length)
    priors = rng.dirichlet(np.ones(k))
    valid = np.ones((n, length), bool)
    valid[0, length // 2:] = False                                           # row 0 padded after half
    with jax.enable_x64(True):
        router = BayesFilterRouter.from_priors(priors)
        out = mixture_token_log_probs(router, jnp.asarray(lp), valid=jnp.asarray(valid))
        got, weights, final = np.asarray(out.log_probs), np.asarray(out.weights), np.asarray(router.weights(out.final_state))
    for i in range(n):
        m = valid[i]
        want = logsumexp(np.log(priors) + lp[:, i, m].sum(axis=1))
        np.testing.assert_allclose(got[i, m].sum(), want, rtol=1e-12, atol=1e-12)
        for j in range(length):
            prefix = lp[:, i, :j][:, m[:j]].sum(axis=1)
            post = np.exp(np.log(priors) + prefix - logsumexp(np.log(priors) + prefix))
            np.testing.assert_allclose(weights[i, j], post, atol=1e-12)
        post_all = np.exp(np.log(priors) + lp[:, i, m].sum(axis=1) - want)
        np.testing.assert_allclose(final[i], post_all, atol=1e-12)


def test_initial_state_and_top_k():
    rng = np.random.default_rng(3)
    lp = _lp(rng, 3, 2, 5)
    log_prior = np.log(rng.dirichlet(np.ones(3), 2)) + rng.normal(size=(2, 3))   # per-row start (e.g. a question)
    with jax.enable_x64(True):
        router = BayesFilterRouter.from_priors(np.ones(3) / 3)
        out = mixture_token_log_probs(router, jnp.asarray(lp), state=jnp.asarray(log_prior))
        total = np.asarray(out.log_probs).sum(axis=1)
        post = log_prior - logsumexp(log_prior, axis=1, keepdims=True)
        np.testing.assert_allclose(total, logsumexp(post.T + lp.sum(axis=2), axis=0), rtol=1e-12)
        w = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
        top1 = np.asarray(mixture_token_log_probs(FixedRouter(jnp.asarray(w)), jnp.asarray(lp), top_k=1).log_probs)
        np.testing.assert_allclose(top1, np.stack([lp[0, 0], lp[2, 1]]), rtol=1e-12)


def test_centroid_router_uses_the_context_features():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(3, 4))
    part = Partition(c / np.linalg.norm(c, axis=1, keepdims=True), None, {}, np.ones(3, np.int64))
    router = CentroidRouter(part, temperature=0.5, top_k=2)
    feats = rng.normal(size=(2, 4))
    lp = _lp(rng, 3, 2, 4)
    with jax.enable_x64(True):
        out = mixture_token_log_probs(router, jnp.asarray(lp), context=feats)
        w = np.asarray(router.route(feats))
        np.testing.assert_allclose(np.asarray(out.weights)[:, 0], w, atol=1e-12)
        np.testing.assert_allclose(np.asarray(out.log_probs), np.log(np.einsum("nk,knt->nt", w, np.exp(lp))),
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="context: the centroid router needs conditioning features"):
        mixture_token_log_probs(router, jnp.asarray(lp))


def test_bad_inputs_are_named():
    lp = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"expert_log_probs must be \[K, batch, length\]"):
        mixture_token_log_probs(FixedRouter(jnp.full((3, 2), 0.5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="router has 3 experts but there are 2"):
        mixture_token_log_probs(FixedRouter(jnp.full((3, 3), 1 / 3)), lp)
    with pytest.raises(ValueError, match="router: expected a router"):
        mixture_token_log_probs(np.full((3, 2), 0.5), lp)
    with pytest.raises(ValueError, match=r"valid must have shape"):
        mixture_token_log_probs(FixedRouter(jnp.full((3, 2), 0.5)), lp, valid=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match="x_t: a CallableRouter needs the noised state"):
        mixture_token_log_probs(CallableRouter(lambda x, t: None, 2), lp)
    with pytest.raises(ValueError, match="table rows must sum to 1"):
        FixedRouter(jnp.full((3, 2), 0.4))


def test_a_float32_router_scores_float64_log_probs():
    """A router built without x64 (float32 log-priors) scores float64 evidence under x64: the state
    follows the evidence's dtype."""
    rng = np.random.default_rng(5)
    lp = _lp(rng, 2, 3, 4)
    priors = np.array([0.3, 0.7])
    router = BayesFilterRouter.from_priors(priors)                      # float32 state
    with jax.enable_x64(True):
        out = mixture_token_log_probs(router, jnp.asarray(lp))
        total = np.asarray(out.log_probs).sum(axis=1)
    assert out.log_probs.dtype == jnp.float64
    np.testing.assert_allclose(total, logsumexp(np.log(priors)[:, None] + lp.sum(axis=2), axis=0), rtol=1e-6)
