"""Ensembles: probability mixing (exact, THEORY S8), logit mixing, and the ensemble PosteriorFn with
the Bayes-filter router (THEORY S9) checked against exact enumeration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from dfm.decentral import (BayesFilterRouter, CallableRouter, EnsembleState, ExpertSpec, FixedRouter,
                           check_compatible_experts, ensemble_init_state, ensemble_posterior_fn, mix_log_probs,
                           mix_logits, mix_probabilities, oracle_weights, top_k)
from dfm.decentral.ensemble import _revealed_evidence
from dfm.paths import mask_source
from dfm.samplers import sample_discrete
from dfm.schedules import autoregressive

# (K, batch, length, vocab); a few fixed shapes so that eager jax reuses its compiled kernels
shapes = st.sampled_from([(1, 1, 1, 2), (2, 3, 1, 4), (3, 2, 2, 5), (4, 3, 3, 6)])


def _random(seed, shape):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * 3.0
    weights = rng.dirichlet(np.ones(shape[0]), size=shape[1])
    return logits, weights


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_mix_log_probs_equals_numpy_mixture_float64(shape, seed):
    logits, weights = _random(seed, shape)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.log(np.einsum("bk,kblv->blv", weights, p))
    with jax.enable_x64(True):
        out = np.asarray(mix_log_probs(jnp.asarray(logits), jnp.asarray(weights)))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert mix_probabilities is mix_log_probs


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_mixing_identical_experts_is_identity(shape, seed):
    logits, weights = _random(seed, shape)
    same = np.broadcast_to(logits[:1], shape)
    with jax.enable_x64(True):
        ref = jax.nn.log_softmax(jnp.asarray(logits[0]), axis=-1)
        for mixer in (mix_log_probs, mix_logits):
            np.testing.assert_allclose(mixer(jnp.asarray(same), jnp.asarray(weights)), ref, atol=1e-12)
            np.testing.assert_allclose(mixer(jnp.asarray(same), jnp.asarray(weights), top_k=1), ref, atol=1e-12)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_one_hot_weights_select_the_expert(shape, seed):
    logits, _ = _random(seed, shape)
    chosen = np.random.default_rng(seed + 1).integers(0, shape[0], size=shape[1])
    with jax.enable_x64(True):
        w = oracle_weights(chosen, shape[0], dtype=jnp.float64)
        expected = jax.nn.log_softmax(jnp.asarray(logits[chosen, np.arange(shape[1])]), axis=-1)
        for mixer in (mix_log_probs, mix_logits):
            np.testing.assert_allclose(mixer(jnp.asarray(logits), w), expected, atol=1e-12)


def test_top_k_mixing_equals_mixing_top_k_weights_and_logit_mixing_differs():
    logits, weights = _random(0, (4, 3, 2, 5))
    for k in (1, 2, 4):
        np.testing.assert_allclose(mix_log_probs(jnp.asarray(logits), jnp.asarray(weights), top_k=k),
                                   mix_log_probs(jnp.asarray(logits), top_k(jnp.asarray(weights), k)), atol=1e-6)
    exact = np.asarray(mix_log_probs(jnp.asarray(logits), jnp.asarray(weights)))
    approx = np.asarray(mix_logits(jnp.asarray(logits), jnp.asarray(weights)))
    np.testing.assert_allclose(np.exp(approx).sum(-1), 1.0, atol=1e-5)
    assert np.abs(exact - approx).max() > 1e-2  # logit mixing is not the mixture


def test_mix_bad_inputs():
    logits, weights = _random(0, (2, 3, 1, 4))
    with pytest.raises(ValueError, match="weights has width 3 but there are 2 experts"):
        mix_log_probs(jnp.asarray(logits), jnp.ones((3, 3)) / 3)
    with pytest.raises(ValueError, match="weights has batch 2"):
        mix_log_probs(jnp.asarray(logits), jnp.ones((2, 2)) / 2)
    with pytest.raises(ValueError, match="weights rows must sum to 1"):
        mix_log_probs(jnp.asarray(logits), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="expert_logits must be"):
        mix_logits(jnp.ones((2, 4)), jnp.ones((2, 2)) / 2)


def test_expert_compatibility():
    check_compatible_experts([ExpertSpec(8, 8, "abc"), ExpertSpec(8, 8, "abc")])
    with pytest.raises(ValueError, match=r"experts\[1\].vocab_size=9 differs"):
        check_compatible_experts([ExpertSpec(8, 8), ExpertSpec(9, 8)])
    with pytest.raises(ValueError, match=r"experts\[2\].mask_id=9 differs"):
        check_compatible_experts([ExpertSpec(8, 8), ExpertSpec(8, 8), ExpertSpec(8, 9)])
    with pytest.raises(ValueError, match=r"experts\[1\].tokenizer_fingerprint='b' differs"):
        check_compatible_experts([ExpertSpec(8, 8, "a"), ExpertSpec(8, 8, "b")])
    with pytest.raises(ValueError, match="experts is empty"):
        check_compatible_experts([])


# ----------------------------------------------------------------------------- exact AR experts
V, L = 3, 3


def _exact_experts(seed, k=3):
    """K random joint distributions over [V]^L and, for each, a table of AR conditionals
    `cond[state, v] = q_k(x^t = v | x^{<t})` indexed by the mixed-radix index of the state
    `(x^{<t}, m, .., m)` (base V + 1)."""
    rng = np.random.default_rng(seed)
    joints = rng.dirichlet(np.ones(V**L) * 0.5, size=k).reshape((k,) + (V,) * L)
    tables = np.full((k, (V + 1) ** L, V), 1.0 / V)
    for t in range(L):
        marg = joints.sum(axis=tuple(range(t + 2, L + 1)))  # [k, V..(t+1 times)]
        for prefix in np.ndindex(*(V,) * t):
            state = list(prefix) + [V] * (L - t)
            idx = int(np.dot(state, (V + 1) ** np.arange(L - 1, -1, -1)))
            p = marg[(slice(None),) + prefix]  # [k, V]
            tables[:, idx] = p / p.sum(axis=1, keepdims=True)
    return joints, tables


def _table_fn(table):
    powers = jnp.asarray((V + 1) ** np.arange(L - 1, -1, -1))

    def fn(x_t, t, positions, state):
        idx = jnp.sum(x_t * powers, axis=1)
        return jnp.log(jnp.asarray(table)[idx])[:, None, :], state

    return fn


def _all_sequences():
    return np.stack(np.unravel_index(np.arange(V**L), (V,) * L), axis=1)


def test_bayes_ensemble_posterior_is_exact_mixture():
    """Teacher-forcing every sequence through the ensemble PosteriorFn gives log q(x) for
    q = sum_k w_k q_k exactly (THEORY S8, S9), in float64."""
    with jax.enable_x64(True):
        joints, tables = _exact_experts(0)
        priors = np.array([0.5, 0.3, 0.2])
        router = BayesFilterRouter.from_priors(priors)
        fn = ensemble_posterior_fn([_table_fn(tb) for tb in tables], router,
                                   experts=[ExpertSpec(V, V, "toy")] * 3)
        x1 = jnp.asarray(_all_sequences())
        state = ensemble_init_state(router, [None] * 3, batch=x1.shape[0], num_moving=1, vocab=V,
                                    dtype=jnp.float64)
        total = np.zeros(x1.shape[0])
        for t in range(L):
            x_t = jnp.where(jnp.arange(L)[None] < t, x1, V)
            logp, state = fn(x_t, t, jnp.array([t], jnp.int32), state)
            total += np.asarray(logp[:, 0][jnp.arange(x1.shape[0]), x1[:, t]])
        q = np.einsum("k,k...->...", priors, joints).reshape(-1)
        np.testing.assert_allclose(total, np.log(q), atol=1e-12)
        # a uniform-weight ensemble is the uniform mixture of the experts' conditionals, not q
        uniform = CallableRouter(lambda x, t: jnp.full((x.shape[0], 3), 1 / 3), 3)
        fn_u = ensemble_posterior_fn([_table_fn(tb) for tb in tables], uniform)
        st_u = ensemble_init_state(uniform, [None] * 3, batch=x1.shape[0], num_moving=1, vocab=V)
        assert isinstance(st_u, EnsembleState) and st_u.router_state is None
        x_1 = jnp.where(jnp.arange(L)[None] < 1, x1, V)
        lp1, _ = fn_u(x_1, 1, jnp.array([1], jnp.int32), st_u)
        idx = np.dot(np.asarray(x_1), (V + 1) ** np.arange(L - 1, -1, -1))
        expected = np.log(tables[:, idx].mean(axis=0))                  # [batch, V]
        np.testing.assert_allclose(np.asarray(lp1[:, 0]), expected, atol=1e-12)
        exact, _ = fn(x_1, 1, jnp.array([1], jnp.int32), ensemble_init_state(
            router, [None] * 3, batch=x1.shape[0], num_moving=1, vocab=V, dtype=jnp.float64))
        assert np.abs(np.asarray(lp1) - np.asarray(exact)).max() > 1e-3


def test_bayes_ensemble_samples_the_mixture_inside_scan():
    joints, tables = _exact_experts(1)
    priors = np.array([0.2, 0.5, 0.3])
    router = BayesFilterRouter.from_priors(priors)
    fn = ensemble_posterior_fn([_table_fn(tb) for tb in tables], router, mask_id=V)
    n = 20000
    state = ensemble_init_state(router, [None] * 3, batch=n, num_moving=1, vocab=V)
    sample = jax.jit(lambda key, st: sample_discrete(key, fn, autoregressive(L), mask_source((n, L), V),
                                                     mask_id=V, state=st))
    x = np.asarray(sample(jax.random.PRNGKey(0), state))
    idx = np.ravel_multi_index(x.T, (V,) * L)
    emp = np.bincount(idx, minlength=V**L) / n
    q = np.einsum("k,k...->...", priors, joints).reshape(-1)
    tv = 0.5 * np.abs(emp - q).sum()
    assert tv < 0.04, tv  # sampling noise alone gives about 0.015 here
    # with uniform (wrong) fixed weights the law is measurably different from q on this seed
    uniform = FixedRouter(jnp.full((n, 3), 1 / 3))
    fn_u = ensemble_posterior_fn([_table_fn(tb) for tb in tables], uniform, top_k=None)
    x_u = np.asarray(sample_discrete(jax.random.PRNGKey(0), fn_u, autoregressive(L), mask_source((n, L), V),
                                     mask_id=V, state=ensemble_init_state(uniform, [None] * 3, batch=n,
                                                                          num_moving=1, vocab=V)))
    emp_u = np.bincount(np.ravel_multi_index(x_u.T, (V,) * L), minlength=V**L) / n
    assert 0.5 * np.abs(emp_u - q).sum() > tv + 0.02


def test_bayes_evidence_counts_padded_positions_once():
    lp = jnp.log(jnp.array([[[[0.2, 0.8]]], [[[0.6, 0.4]]]]))  # [K=2, batch=1, m=1, V=2]
    state = EnsembleState((None, None), jnp.zeros((1, 2)), jnp.array([1, 1], jnp.int32),
                          jnp.array([[True, True]]), jnp.concatenate([lp, lp], axis=2))
    ev = _revealed_evidence(state, jnp.array([[0, 1, 2]]), mask_id=2)
    np.testing.assert_allclose(ev, jnp.log(jnp.array([[0.8], [0.4]])), atol=1e-6)
    ev_masked = _revealed_evidence(state, jnp.array([[0, 2, 2]]), mask_id=2)  # not revealed yet
    np.testing.assert_allclose(ev_masked, 0.0)


def test_ensemble_posterior_fn_bad_inputs():
    _, tables = _exact_experts(2)
    fns = [_table_fn(tb) for tb in tables]
    with pytest.raises(ValueError, match="router has 2 experts but there are 3"):
        ensemble_posterior_fn(fns, BayesFilterRouter.from_priors([0.5, 0.5]), mask_id=V)
    with pytest.raises(ValueError, match="mask_id is required"):
        ensemble_posterior_fn(fns, BayesFilterRouter.from_priors([0.3, 0.3, 0.4]))
    with pytest.raises(ValueError, match=r"experts\[1\].vocab_size=4 differs"):
        ensemble_posterior_fn(fns, CallableRouter(lambda x, t: None, 3),
                              experts=[ExpertSpec(3, 3), ExpertSpec(4, 3), ExpertSpec(3, 3)])
    with pytest.raises(ValueError, match="router has 2 experts but there are 3"):
        ensemble_posterior_fn(fns, FixedRouter(jnp.full((4, 2), 0.5)))
    with pytest.raises(ValueError, match="router: expected a router with init / weights / update"):
        ensemble_posterior_fn(fns, jnp.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="expert_posterior_fns is empty"):
        ensemble_posterior_fn([], FixedRouter(jnp.ones((1, 1))))
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        ensemble_posterior_fn(fns, FixedRouter(jnp.full((1, 3), 1 / 3)), top_k=4)

    def other_vocab(x_t, t, positions, state):
        return jnp.zeros((x_t.shape[0], 1, V + 1)), state

    fixed = FixedRouter(jnp.full((2, 3), 1 / 3))
    fn = ensemble_posterior_fn(fns[:2] + [other_vocab], fixed)
    with pytest.raises(ValueError, match=r"expert_posterior_fns\[2\] returned logits of shape"):
        fn(jnp.full((2, L), V), 0, jnp.array([0]), ensemble_init_state(fixed, [None] * 3, batch=2,
                                                                      num_moving=1, vocab=V))
    wrong = CallableRouter(lambda x, t: jnp.full((x.shape[0], 2), 0.5), 3)
    fn_w = ensemble_posterior_fn(fns, wrong)
    with pytest.raises(ValueError, match="weights has width 2 but there are 3 experts"):
        fn_w(jnp.full((2, L), V), 0, jnp.array([0]), ensemble_init_state(wrong, [None] * 3, batch=2,
                                                                        num_moving=1, vocab=V))


def test_learned_router_ensemble_runs_in_sampler_and_identical_experts_change_nothing():
    """A callable router (LearnedRouter.weights) inside `sample_discrete` (jit + scan); with K copies
    of one denoiser the ensemble samples exactly what the single denoiser samples."""
    from flax import nnx

    from dfm.decentral import LearnedRouter
    from dfm.models import Decoder, DecoderConfig
    from dfm.samplers import posterior_fn_from_denoiser
    from dfm.schedules import LinearScheduler, discretize

    cfg = DecoderConfig(vocab_size=5, output_size=4, hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2, causal=False)
    experts = [Decoder(cfg, rngs=nnx.Rngs(0)) for _ in range(3)]
    router = LearnedRouter(DecoderConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2), 3, num_steps=6, rngs=nnx.Rngs(5))
    schedule = discretize(LinearScheduler(), 6, 6)
    fn = ensemble_posterior_fn([posterior_fn_from_denoiser(e) for e in experts], router, mask_id=4)
    state = ensemble_init_state(router, [None] * 3, batch=5, num_moving=6, vocab=4)
    key = jax.random.PRNGKey(3)
    x_ens = jax.jit(lambda k: sample_discrete(k, fn, schedule, mask_source((5, 6), 4), mask_id=4, state=state))(key)
    x_one = sample_discrete(key, posterior_fn_from_denoiser(experts[0]), schedule, mask_source((5, 6), 4), mask_id=4)
    np.testing.assert_array_equal(x_ens, x_one)
    assert int(x_ens.max()) < 4


def test_fixed_top_k_weights_call_only_the_selected_experts():
    # Centroid routing gives fixed weights: with top-1 only the chosen experts run (issue 8 profile),
    # and the mixture equals the one that calls every expert.
    rng = np.random.default_rng(3)
    num, batch, vocab = 4, 3, 5
    tables = jnp.asarray(rng.normal(size=(num, batch, 1, vocab)), jnp.float32)
    calls = []

    def expert(i):
        def fn(x_t, t, positions, state):
            calls.append(i)
            return tables[i], state
        return fn

    fns = [expert(i) for i in range(num)]
    weights = jnp.asarray([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    x_t = jnp.zeros((batch, 2), jnp.int32)
    state = EnsembleState((None,) * num)
    mixed, new_state = ensemble_posterior_fn(fns, FixedRouter(weights), top_k=1)(x_t, 0, jnp.zeros(1, jnp.int32), state)
    assert sorted(calls) == [0, 1]                       # experts 2 and 3 carry no weight after top-1
    assert new_state.expert_states == (None,) * num
    expected = jax.nn.log_softmax(tables[jnp.asarray([1, 0, 1]), jnp.arange(batch)], axis=-1)
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(expected), atol=1e-6)
    calls.clear()
    full, _ = ensemble_posterior_fn(fns, FixedRouter(weights))(x_t, 0, jnp.zeros(1, jnp.int32), state)
    assert sorted(calls) == [0, 1, 2, 3]
    manual = jax.nn.logsumexp(jnp.log(weights.T)[:, :, None, None] + jax.nn.log_softmax(tables, -1), axis=0)
    np.testing.assert_allclose(np.asarray(full), np.asarray(manual), atol=1e-6)
