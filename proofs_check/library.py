"""Cross-checks of the JAX library against the exact enumeration (float64 via ``jax.enable_x64``).

For the statements whose formula the library implements:
* S1, S2: ``dfm.velocities.validity_error`` and ``continuity_residual``,
* S4: ``dfm.velocities.conditional_velocity`` and ``posterior_to_velocity`` (per-coordinate velocities),
* S5(d), S5(e): ``dfm.losses.dfm_cross_entropy`` summed over steps and ``dfm.losses.ar_nll``,
* S7: ``dfm.samplers.euler_rates`` and ``dfm.schedules.discretize`` (Euler rates, kappa tables), and
  ``posterior_to_velocity`` with the Euler rate as one Euler step.
Each function returns the max abs error against the tabular engine on one case. Library functions are
jitted once per shape: batches are padded to a size fixed by (vocab, length), so each (vocab, length,
source) compiles once per run (the library's input checks run on concrete arrays only, so they are
skipped inside jit; the inputs here are valid by construction).
"""
from __future__ import annotations

import functools

import numpy as np

from dfm import tabular as tb

_JITTED: dict = {}


def _jit(fn, **static):
    """``jax.jit(partial(fn, **static))``, cached per (fn, static kwargs)."""
    key = (fn, tuple(sorted(static.items())))
    if key not in _JITTED:
        import jax

        _JITTED[key] = jax.jit(functools.partial(fn, **static))
    return _JITTED[key]


def _pad(arr, size: int, fill) -> np.ndarray:
    """Pad the leading axis of ``arr`` to ``size`` rows with ``fill``."""
    arr = np.asarray(arr)
    out = np.full((size,) + arr.shape[1:], fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


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


def record(tracker, label: str, fn, *args) -> None:
    """``tracker.error(fn(*args), label)``; an exception from the library is recorded as a failure of the row
    (so a library bug or API change shows up as FAIL with its message instead of aborting the run)."""
    try:
        tracker.error(fn(*args), label)
    except Exception as err:  # noqa: BLE001 - reported, not swallowed
        tracker.fail(f"{label}: library raised {type(err).__name__}: {err}")


def _x64():
    import jax

    return jax.enable_x64(True)


def s4_errors(xs, coord_post, alive, rate, vocab: int, with_mask: bool, x1, x0) -> float:
    """Library vs engine: marginal velocity ``r (p_{1|t} - delta)`` on reachable states, and the conditional
    velocity: on every state with a mask source (0 on revealed coordinates, THEORY S4), on the support of
    ``p_t(. | x0, x1)`` with a uniform source (off it the S4 formula is not defined)."""
    from dfm.velocities import conditional_velocity, posterior_to_velocity

    s = vocab + 1 if with_mask else vocab
    expected = tb.coordinate_velocity(coord_post, rate, vocab, with_mask=with_mask)[alive]
    src = np.full(xs.shape[1], vocab) if x0 is None else np.asarray(x0)
    on_support = np.all((xs == x1[None]) | (xs == src[None]), axis=1)
    eye = np.eye(s)
    movable = (xs == src[None]) & (xs != x1[None])
    cond_expected = rate[None, :, None] * movable[..., None] * (eye[x1][None] - eye[xs])
    post = np.where(alive[:, None, None], coord_post, 1.0 / vocab)  # unreachable rows: any distribution
    with _x64():
        u = _jit(posterior_to_velocity, mask_id=vocab if with_mask else None)(post, xs, rate)
        cu = _jit(conditional_velocity, num_states=s, mask_id=vocab if with_mask else None)(
            xs, np.broadcast_to(x1, xs.shape), rate)
        u, cu = np.asarray(u), np.asarray(cu)
    if u.dtype != np.float64 or cu.dtype != np.float64:
        return float("inf")
    err = np.max(np.abs(u[alive] - expected)) if expected.size else 0.0
    compared = np.ones_like(on_support) if with_mask else on_support
    err_c = np.max(np.abs(cu[compared] - cond_expected[compared]))
    return float(max(err, err_c))


def s5_loss_error(model, kappa, vocab: int, expected_loss) -> float:
    """Library ``sum_t E_{x_t ~ p_t(.|x1)} dfm_cross_entropy`` vs the engine's loss, for every x1 (one batched call)."""
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
    rows = ix.shape[0]
    size = max(max(length, 5) * d * 2**length, 1 << (rows - 1).bit_length())  # fixed per (vocab, length)
    logits = _pad(np.log(model[ix]), size, 0.0)
    with _x64():
        ce = _jit(dfm_cross_entropy, mask_id=vocab)(
            logits, _pad(x1s[ix1], size, 0), _pad(xs[ix], size, vocab),
            _pad(np.concatenate(rows_rate), size, 0.0))
        ce = np.asarray(ce)[:rows]
    if ce.dtype != np.float64:
        return float("inf")
    loss = np.zeros(d)
    np.add.at(loss, ix1, np.concatenate(weights) * ce)
    return float(np.max(np.abs(loss - expected_loss)))


def s5_ar_nll_error(model, vocab: int, length: int, expected) -> float:
    """Library ``ar_nll`` with causal logits read at the AR states vs the engine's AR NLL."""
    from dfm.losses import ar_nll

    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    logits = np.empty(x1s.shape + (vocab,))
    for t in range(length):
        idx = tb.state_index(np.where(np.arange(length)[None, :] < t, x1s, vocab), vocab)
        logits[:, t, :] = np.log(model[idx, t, :])
    with _x64():
        out = np.asarray(_jit(ar_nll)(logits, x1s))
    if out.dtype != np.float64:
        return float("inf")
    return float(np.max(np.abs(out - expected)))


def s7_step_error(coord_post, kappa_t, d_kappa_t, h: float, vocab: int, with_mask: bool, expected_kernel) -> float:
    """One Euler step from the library's ``posterior_to_velocity`` with rate ``min(1, h kappa' / (1 - kappa))``
    (product over coordinates of delta + u^i) vs the engine's Euler kernel."""
    from dfm.velocities import posterior_to_velocity

    length = coord_post.shape[1]
    xs = tb.enumerate_states(vocab, length, with_mask=with_mask)
    alive = coord_post.sum(-1).min(-1) > 0
    rate = np.minimum(1.0, h * d_kappa_t / (1.0 - kappa_t))
    s = vocab + 1 if with_mask else vocab
    factors = np.eye(s)[xs].copy()
    post = np.where(alive[:, None, None], coord_post, 1.0 / vocab)
    with _x64():
        u = np.asarray(_jit(posterior_to_velocity, mask_id=vocab if with_mask else None)(post, xs, rate))
    if u.dtype != np.float64:
        return float("inf")
    factors[alive] += u[alive]
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


PAD_STATES = 40  # S1/S2 draw M in [2, 40): pad to one shape, so each library function compiles once


def _pad_square(u, size: int) -> np.ndarray:
    out = np.zeros((size, size))
    out[: u.shape[0], : u.shape[1]] = u
    return out


def s1_errors(u_valid, u_bad) -> float:
    """Library ``validity_error`` (rows of ``u.T`` are per-state velocities) vs the engine's
    ``velocity_validity_error`` on a valid and an invalid velocity; ``inf`` if the library calls the
    invalid one valid (error <= 1e-12) or the valid one invalid."""
    from dfm.velocities import validity_error

    fn = _jit(validity_error)
    x_t = np.arange(PAD_STATES)
    with _x64():
        lib_valid = float(fn(_pad_square(np.asarray(u_valid).T, PAD_STATES), x_t))
        lib_bad = float(fn(_pad_square(np.asarray(u_bad).T, PAD_STATES), x_t))
    err = max(abs(lib_valid - tb.velocity_validity_error(u_valid)), abs(lib_bad - tb.velocity_validity_error(u_bad)))
    if not lib_bad > 1e-12 or lib_valid > 1e-12:
        return float("inf")
    return float(err)


def s2_error(p_t, p_next, u) -> float:
    """Library ``continuity_residual`` vs the engine's divergence-form residual (THEORY S2)."""
    from dfm.velocities import continuity_residual

    m = len(p_t)
    with _x64():
        res = np.asarray(_jit(continuity_residual)(_pad(np.asarray(p_t), PAD_STATES, 0.0),
                                                    _pad(np.asarray(p_next), PAD_STATES, 0.0),
                                                    _pad_square(np.asarray(u), PAD_STATES)))
    if res.dtype != np.float64:
        return float("inf")
    return float(np.max(np.abs(res[:m] - tb.continuity_residual_divergence(p_t, p_next, u))))
