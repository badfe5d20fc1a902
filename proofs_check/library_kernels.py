"""Library cross-checks of joint kernels: THEORY S3 (marginal kernel from the library's conditional velocities)
and the sampler's own per-coordinate kernel ``dfm.samplers.transition_probabilities`` (S5(c), S6, S7).

``transition_probabilities(logits, x, rate, mask_id=...)`` is the kernel ``delta_{x^i} + u^i`` that
``dfm.samplers.sample_discrete`` / ``sample_euler`` draw every coordinate from; here it is evaluated on every
(state, coordinate) of the enumeration, flattened to a batch of single coordinates (``[B, 1, vocab]``, padded
to a power-of-two bucket, one compile per (vocab, source, bucket)), and multiplied over coordinates into the
factorized sampler's joint kernel (``dfm.tabular.product_kernel``).
"""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check.library import (
    jit_once,
    pad_rows,
    float64_mode,
    bucket,
    maxdiff,
    velocity_formula,
    worst,
)

INF = float("inf")


def _log(p) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def fill_dead(post) -> np.ndarray:
    """Posterior rows ``[R, L, vocab]`` summing to 0 (unreachable states) replaced by the uniform distribution:
    the library needs a distribution on every row (the kernel there is then compared with the formula only)."""
    post = np.asarray(post, dtype=np.float64)
    return np.where(post.sum(-1, keepdims=True) <= 0, 1.0 / post.shape[-1], post)


def sampler_factors(post, xs, rate, vocab: int, with_mask: bool):
    """Library per-coordinate kernels ``[R, L, S]`` of the sampler for posteriors ``post [R, L, vocab]`` (rows
    must be distributions), states ``xs [R, L]`` and rates ``[R, L]``: ``transition_probabilities`` with
    ``logits = log(post)``, temperature 1, ``mask_id = vocab`` (mask source) or None. None if not float64."""
    from dfm.samplers import transition_probabilities

    r, length, _ = post.shape
    n = r * length
    size = bucket(n, 1024)
    fn = jit_once(transition_probabilities, temperature=1.0, mask_id=vocab if with_mask else None)
    rate = np.broadcast_to(np.asarray(rate, dtype=np.float64), xs.shape)
    with float64_mode():
        out = np.asarray(fn(pad_rows(_log(post.reshape(n, 1, vocab)), size, 0.0), pad_rows(xs.reshape(n, 1), size, 0),
                            pad_rows(rate.reshape(n, 1), size, 0.0)))
    if out.dtype != np.float64:
        return None
    return out[:n, 0].reshape(r, length, -1)


def factor_formula(post, xs, rate, vocab: int, with_mask: bool) -> np.ndarray:
    """The sampler's per-coordinate kernel written out: ``delta_{x^i} + u^i`` with THEORY S4's velocity."""
    s = vocab + 1 if with_mask else vocab
    return np.eye(s)[xs] + velocity_formula(post, xs, rate, vocab, with_mask)


def sampler_law(coord_posts, rates, vocab: int, length: int, columns=None):
    """Propagate the factorized sampler's law through the library kernel, from the all-mask state.

    coord_posts ``[T, M, L, vocab]`` the denoiser at every step (unreachable rows: any distribution is used),
    rates ``[T, L]`` (mask source). The library's per-coordinate kernels are computed on every state and
    compared with :func:`factor_formula`; the joint kernel (product over coordinates) is formed on the columns
    that carry mass (plus ``columns[t]`` if given). Returns ``(law [M], factor error, [(columns, kernel [M, C])])``
    (factor error ``inf`` if the library does not return float64)."""
    steps = coord_posts.shape[0]
    xs = tb.enumerate_states(vocab, length)
    m = xs.shape[0]
    post = fill_dead(coord_posts.reshape(steps * m, length, vocab))
    xs_all = np.tile(xs, (steps, 1))
    rate_all = np.repeat(np.asarray(rates, dtype=np.float64), m, axis=0)
    factors = sampler_factors(post, xs_all, rate_all, vocab, True)
    if factors is None:
        return None, INF, None
    err = maxdiff(factors, factor_formula(post, xs_all, rate_all, vocab, True))
    law = tb.point_mass(tb.mask_index(vocab, length), m)
    kernels = []
    for t in range(steps):
        cols = np.flatnonzero(law)
        if columns is not None:
            cols = np.union1d(cols, columns[t])
        kern = tb.product_kernel(factors[t * m:(t + 1) * m][cols], vocab)
        kernels.append((cols, kern))
        law = kern @ law[cols]
    return law, err, kernels


_AR_RATES: dict = {}


def schedule_rates(kappa, ar: bool = False, blocks=None) -> tuple[np.ndarray, float]:
    """``(rates [T, L], error)`` of the library's own schedule for the table ``kappa``:
    ``dfm.schedules.autoregressive(L)`` (``ar``; built once per length) or ``from_kappa(kappa)``, and, when
    ``blocks`` are contiguous and of one size b (the last may be shorter), ``dfm.schedules.block(L, b)``; the
    error compares the library's kappa tables with ``kappa`` and ``DiscreteSchedule.rates()`` with the
    engine's ``rates``."""
    from dfm.schedules import autoregressive, block, from_kappa

    length = kappa.shape[1]
    with float64_mode():
        if ar:
            if length not in _AR_RATES:
                sched = autoregressive(length)
                _AR_RATES[length] = (np.asarray(sched.kappa), np.asarray(sched.rates()))
            kap, rates = _AR_RATES[length]
        else:
            sched = from_kappa(kappa)
            kap, rates = np.asarray(sched.kappa), np.asarray(sched.rates())
        err = 0.0
        if blocks is not None:
            b = len(blocks[0])
            if all(list(blk) == list(range(j * b, min((j + 1) * b, length))) for j, blk in enumerate(blocks)):
                err = maxdiff(np.asarray(block(length, b).kappa), kappa)
    if rates.dtype != np.float64 or kap.dtype != np.float64:
        return rates, INF
    return rates, worst(err, maxdiff(kap, kappa), maxdiff(rates, tb.rates(kappa)))


def s5_sampler_error(q, kappa, vocab: int, length: int, coord_posts, kern_cols) -> float:
    """S5(c) with the library: the AR-schedule sampler (``autoregressive(L).rates()``, the sampler's kernel on
    every state with the exact denoiser) ends in law q; its kernel columns at the reachable AR states
    ``kern_cols = [(columns, kernel [M, C])]`` equal the enumeration's factorized kernel."""
    rates, err = schedule_rates(kappa, ar=True)
    law, f_err, kernels = sampler_law(coord_posts, rates, vocab, length, [cols for cols, _ in kern_cols])
    if law is None:
        return INF
    errs = []
    for (cols, kern), (want_cols, expected) in zip(kernels, kern_cols):
        errs.append(maxdiff(kern[:, np.searchsorted(cols, want_cols)], expected))
    return worst(err, f_err, maxdiff(law, tb.embed_data(q, vocab, length)), *errs)


def s6_sampler_error(q, kappa, blocks, vocab: int, length: int, law_expected, tc_sum) -> float:
    """S6 with the library: the block-schedule sampler's law through the library kernel (rates from the
    library's schedule) equals the engine's on the support of q, and KL(q || p_sampled) equals the sum of
    conditional total correlations.

    The factorized sampler can visit states of probability 0 under the path (that is the factorization error);
    there the exact posterior does not exist: the engine keeps such a state put, the library is given the
    uniform posterior. Either way that mass ends on data outside the support of q (the revealed tokens already
    rule out every x1 with q(x1) > 0), so the law on supp(q), hence the KL, does not depend on the choice."""
    rates, err = schedule_rates(kappa, blocks=blocks)
    posts = np.stack([tb.coordinate_posteriors(q, kappa, t, vocab) for t in range(kappa.shape[0] - 1)])
    law, f_err, _ = sampler_law(posts, rates, vocab, length)
    if law is None:
        return INF
    on_data = law[tb.data_index(vocab, length)]
    kl = tb.kl_divergence(q, on_data)
    support = q > 0
    return worst(err, f_err, maxdiff(on_data[support], law_expected[tb.data_index(vocab, length)][support]),
                 abs(kl - tc_sum))


def step_law_error(kappa, step_law_expected) -> float:
    """THEORY S6: ``from_kappa(kappa).rates()`` (the library's rates) give the reveal-step law ``a [T, L]`` of
    :func:`proofs_check.reveal.step_law` computed from the engine's rates."""
    from proofs_check.reveal import step_law

    rates, err = schedule_rates(kappa)
    if not np.isfinite(err):
        return INF
    return worst(err, maxdiff(step_law(rates), step_law_expected))


def s7_step_error(post, alive, kap, dk, h: float, vocab: int, with_mask: bool, expected_kernel, random_post) -> float:
    """One Euler step with the sampler's kernel: ``transition_probabilities`` with rate ``min(1, h kappa' /
    (1 - kappa))`` on every state (unreachable states: the random posteriors ``random_post``), per coordinate
    against :func:`factor_formula`, multiplied over coordinates against the engine's Euler kernel on the
    reachable columns."""
    length = post.shape[1]
    xs = tb.enumerate_states(vocab, length, with_mask=with_mask)
    rate = np.broadcast_to(np.minimum(1.0, h * dk / (1.0 - kap)), xs.shape)
    full = np.where(alive[:, None, None], post, random_post)
    factors = sampler_factors(full, xs, rate, vocab, with_mask)
    if factors is None:
        return INF
    kern = tb.product_kernel(factors, vocab, with_mask)
    return worst(maxdiff(factors, factor_formula(full, xs, rate, vocab, with_mask)),
                 maxdiff(kern[:, alive], expected_kernel[:, alive]))


# ------------------------------------------------------------------------------------------------------------
# S3: the marginal joint kernel from the library's conditional velocities
# ------------------------------------------------------------------------------------------------------------
def _conditional_factors(xs, rate, vocab: int, with_mask: bool):
    """``g [M, vocab (a), L, S]``: the library's per-coordinate conditional kernel ``delta_{x^i} + u^i(. | x, x1)``
    at every state x and every value ``a = x1^i`` (``conditional_velocity`` is per coordinate, so x1 = (a, .., a)
    gives every coordinate at once), flattened to single coordinates."""
    from dfm.velocities import conditional_velocity

    m, length = xs.shape
    s = vocab + 1 if with_mask else vocab
    xt = np.repeat(xs, vocab, axis=0)  # row (x, a)
    x1 = np.repeat(np.tile(np.arange(vocab), m)[:, None], length, axis=1)
    rt = np.broadcast_to(rate, xt.shape)
    n = xt.size
    size = bucket(n, 1024)
    fn = jit_once(conditional_velocity, num_states=s, mask_id=vocab if with_mask else None)
    with float64_mode():
        cu = np.asarray(fn(pad_rows(xt.reshape(n, 1), size, 0), pad_rows(x1.reshape(n, 1), size, 0),
                           pad_rows(rt.reshape(n, 1), size, 0.0)))
    if cu.dtype != np.float64:
        return None
    g = np.eye(s)[xt] + cu[:n, 0].reshape(xt.shape + (s,))
    return g.reshape(m, vocab, length, s)


def _mixed_kernel(g, post, vocab: int, length: int) -> np.ndarray:
    """``K[y, x] = sum_{x1} p_t(x1 | x) prod_i g[x, x1^i, i, y^i]``, contracted one coordinate at a time."""
    m, s = post.shape[0], g.shape[-1]
    tensor = post.reshape((m,) + (vocab,) * length)
    for i in range(length):
        moved = np.moveaxis(tensor, 1 + i, -1)
        shp = moved.shape
        res = np.matmul(moved.reshape(m, -1, shp[-1]), g[:, :, i, :])
        tensor = np.moveaxis(res.reshape(shp[:-1] + (s,)), -1, 1 + i)
    return tensor.reshape(m, -1).T


S3_SIZES = (32, 128, 256, 640)  # padded joint state counts (M <= (4 + 1)**4 = 625)


def s3_error(post, p_t, p_n, rate, vocab: int, length: int, with_mask: bool, u_engine) -> float:
    """S3 with the library: the marginal joint velocity ``sum_z p_t(z | x) (prod_i (delta + u^i(. | x, z)) - delta)``
    (z = x1, per-coordinate ``u^i`` from ``dfm.velocities.conditional_velocity``: THEORY S4's form with a mask
    source, Gat et al.'s form ``rate (delta_{x1^i} - delta_{x^i})`` otherwise) is declared valid by
    ``validity_error`` and generating ``p_t -> p_{t+1}`` by ``continuity_residual`` (both <= 1e-12), agrees
    with the engine's ``joint_velocity`` on reachable states, and both library functions agree with the engine."""
    from dfm.velocities import continuity_residual, validity_error

    xs = tb.enumerate_states(vocab, length, with_mask=with_mask)
    m = xs.shape[0]
    g = _conditional_factors(xs, rate, vocab, with_mask)
    if g is None:
        return INF
    kern = _mixed_kernel(g, post, vocab, length)
    alive = p_t > 0
    kern[:, ~alive] = 0.0
    kern[~alive, ~alive] = 1.0  # unreachable states stay put (velocity 0)
    u = kern - np.eye(m)
    size = next(b for b in S3_SIZES if b >= m)
    ut = np.zeros((size, size))
    ut[:m, :m] = u.T
    us = np.zeros((size, size))
    us[:m, :m] = u
    with float64_mode():
        valid = np.asarray(jit_once(validity_error)(ut, np.arange(size)))
        res = np.asarray(jit_once(continuity_residual)(pad_rows(p_t, size, 0.0), pad_rows(p_n, size, 0.0), us))
    if valid.dtype != np.float64 or res.dtype != np.float64:
        return INF
    valid, res = float(valid), res[:m]
    # the library must call the velocity valid and generating (its own numbers <= 1e-12), and agree with the engine
    return worst(valid, maxdiff(res), abs(valid - tb.velocity_validity_error(u)),
                 maxdiff(res, tb.continuity_residual_divergence(p_t, p_n, u)),
                 maxdiff(u[:, alive], u_engine[:, alive]))
