"""Samplers reproduce q: exact under the AR schedule (THEORY S5(c)); the factorized kappa sampler and
the Euler sampler (S6, S7) match their exact laws (computed by enumeration here) and approach q as T grows.

Sampling bound used throughout: for n i.i.d. draws over K outcomes, E[TV(empirical, p)] <=
0.5 * sum_x sqrt(p(x)(1 - p(x)) / n) <= 0.5 * sqrt(K / n), and TV(empirical, p) changes by at most 1/n
when one draw changes, so by McDiarmid P(TV > E[TV] + eps) <= exp(-2 n eps^2). With n = 20000, K = 27,
eps = 0.02: bound 0.5 * sqrt(27 / 20000) + 0.02 = 0.0384, failure probability <= e^-16 per check.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm import autoregressive as ar
from dfm import paths, samplers, schedules

VOCAB, LENGTH, MASK = 3, 3, 3
N_SAMPLES = 20000
TV_BOUND = 0.5 * np.sqrt(VOCAB**LENGTH / N_SAMPLES) + 0.02

STATES = np.array(list(itertools.product(range(VOCAB), repeat=LENGTH)))          # [27, L], index = base-3
STATES_M = np.array(list(itertools.product(range(VOCAB + 1), repeat=LENGTH)))    # [64, L], with mask


def random_q(seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(VOCAB**LENGTH))


def encode(x, base=VOCAB):
    x = np.asarray(x)
    return (x * base ** np.arange(x.shape[-1] - 1, -1, -1)).sum(-1)


def empirical(x):
    return np.bincount(encode(x), minlength=VOCAB**LENGTH) / len(x)


def tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


def exact_posterior_np(q, x_t):
    """p_{1|t}(x_1^i = v | x_t) of the masked path, [..., L, V], by enumeration (depends on x_t only)."""
    x_t = np.asarray(x_t)
    consistent = np.all((x_t[..., None, :] == MASK) | (x_t[..., None, :] == STATES), axis=-1)  # [..., 27]
    w = consistent * q
    onehot = STATES[:, :, None] == np.arange(VOCAB)                                          # [27, L, V]
    post = np.einsum("...d,dlv->...lv", w, onehot)
    return post / w.sum(-1)[..., None, None]


def exact_denoiser(q):
    """jnp denoiser: x_t [B, L] -> exact posterior logits [B, L, V] (log of probabilities)."""
    q_j = jnp.asarray(q)
    states = jnp.asarray(STATES)
    onehot = jnp.asarray(STATES[:, :, None] == np.arange(VOCAB), dtype=q_j.dtype)

    def fn(x_t):
        consistent = jnp.all((x_t[:, None, :] == MASK) | (x_t[:, None, :] == states[None]), axis=-1)
        w = consistent * q_j
        post = jnp.einsum("bd,dlv->blv", w, onehot)
        return jnp.log(post / jnp.sum(w, axis=-1)[:, None, None])

    return fn


def factorized_law(q, rates):
    """Exact law of the factorized mask sampler driven by the exact coordinate posteriors, over [27]."""
    post = exact_posterior_np(q, STATES_M)                       # [64, L, V]
    p = np.zeros(len(STATES_M))
    p[encode(np.full(LENGTH, MASK), VOCAB + 1)] = 1.0
    for r in np.asarray(rates, dtype=np.float64):
        new = np.zeros_like(p)
        for xi, x in enumerate(STATES_M):
            if p[xi] == 0:
                continue
            col = np.ones(1)
            for i in range(LENGTH):
                k = np.zeros(VOCAB + 1)
                if x[i] == MASK:
                    k[MASK] = 1 - r[i]
                    k[:VOCAB] = r[i] * np.nan_to_num(post[xi, i])
                else:
                    k[x[i]] = 1.0
                col = np.outer(col, k).ravel()
            new += p[xi] * col
        p = new
    revealed = np.all(STATES_M < MASK, axis=1)
    assert p[~revealed].sum() < 1e-12
    return p[revealed]          # mixed-radix order of STATES_M restricted to tokens == STATES order


def test_ar_exact_posterior_reproduces_q():
    with jax.enable_x64(True):
        q = random_q(0)
        x0 = paths.mask_source((N_SAMPLES, LENGTH), MASK)
        fn = samplers.posterior_fn_from_denoiser(exact_denoiser(q))
        x1 = samplers.sample_discrete(jax.random.key(1), fn, schedules.autoregressive(LENGTH), x0, mask_id=MASK)
        assert np.all(np.asarray(x1) < VOCAB)
        assert tv(empirical(x1), q) < TV_BOUND


def test_ar_cached_posterior_gives_same_samples():
    with jax.enable_x64(True):
        q = random_q(0)
        den = exact_denoiser(q)

        def step_fn(tokens, position, buf):
            # cache: buf[:, j] holds x^j once it has been fed (input index j + 1).
            buf = jnp.where(position > 0, buf.at[:, jnp.maximum(position - 1, 0)].set(tokens), buf)
            x = jnp.where(jnp.arange(LENGTH) < position, buf, MASK)
            return jnp.take(den(x), position, axis=1), buf

        x0 = paths.mask_source((N_SAMPLES, LENGTH), MASK)
        sched = schedules.autoregressive(LENGTH)
        key = jax.random.key(7)
        stateless = samplers.sample_discrete(key, samplers.posterior_fn_from_denoiser(den), sched, x0, mask_id=MASK)
        cached = samplers.sample_discrete(key, ar.causal_posterior_fn(step_fn, bos_id=VOCAB + 1), sched, x0,
                                          mask_id=MASK, state=jnp.full((N_SAMPLES, LENGTH), MASK))
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(stateless))
        assert tv(empirical(cached), q) < TV_BOUND


def test_ar_greedy_is_argmax_chain():
    with jax.enable_x64(True):
        q = random_q(3).reshape(VOCAB, VOCAB, VOCAB)
        a = int(np.argmax(q.sum((1, 2))))
        b = int(np.argmax(q[a].sum(1)))
        c = int(np.argmax(q[a, b]))
        fn = samplers.posterior_fn_from_denoiser(exact_denoiser(q.ravel()))
        x1 = samplers.sample_discrete(jax.random.key(0), fn, schedules.autoregressive(LENGTH),
                                      paths.mask_source((4, LENGTH), MASK), mask_id=MASK, temperature=0.0)
        np.testing.assert_array_equal(np.asarray(x1), np.tile([a, b, c], (4, 1)))


def test_factorized_kappa_sampler_approaches_q():
    q = random_q(1)
    tvs = [tv(factorized_law(q, schedules.discretize(schedules.CosineScheduler(), LENGTH, T).rates()), q)
           for T in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs
    assert tvs[-1] < 0.1 * tvs[0], tvs
    # T = 1 reveals every coordinate at once: the law is the product of q's marginals.
    qq = q.reshape(VOCAB, VOCAB, VOCAB)
    prod = np.einsum("a,b,c->abc", qq.sum((1, 2)), qq.sum((0, 2)), qq.sum((0, 1))).ravel()
    assert tv(factorized_law(q, np.ones((1, LENGTH))), prod) < 1e-12


def test_jax_factorized_sampler_matches_exact_law():
    with jax.enable_x64(True):
        q = random_q(1)
        sched = schedules.discretize(schedules.LinearScheduler(), LENGTH, 4)
        law = factorized_law(q, sched.rates())
        fn = samplers.posterior_fn_from_denoiser(exact_denoiser(q))
        x1, xs = samplers.sample_discrete(jax.random.key(2), fn, sched, paths.mask_source((N_SAMPLES, LENGTH), MASK),
                                          mask_id=MASK, return_intermediates=True)
        assert xs.shape == (5, N_SAMPLES, LENGTH)
        np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(x1))
        assert np.all(np.asarray(xs[0]) == MASK)
        xs = np.asarray(xs)
        # with a mask source only masked coordinates move: a revealed coordinate never changes
        revealed = xs[:-1] != MASK
        assert np.all(xs[1:][revealed] == xs[:-1][revealed])
        assert tv(empirical(x1), law) < TV_BOUND
        assert tv(law, q) > 2 * TV_BOUND   # the law differs from q: the test can tell them apart


def test_euler_rates_float64():
    with jax.enable_x64(True):
        for sch in (schedules.CosineScheduler(), schedules.PolynomialScheduler(2.0), schedules.LinearScheduler()):
            T = 10
            r = np.asarray(samplers.euler_rates(sch, 2, T))
            t = np.arange(T) / T
            k = np.asarray(sch.kappa(jnp.asarray(t)))
            dk = np.asarray(sch.d_kappa(jnp.asarray(t)))
            expected = np.minimum(1.0, dk / T / (1 - k))
            assert r.shape == (T, 2)
            np.testing.assert_allclose(r[:-1, 0], expected[:-1], rtol=0, atol=1e-15)
            np.testing.assert_array_equal(r[:, 0], r[:, 1])
            assert r[-1, 0] == 1.0
        # cosine: d_kappa / (1 - kappa) = pi tan(pi t / 2), so h * rate at t = 0.5 is pi / T
        r = samplers.euler_rates(schedules.CosineScheduler(), 1, 10)
        assert abs(float(r[5, 0]) - np.pi / 10) < 1e-14


def test_euler_sampler_approaches_q():
    q = random_q(2)
    sch = schedules.PolynomialScheduler(2.0)
    with jax.enable_x64(True):
        tvs = [tv(factorized_law(q, samplers.euler_rates(sch, LENGTH, T)), q) for T in (2, 4, 8, 16, 32, 64)]
        assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs
        assert tvs[-1] < 0.1 * tvs[0], tvs
        T = 8
        law = factorized_law(q, samplers.euler_rates(sch, LENGTH, T))
        times = []

        def fn(x_t, t, positions, state):
            times.append(t)
            return jnp.take(exact_denoiser(q)(x_t), positions, axis=1), state

        x1 = samplers.sample_euler(jax.random.key(3), fn, sch, paths.mask_source((N_SAMPLES, LENGTH), MASK), T,
                                   mask_id=MASK)
        assert jnp.issubdtype(times[0].dtype, jnp.floating)
        assert tv(empirical(x1), law) < TV_BOUND


def test_uniform_source_jumps_with_rate():
    vocab, length, n = 3, 3, 20000
    sched = schedules.discretize(schedules.LinearScheduler(), length, 4)   # rate[0] = 1/4
    logits = jnp.array([0.0, -jnp.inf, -jnp.inf])

    def fn(x_t, t, positions, state):
        return jnp.broadcast_to(logits, (x_t.shape[0], positions.shape[0], vocab)), state

    x0 = paths.uniform_source(jax.random.key(0), (n, length), vocab)
    x1, xs = samplers.sample_discrete(jax.random.key(1), fn, sched, x0, return_intermediates=True)
    assert np.all(np.asarray(x1) == 0)
    # after one step P(x = 0) = 1/3 + (1/4)(2/3) = 1/2; std of the mean over 60000 coords < 0.0021
    frac = float(jnp.mean(xs[1] == 0))
    assert abs(frac - 0.5) < 0.015
    # a nonzero coordinate either stayed or jumped to 0
    moved = np.asarray(xs[1] != xs[0])
    assert np.all(np.asarray(xs[1])[moved] == 0)


def test_block_schedule_moves_block_positions_only():
    calls = []

    def fn(x_t, t, positions, state):
        calls.append(positions.shape)
        return jnp.zeros((x_t.shape[0], positions.shape[0], 2)), state + 1

    sched = schedules.block(5, 2)
    x1, xs = samplers.sample_discrete(jax.random.key(0), fn, sched, paths.mask_source((3, 5), 2), mask_id=2,
                                      state=jnp.int32(0), return_intermediates=True)
    assert calls == [(2,)]  # traced once by scan, asked for max_moves = 2 positions
    masked = np.asarray(xs) == 2
    np.testing.assert_array_equal(masked.sum(axis=(1, 2)), [15, 9, 3, 0])
    assert np.all(~masked[1][:, :2]) and np.all(masked[1][:, 2:])


def test_jit_matches_eager():
    q = random_q(0)
    fn = samplers.posterior_fn_from_denoiser(exact_denoiser(q))
    sched = schedules.discretize(schedules.CosineScheduler(), LENGTH, 3)
    x0 = paths.mask_source((64, LENGTH), MASK)
    eager = samplers.sample_discrete(jax.random.key(4), fn, sched, x0, mask_id=MASK)
    jitted = jax.jit(lambda k, s, x: samplers.sample_discrete(k, fn, s, x, mask_id=MASK))(jax.random.key(4), sched, x0)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_posterior_fn_wrong_shape_raises():
    def fn(x_t, t, positions, state):
        return jnp.zeros((x_t.shape[0], x_t.shape[1] + 1, 2)), state

    with pytest.raises(ValueError, match="posterior_fn"):
        samplers.sample_discrete(jax.random.key(0), fn, schedules.autoregressive(3), paths.mask_source((2, 3), 2),
                                 mask_id=2)


def test_transition_probabilities_is_delta_plus_velocity():
    """The sampler's per-coordinate kernel (THEORY S4): a masked coordinate jumps with probability
    rate to a draw from the posterior, a revealed one stays; the uniform source jumps anywhere."""
    rng = np.random.default_rng(0)
    vocab = 4
    logits = rng.normal(size=(2, 3, vocab))
    x = np.array([[vocab, 1, vocab], [2, vocab, 0]])
    rate = np.array([0.25, 0.5, 1.0])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    with jax.enable_x64(True):
        k = np.asarray(samplers.transition_probabilities(jnp.asarray(logits), jnp.asarray(x), jnp.asarray(rate),
                                                         mask_id=vocab))
        k_greedy = np.asarray(samplers.transition_probabilities(jnp.asarray(logits), jnp.asarray(x),
                                                                jnp.asarray(rate), temperature=0.0, mask_id=vocab))
        k_u = np.asarray(samplers.transition_probabilities(jnp.asarray(logits), jnp.asarray(x % vocab),
                                                           jnp.asarray(rate)))
    for b, i in itertools.product(range(2), range(3)):
        want = np.zeros(vocab + 1)
        if x[b, i] == vocab:
            want[:vocab] = rate[i] * p[b, i]
            want[vocab] = 1.0 - rate[i]
        else:
            want[x[b, i]] = 1.0
        np.testing.assert_allclose(k[b, i], want, atol=1e-12)
        greedy = np.zeros(vocab + 1)
        if x[b, i] == vocab:
            greedy[np.argmax(logits[b, i])] = rate[i]
            greedy[vocab] = 1.0 - rate[i]
        else:
            greedy[x[b, i]] = 1.0
        np.testing.assert_allclose(k_greedy[b, i], greedy, atol=1e-12)
        uniform = rate[i] * p[b, i] + (1.0 - rate[i]) * np.eye(vocab)[x[b, i] % vocab]
        np.testing.assert_allclose(k_u[b, i], uniform, atol=1e-12)
    with pytest.raises(ValueError, match="mask_id"):
        samplers.transition_probabilities(jnp.asarray(logits), jnp.asarray(x % vocab), jnp.asarray(rate), mask_id=2)
