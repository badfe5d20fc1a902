"""Losses: AR loss == DFM loss under the AR schedule (THEORY S5(d)), generalized KL formula,
unbiasedness of dfm_loss, jit/vmap agreement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm import autoregressive as ar
from dfm import losses, paths, schedules

VOCAB, LENGTH, BATCH = 5, 6, 4
MASK, BOS = VOCAB, VOCAB + 1


def make_causal_fn(seed=0, dim=8):
    """A small random causal model: row j = f(sum_{k<=j} E[tokens_k]) + b_j (float64 under x64)."""
    rng = np.random.default_rng(seed)
    emb = jnp.asarray(rng.normal(size=(VOCAB + 2, dim)))
    w = jnp.asarray(rng.normal(size=(dim, VOCAB)))
    bias = jnp.asarray(rng.normal(size=(LENGTH, VOCAB)))

    def causal_fn(tokens):
        h = jnp.cumsum(emb[tokens], axis=1)
        return jnp.tanh(h) @ w + bias[: tokens.shape[1]]

    return causal_fn


def manual_nll(x1, seed, dim=8):
    """Plain next-token NLL of make_causal_fn's model, recomputed in numpy prefix by prefix."""
    rng = np.random.default_rng(seed)
    emb, w, bias = rng.normal(size=(VOCAB + 2, dim)), rng.normal(size=(dim, VOCAB)), rng.normal(size=(LENGTH, VOCAB))
    out = np.zeros(len(x1))
    for b, row in enumerate(np.asarray(x1)):
        for j in range(LENGTH):
            prefix = [BOS, *row[:j]]                           # inputs x^{<j} after BOS
            logits = np.tanh(emb[prefix].sum(0)) @ w + bias[j]
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            out[b] -= logp[row[j]]
    return out


def random_tokens(seed, shape=(BATCH, LENGTH), vocab=VOCAB):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape))


def test_ar_nll_equals_dfm_loss_and_manual_nll():
    with jax.enable_x64(True):
        causal_fn = make_causal_fn(0)
        x1 = random_tokens(1)
        one_pass = losses.ar_nll(causal_fn(ar.shift_right(x1, BOS)), x1)

        sched = schedules.autoregressive(LENGTH)
        denoiser = ar.causal_denoiser(causal_fn, BOS)
        rates = sched.rates()
        dfm_sum = jnp.zeros(BATCH)
        for t in range(sched.num_steps):
            x_t = paths.sample_masked_path(jax.random.key(t), x1, sched.kappa[t], MASK)
            np.testing.assert_array_equal(np.asarray(x_t[:, t:]), MASK)       # S5(a): prefix revealed
            np.testing.assert_array_equal(np.asarray(x_t[:, :t]), np.asarray(x1[:, :t]))
            dfm_sum = dfm_sum + losses.dfm_cross_entropy(denoiser(x_t), x1, x_t, rates[t], mask_id=MASK)

        manual = manual_nll(x1, seed=0)
        assert one_pass.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(one_pass), manual, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(dfm_sum), manual, rtol=0, atol=1e-10)
        assert np.all(manual > 0)


def test_dfm_loss_unbiased_under_ar():
    """E_t[T * CE_t] = sum_t CE_t = ar_nll. 4000 draws; tolerance 5 standard errors (CLT)."""
    with jax.enable_x64(True):
        causal_fn = make_causal_fn(2)
        x1 = random_tokens(3)
        sched = schedules.autoregressive(LENGTH)
        denoiser = ar.causal_denoiser(causal_fn, BOS)
        keys = jax.random.split(jax.random.key(0), 4000)
        vals = np.asarray(jax.vmap(lambda k: losses.dfm_loss(k, denoiser, x1, sched, mask_id=MASK))(keys))
        target = np.asarray(losses.ar_nll(causal_fn(ar.shift_right(x1, BOS)), x1))
        se = vals.std(axis=0) / np.sqrt(len(vals))
        assert np.all(np.abs(vals.mean(axis=0) - target) < 5 * se)
        # each draw is T * (one step's cross-entropy): values lie on a finite set of T candidates
        steps = []
        for t in range(LENGTH):
            x_t = paths.sample_masked_path(jax.random.key(0), x1, sched.kappa[t], MASK)
            steps.append(LENGTH * losses.dfm_cross_entropy(denoiser(x_t), x1, x_t, sched.rates()[t], mask_id=MASK))
        steps = np.asarray(steps)                                      # [T, batch]
        assert np.all(np.min(np.abs(vals[:, None, :] - steps[None]), axis=1) < 1e-10)


def test_dfm_cross_entropy_weights():
    with jax.enable_x64(True):
        logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, VOCAB)))
        x1 = jnp.array([[0, 1, 2], [3, 4, 0]])
        x_t = jnp.array([[MASK, 1, MASK], [MASK, MASK, 0]])
        rate = jnp.array([0.5, 0.25, 1.0])
        logp = np.asarray(jax.nn.log_softmax(logits))
        expected = [-(0.5 * logp[0, 0, 0] + 1.0 * logp[0, 2, 2]), -(0.5 * logp[1, 0, 3] + 0.25 * logp[1, 1, 4])]
        got = losses.dfm_cross_entropy(logits, x1, x_t, rate, mask_id=MASK)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)
        # zero weight with -inf log-probability contributes exactly 0 (no NaN)
        bad = logits.at[0, 1].set(-jnp.inf)
        assert np.isfinite(np.asarray(losses.dfm_cross_entropy(bad, x1, x_t, rate, mask_id=MASK))).all()
        # uniform source (mask_id=None) weights every coordinate
        got_u = losses.dfm_cross_entropy(logits, x1, x_t, rate, mask_id=None)
        exp_u = -(rate[None] * np.take_along_axis(logp, np.asarray(x1)[..., None], -1)[..., 0]).sum(-1)
        np.testing.assert_allclose(np.asarray(got_u), exp_u, rtol=0, atol=1e-12)


def _gkl_numpy(logits, x1, x_t, kappa, d_kappa):
    logits, x1, x_t = map(np.asarray, (logits, x1, x_t))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros(x1.shape)
    for b, i in np.ndindex(*x1.shape):
        jump = d_kappa[b] / (1 - kappa[b])
        p_xt = p[b, i, x_t[b, i]] if x_t[b, i] < p.shape[-1] else 0.0
        delta = float(x_t[b, i] == x1[b, i])
        out[b, i] = -jump * (p_xt - delta + (1 - delta) * np.log(p[b, i, x1[b, i]]))
    return out


def test_generalized_kl_matches_formula():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        logits = jnp.asarray(rng.normal(size=(BATCH, LENGTH, VOCAB)))
        x1 = random_tokens(6)
        x_t = jnp.where(jnp.asarray(rng.random((BATCH, LENGTH)) < 0.5), x1, random_tokens(7, vocab=VOCAB + 1))
        t = rng.random(BATCH)
        sch = schedules.PolynomialScheduler(2.0)
        kappa, d_kappa = np.asarray(sch.kappa(t)), np.asarray(sch.d_kappa(t))
        expected = _gkl_numpy(logits, x1, x_t, kappa, d_kappa)
        got = losses.generalized_kl(logits, x1, x_t, kappa, d_kappa, reduction="none")
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)
        assert abs(float(losses.generalized_kl(logits, x1, x_t, kappa, d_kappa)) - expected.mean()) < 1e-12
        assert abs(float(losses.generalized_kl(logits, x1, x_t, kappa, d_kappa, reduction="sum")) - expected.sum()) < 1e-10
        # per-position kappa [batch, length] with equal columns gives the same values
        got2 = losses.generalized_kl(logits, x1, x_t, np.repeat(kappa[:, None], LENGTH, 1),
                                     np.repeat(d_kappa[:, None], LENGTH, 1), reduction="none")
        np.testing.assert_allclose(np.asarray(got2), expected, rtol=1e-12, atol=1e-12)
        # a perfect posterior at a masked state has zero loss
        perfect = jnp.where(jax.nn.one_hot(x1, VOCAB) > 0, 0.0, -jnp.inf)
        zero = losses.generalized_kl(perfect, x1, jnp.full_like(x1, MASK), kappa, d_kappa, reduction="none")
        np.testing.assert_allclose(np.asarray(zero), 0.0, atol=1e-15)


def test_jit_and_vmap_match_eager():
    causal_fn = make_causal_fn(0)
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(BATCH, LENGTH, VOCAB)), dtype=jnp.float32)
    x1 = random_tokens(10)
    x_t = jnp.where(jnp.asarray(rng.random((BATCH, LENGTH)) < 0.5), x1, MASK)
    rate = jnp.asarray(rng.random((BATCH, LENGTH)), dtype=jnp.float32)
    kappa = jnp.asarray(rng.random(BATCH) * 0.9, dtype=jnp.float32)
    d_kappa = jnp.ones(BATCH, dtype=jnp.float32)

    ce = lambda lg, a, b, r: losses.dfm_cross_entropy(lg, a, b, r, mask_id=MASK)
    gkl = lambda lg, a, b, k, dk: losses.generalized_kl(lg, a, b, k, dk, reduction="none")
    cases = [(ce, (logits, x1, x_t, rate)), (gkl, (logits, x1, x_t, kappa, d_kappa)), (losses.ar_nll, (logits, x1))]
    for fn, args in cases:
        eager = fn(*args)
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(*args)), np.asarray(eager), rtol=1e-6, atol=1e-6)
        per_row = jax.vmap(lambda *a: fn(*(x[None] for x in a))[0])(*args)
        np.testing.assert_allclose(np.asarray(per_row), np.asarray(eager), rtol=1e-6, atol=1e-6)

    sched = schedules.discretize(schedules.CosineScheduler(), LENGTH, 4)
    den = ar.causal_denoiser(causal_fn, BOS)
    loss_fn = lambda k, s: losses.dfm_loss(k, den, x1, s, mask_id=MASK)
    np.testing.assert_allclose(np.asarray(jax.jit(loss_fn)(jax.random.key(0), sched)),
                               np.asarray(loss_fn(jax.random.key(0), sched)), rtol=1e-6, atol=1e-6)


def test_generalized_kl_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        losses.generalized_kl(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), int), jnp.zeros((1, 2), int),
                              jnp.zeros(1), jnp.ones(1), reduction="avg")
