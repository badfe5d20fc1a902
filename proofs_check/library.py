"""Cross-checks of the JAX library against the exact enumeration (float64 via ``jax.enable_x64``).

For the statements whose formula the library implements:
* S4: ``dfm.velocities.conditional_velocity`` and ``posterior_to_velocity`` (per-coordinate velocities),
* S5(d), S5(e): ``dfm.losses.dfm_cross_entropy`` summed over steps and ``dfm.losses.ar_nll``,
* S7: ``dfm.samplers.euler_rates`` and ``dfm.schedules.discretize`` (Euler rates, kappa tables), and
  ``posterior_to_velocity`` with the Euler rate as one Euler step.
Each function returns the max abs error against the tabular engine on one case. Library calls are
eager (shapes change from case to case; one call per case, all steps batched).
"""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb


def available() -> tuple[bool, str]:
    """Whether the library modules import (``(False, reason)`` otherwise)."""
    try:
        import dfm.losses  # noqa: F401
        import dfm.samplers  # noqa: F401
        import dfm.schedules  # noqa: F401
        import dfm.velocities  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not ready"
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def _x64():
    import jax

    return jax.enable_x64(True)


def s4_errors(xs, coord_post, alive, rate, vocab: int, with_mask: bool, x1, x0) -> float:
    """Library vs engine: marginal velocity ``r (p_{1|t} - delta)`` on reachable states, and the conditional
    velocity ``r (delta_{x1} - delta_{x_t})`` on the support of ``p_t(. | x0, x1)``."""
    import jax.numpy as jnp

    from dfm.velocities import conditional_velocity, posterior_to_velocity

    s = vocab + 1 if with_mask else vocab
    expected = tb.coordinate_velocity(coord_post, rate, vocab, with_mask=with_mask)[alive]
    src = np.full(xs.shape[1], vocab) if x0 is None else np.asarray(x0)
    on_support = np.all((xs == x1[None]) | (xs == src[None]), axis=1)
    eye = np.eye(s)
    movable = (xs == src[None]) & (xs != x1[None])
    cond_expected = rate[None, :, None] * movable[..., None] * (eye[x1][None] - eye[xs])
    with _x64():
        u = posterior_to_velocity(jnp.asarray(coord_post[alive]), jnp.asarray(xs[alive]), jnp.asarray(rate),
                                  mask_id=vocab if with_mask else None)
        cu = conditional_velocity(jnp.asarray(xs[on_support]), jnp.asarray(np.broadcast_to(x1, xs[on_support].shape)),
                                  jnp.asarray(rate), s)
        u, cu = np.asarray(u), np.asarray(cu)
    if u.dtype != np.float64:
        return float("inf")
    err = np.max(np.abs(u - expected)) if expected.size else 0.0
    err_c = np.max(np.abs(cu - cond_expected[on_support])) if cu.size else 0.0
    return float(max(err, err_c))


def s5_loss_error(model, kappa, vocab: int, expected_loss) -> float:
    """Library ``sum_t E_{x_t ~ p_t(.|x1)} dfm_cross_entropy`` vs the engine's loss, for every x1 (one batched call)."""
    import jax.numpy as jnp

    from dfm.losses import dfm_cross_entropy

    length = kappa.shape[1]
    d = vocab**length
    xs = tb.enumerate_states(vocab, length)
    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    rates = tb.rates(kappa)
    rows_x, rows_x1, rows_rate, weights = [], [], [], []
    for t in range(kappa.shape[0] - 1):
        cond = tb.joint_path_at(kappa[t], np.ones((1, d)), vocab, True)
        ix, ix1 = np.nonzero(cond)
        rows_x.append(ix)
        rows_x1.append(ix1)
        rows_rate.append(np.broadcast_to(rates[t], (ix.shape[0], length)))
        weights.append(cond[ix, ix1])
    ix, ix1 = np.concatenate(rows_x), np.concatenate(rows_x1)
    with _x64():
        ce = dfm_cross_entropy(jnp.log(jnp.asarray(model[ix])), jnp.asarray(x1s[ix1]), jnp.asarray(xs[ix]),
                               jnp.asarray(np.concatenate(rows_rate)), mask_id=vocab)
        ce = np.asarray(ce)
    if ce.dtype != np.float64:
        return float("inf")
    loss = np.zeros(d)
    np.add.at(loss, ix1, np.concatenate(weights) * ce)
    return float(np.max(np.abs(loss - expected_loss)))


def s5_ar_nll_error(model, vocab: int, length: int, expected) -> float:
    """Library ``ar_nll`` with causal logits read at the AR states vs the engine's AR NLL."""
    import jax.numpy as jnp

    from dfm.losses import ar_nll

    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    logits = np.empty(x1s.shape + (vocab,))
    for t in range(length):
        idx = tb.state_index(np.where(np.arange(length)[None, :] < t, x1s, vocab), vocab)
        logits[:, t, :] = np.log(model[idx, t, :])
    with _x64():
        out = np.asarray(ar_nll(jnp.asarray(logits), jnp.asarray(x1s)))
    if out.dtype != np.float64:
        return float("inf")
    return float(np.max(np.abs(out - expected)))


def s7_step_error(coord_post, kappa_t, d_kappa_t, h: float, vocab: int, with_mask: bool, expected_kernel) -> float:
    """One Euler step from the library's ``posterior_to_velocity`` with rate ``min(1, h kappa' / (1 - kappa))``
    (product over coordinates of delta + u^i) vs the engine's Euler kernel."""
    import jax.numpy as jnp

    from dfm.velocities import posterior_to_velocity

    length = coord_post.shape[1]
    xs = tb.enumerate_states(vocab, length, with_mask=with_mask)
    alive = coord_post.sum(-1).min(-1) > 0
    rate = np.minimum(1.0, h * d_kappa_t / (1.0 - kappa_t))
    s = vocab + 1 if with_mask else vocab
    factors = np.eye(s)[xs].copy()
    with _x64():
        u = posterior_to_velocity(jnp.asarray(coord_post[alive]), jnp.asarray(xs[alive]), jnp.asarray(rate),
                                  mask_id=vocab if with_mask else None)
        u = np.asarray(u)
    if u.dtype != np.float64:
        return float("inf")
    factors[alive] += u
    kern = tb.product_kernel(factors, vocab, with_mask)
    return float(np.max(np.abs(kern[:, alive] - expected_kernel[:, alive])))


def s7_rates_error(name: str, num_steps: int, length: int, kappa_expected, rate_expected) -> float:
    """Library ``discretize(...).kappa`` and ``euler_rates`` vs the engine's tables for kappa = t or t^2."""
    from dfm.samplers import euler_rates
    from dfm.schedules import LinearScheduler, PolynomialScheduler, discretize

    scheduler = LinearScheduler() if name == "kappa=t" else PolynomialScheduler(2.0)
    with _x64():
        kap = np.asarray(discretize(scheduler, length, num_steps).kappa)
        rates = np.asarray(euler_rates(scheduler, length, num_steps))
    if kap.dtype != np.float64 or rates.dtype != np.float64:
        return float("inf")
    return float(max(np.max(np.abs(kap - kappa_expected)), np.max(np.abs(rates - rate_expected))))
