"""Library cross-checks of THEORY S5's code beyond the losses: the AR schedules and the causal-LM adapters.

* ``dfm.schedules.any_order(perm)``: its kappa table is the AR table with positions permuted, and the sampler's
  own kernel (``transition_probabilities``) under its rates, driven by the exact denoiser, ends in law q;
* ``dfm.autoregressive.causal_denoiser``: a causal model (a table of ``q(x^j | x^{<j})``, input j holding
  ``x^{j-1}``, BOS at 0) read at the AR states gives ``q(. | x^{<t})`` at the moving position t;
* ``dfm.autoregressive.causal_posterior_fn``: the cached one-token-per-step form gives the same rows when it is
  stepped along the AR states (its cache holds the inputs fed so far);
* ``dfm.losses.dfm_loss``: its one-random-step estimate is unbiased for the exact weighted loss of S5(d)/(e)
  (a z-test per sequence on ``R`` draws, rows interleaved so that a stratified batch spreads every sequence's
  steps; the sample sd over-states the sd of a stratified mean, so the test is conservative there: the only
  statistical check of row S5).
Float64 under ``jax.enable_x64``; fixed padded shapes, so each function compiles a few times per run.
"""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check.library import float64_mode, jit_once, maxdiff, worst
from proofs_check.library_kernels import sampler_law

INF = float("inf")
BOS = 7            # any id: the table ignores the BOS input
Z_MAX = 7.0        # |z| above this FAILs (P(|Z| > 7) ~ 3e-12 per test for a correct estimator)
DRAWS = 1024       # R draws of dfm_loss per sequence
LOSS_V, LOSS_L, LOSS_T = 3, 3, 5


def _next_table(q, vocab: int, length: int) -> np.ndarray:
    """``[L, vocab^(L-1), vocab]`` log ``q(x^j | x^{<j})`` at prefix index (first position most significant);
    rows of probability-0 prefixes: uniform."""
    out = np.full((length, vocab ** (length - 1), vocab), 1.0 / vocab)
    for j, c in enumerate(tb.next_token_conditionals(q, vocab, length)):
        live = c.sum(1) > 0
        out[j, : c.shape[0]][live] = c[live]
    with np.errstate(divide="ignore"):
        return np.log(out)


def _prefix_index(prefix_tokens, vocab: int):
    """Index of ``[B, j]`` tokens (values >= vocab, e.g. the mask, read as 0: rows never used)."""
    import jax.numpy as jnp

    j = prefix_tokens.shape[1]
    if j == 0:
        return jnp.zeros(prefix_tokens.shape[0], jnp.int32)
    tok = jnp.where(prefix_tokens < vocab, prefix_tokens, 0).astype(jnp.int32)
    return jnp.sum(tok * jnp.asarray(vocab ** np.arange(j - 1, -1, -1), jnp.int32), axis=1)


def _causal_rows(table, inputs, vocab: int):
    """Causal logits ``[B, L, vocab]``: row j reads inputs ``1..j`` (= ``x^{<j}``) only."""
    import jax.numpy as jnp

    length = inputs.shape[1]
    return jnp.stack([table[j][_prefix_index(inputs[:, 1:j + 1], vocab)] for j in range(length)], axis=1)


def _denoiser_out(table, x_t, vocab: int):
    from dfm.autoregressive import causal_denoiser

    return causal_denoiser(lambda tokens: _causal_rows(table, tokens, vocab), BOS)(x_t)


def _stepped_out(table, x_ts, vocab: int):
    """``causal_posterior_fn`` stepped along ``x_ts [L, B, L]`` (the AR states): outputs ``[L, B, vocab]``."""
    import jax.numpy as jnp

    from dfm.autoregressive import causal_posterior_fn

    length, batch = x_ts.shape[0], x_ts.shape[1]

    def step_fn(tokens, position, cache):
        cache = cache.at[:, position].set(tokens.astype(cache.dtype))   # inputs seen so far (BOS at 0)
        rows = jnp.stack([table[j][_prefix_index(cache[:, 1:j + 1], vocab)] for j in range(length)], axis=1)
        return jnp.take(rows, position, axis=1), cache

    fn = causal_posterior_fn(step_fn, BOS)
    state = jnp.zeros((batch, length), x_ts.dtype)
    outs = []
    for t in range(length):
        logits, state = fn(x_ts[t], jnp.int32(t), jnp.asarray([t], jnp.int32), state)
        outs.append(logits[:, 0])
    return jnp.stack(outs)


def causal_errors(q, vocab: int, length: int) -> float:
    """``causal_denoiser`` and ``causal_posterior_fn`` at the AR states of every x1 == ``log q(. | x1^{<t})`` where
    ``q(x1^{<t}) > 0`` (-inf entries must match)."""
    table = _next_table(q, vocab, length)
    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    x_ts = np.stack([np.where(np.arange(length)[None, :] < t, x1s, vocab) for t in range(length)])  # [L, D, L]
    with float64_mode():
        den = np.stack([np.asarray(jit_once(_denoiser_out, vocab=vocab)(table, x_ts[t]))[:, t] for t in range(length)])
        stepped = np.asarray(jit_once(_stepped_out, vocab=vocab)(table, x_ts))
    if den.dtype != np.float64 or stepped.dtype != np.float64:
        return INF
    prefixes = tb.prefix_marginals(q, vocab, length)
    errs = []
    for t in range(length):
        pidx = x1s[:, :t] @ (vocab ** np.arange(t - 1, -1, -1)) if t else np.zeros(x1s.shape[0], np.int64)
        alive = prefixes[t][pidx] > 0
        want = table[t][pidx][alive]
        errs += [maxdiff(den[t][alive], want), maxdiff(stepped[t][alive], want)]
    return worst(*errs)


def any_order_error(q, vocab: int, length: int, perm) -> float:
    """``any_order(perm)``: kappa == the permuted AR table; the law of the sampler's kernel (exact denoiser, the
    schedule's own rates) from all-mask == q."""
    from dfm.schedules import any_order

    order = np.empty(length, np.int64)
    order[np.asarray(perm)] = np.arange(length)
    expected = (order[None, :] < np.arange(length + 1)[:, None]).astype(np.float64)
    with float64_mode():
        sched = any_order(np.asarray(perm))
        kappa, rates = np.asarray(sched.kappa), np.asarray(sched.rates())
    if kappa.dtype != np.float64:
        return INF
    posts = np.stack([tb.coordinate_posteriors(q, expected, t, vocab) for t in range(length)])
    law, f_err, _ = sampler_law(posts, rates, vocab, length)
    if law is None:
        return INF
    return worst(maxdiff(kappa, expected), f_err, maxdiff(law, tb.embed_data(q, vocab, length)))


def _loss_draws(key, log_model, x1, schedule, t_sampling):
    import jax.numpy as jnp

    from dfm.losses import dfm_loss

    radix = jnp.asarray((LOSS_V + 1) ** np.arange(LOSS_L - 1, -1, -1), jnp.int32)

    def denoiser(x_t):
        return log_model[jnp.sum(x_t.astype(jnp.int32) * radix, axis=1)]

    return dfm_loss(key, denoiser, x1, schedule, mask_id=LOSS_V, t_sampling=t_sampling)


def dfm_loss_z(seed: int, model, kappa, t_sampling: str) -> float:
    """Largest ``|z|`` over the ``D`` sequences of ``(mean of R draws of dfm_loss - exact loss) / (sd / sqrt(R))``;
    ``model [M, L, V]`` a positive denoiser table, ``kappa`` a random masked table (padded to ``LOSS_T`` steps
    with kappa = 1: rate 0, no contribution). The exact loss: ``dfm.tabular.dfm_loss``."""
    import jax

    from dfm.schedules import from_kappa

    steps = kappa.shape[0] - 1
    kap = np.ones((LOSS_T + 1, LOSS_L))
    kap[:steps + 1] = kappa
    x1s = tb.enumerate_states(LOSS_V, LOSS_L, with_mask=False)
    x1 = np.tile(x1s, (DRAWS, 1))   # row b holds sequence b % D: a stratified batch spreads each one's steps
    with float64_mode():
        draws = np.asarray(jit_once(_loss_draws, t_sampling=t_sampling)(
            jax.random.key(seed), np.log(model), x1, from_kappa(kap, max_moves=LOSS_L)))
    if draws.dtype != np.float64:
        return INF
    draws = draws.reshape(DRAWS, x1s.shape[0]).T
    exact = tb.dfm_loss(model, kappa, LOSS_V)
    # standard error of the mean, floored at float rounding (a loss that is the same for every draw, e.g. T = 1,
    # has sd ~ 1e-16: its mean must then equal the exact loss to rounding)
    se = np.maximum(draws.std(axis=1, ddof=1) / np.sqrt(DRAWS), 1e-12 * (1.0 + np.abs(exact)))
    return float(np.max(np.abs(draws.mean(1) - exact) / se))
