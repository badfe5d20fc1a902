"""Cross-checks of the JAX library against the exact enumeration (float64 via ``jax.enable_x64``).

This module holds the shared helpers (``jit_once``, ``pad_rows``, ``bucket``, ``record``, ``float64_mode``) and the checks of
the per-coordinate formulas:
* S1, S2: ``dfm.velocities.validity_error`` and ``continuity_residual``,
* S4: ``dfm.velocities.conditional_velocity`` and ``posterior_to_velocity`` (per-coordinate velocities, on
  every state: exact posteriors on reachable states, random ones elsewhere, against the formula),
* S5(d), S5(e): ``dfm.losses.dfm_cross_entropy`` summed over steps and ``dfm.losses.ar_nll``,
* S6, S7: ``dfm.schedules.discretize`` (kappa tables, rates) and ``dfm.samplers.euler_rates`` of the library's
  schedulers against the numpy tables of :mod:`proofs_check.schedulers`.
The sampler's own kernel (``dfm.samplers.transition_probabilities``: S5(c), S6, S7) and the joint kernels of
S3 are in :mod:`proofs_check.library_kernels`; routers, mixtures and ensembles (S8-S13) in
:mod:`proofs_check.library_decentral` and :mod:`proofs_check.library_ensemble`.
Each function returns the max abs error against the tabular engine on one case (``inf`` when the library
returns another dtype than float64 or contradicts a required property). Library functions are jitted once
per shape: batches are padded to sizes fixed by (vocab, length) or to power-of-two buckets, so each shape
compiles once per run (the library's input checks run on concrete arrays only, so they are skipped inside
jit; the inputs here are valid by construction).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from dfm import tabular as tb

JITTED: dict = {}


def jit_once(fn, **static):
    """``jax.jit(partial(fn, **static))``, cached per (fn, static kwargs)."""
    key = (fn, tuple(sorted(static.items())))
    if key not in JITTED:
        import jax

        JITTED[key] = jax.jit(functools.partial(fn, **static))
    return JITTED[key]


def pad_rows(arr, size: int, fill) -> np.ndarray:
    """Pad the leading axis of ``arr`` to ``size`` rows with ``fill``."""
    arr = np.asarray(arr)
    out = np.full((size,) + arr.shape[1:], fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def bucket(n: int, minimum: int = 256) -> int:
    """The padded batch size for ``n`` rows: the next power of two ``>= max(n, minimum)``."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def maxdiff(got, expected=0.0) -> float:
    """``max |got - expected|`` (0 when empty); equal infinities count as equal, NaN (or unequal infinities) as
    ``inf``, so that a NaN from the library can never be lost in a ``max``."""
    a = np.asarray(got, dtype=np.float64)
    b = np.broadcast_to(np.asarray(expected, dtype=np.float64), a.shape)
    if a.size == 0:
        return 0.0
    same = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(a - b))
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max())


def worst(*values) -> float:
    """``max`` of error values with NaN counted as ``inf``."""
    out = 0.0
    for v in values:
        v = float(v)
        if math.isnan(v):
            return math.inf
        out = max(out, v)
    return out


def available() -> tuple[bool, str]:
    """Whether the library can be checked: ``(False, reason)`` when a third-party dependency (jax, flax, optax,
    ...) is not installed. Any other import failure (an error inside ``dfm`` itself, e.g. a syntax error) counts
    as available, so that the library checks run and FAIL with the error instead of being skipped."""
    try:
        import dfm.decentral  # noqa: F401
        import dfm.losses  # noqa: F401
        import dfm.paths  # noqa: F401
        import dfm.samplers  # noqa: F401
        import dfm.schedules  # noqa: F401
        import dfm.velocities  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] != "dfm":
            return False, f"{type(err).__name__}: {err}"
        return True, ""  # a module missing inside dfm: the rows report it (record catches the exception)
    except Exception:  # noqa: BLE001 - a broken dfm: the rows report it (record catches the exception)
        return True, ""
    return True, ""


def record(tracker, label: str, fn, *args) -> None:
    """``tracker.error(fn(*args), label)``; an exception from the library is recorded as a failure of the row
    (so a library bug or API change shows up as FAIL with its message instead of aborting the run)."""
    try:
        tracker.error(fn(*args), label)
    except Exception as err:  # noqa: BLE001 - reported, not swallowed
        tracker.fail(f"{label}: library raised {type(err).__name__}: {err}")


def float64_mode():
    import jax

    return jax.enable_x64(True)


def velocity_formula(post, xs, rate, vocab: int, with_mask: bool) -> np.ndarray:
    """THEORY S4's marginal per-coordinate velocity, written out here (not the engine's):
    ``rate^i (p^i - delta_{x^i})`` on a movable coordinate (masked, or every coordinate without a mask) and 0
    on a revealed one; ``post [R, L, vocab]`` any distributions, ``xs [R, L]``, ``rate [L]`` or ``[R, L]``."""
    s = vocab + 1 if with_mask else vocab
    eye = np.eye(s)[xs]
    padded = np.zeros_like(eye)
    padded[..., :vocab] = post
    movable = (xs == vocab) if with_mask else np.ones(xs.shape, dtype=bool)
    r = np.broadcast_to(np.asarray(rate, dtype=np.float64), xs.shape)
    return (r * movable)[..., None] * (padded - eye)


def s4_errors(xs, coord_post, alive, rate, vocab: int, with_mask: bool, x1, x0, random_post) -> float:
    """Library vs engine, THEORY S4.

    Marginal velocity ``posterior_to_velocity`` on EVERY state: reachable states get the exact posteriors
    (compared with the engine's ``coordinate_velocity``), unreachable ones the random distributions
    ``random_post [M, L, vocab]``; all are compared with :func:`velocity_formula` (0 on revealed coordinates
    with a mask source: the posterior of a revealed coordinate is a delta only on reachable states, so a
    missing mask gating shows on the others). Conditional velocity ``conditional_velocity``: on every state
    with a mask source, on the support of ``p_t(. | x0, x1)`` with a uniform source (off it the S4 formula
    is not defined)."""
    from dfm.velocities import conditional_velocity, posterior_to_velocity

    s = vocab + 1 if with_mask else vocab
    expected = tb.coordinate_velocity(coord_post, rate, vocab, with_mask=with_mask)[alive]
    src = np.full(xs.shape[1], vocab) if x0 is None else np.asarray(x0)
    on_support = np.all((xs == x1[None]) | (xs == src[None]), axis=1)
    eye = np.eye(s)
    movable = (xs == src[None]) & (xs != x1[None])
    cond_expected = rate[None, :, None] * movable[..., None] * (eye[x1][None] - eye[xs])
    post = np.where(alive[:, None, None], coord_post, random_post)
    formula = velocity_formula(post, xs, rate, vocab, with_mask)
    # every (state, coordinate) as one row of length 1, padded to one size per vocab: one compile per
    # (vocab, source) for each function
    m, length = xs.shape
    n = m * length
    size = bucket(n, (vocab + 1) ** 4 * 4)
    x_rows = pad_rows(xs.reshape(n, 1), size, 0)
    r_rows = pad_rows(np.broadcast_to(rate, xs.shape).reshape(n, 1), size, 0.0)
    with float64_mode():
        u = jit_once(posterior_to_velocity, mask_id=vocab if with_mask else None)(
            pad_rows(post.reshape(n, 1, vocab), size, 1.0 / vocab), x_rows, r_rows)
        cu = jit_once(conditional_velocity, num_states=s, mask_id=vocab if with_mask else None)(
            x_rows, pad_rows(np.broadcast_to(x1, xs.shape).reshape(n, 1), size, 0), r_rows)
        u, cu = np.asarray(u), np.asarray(cu)
    if u.dtype != np.float64 or cu.dtype != np.float64:
        return float("inf")
    u, cu = u[:n, 0].reshape(m, length, s), cu[:n, 0].reshape(m, length, s)
    compared = np.ones_like(on_support) if with_mask else on_support
    return worst(maxdiff(u[alive], expected), maxdiff(u, formula), maxdiff(cu[compared], cond_expected[compared]))


V_PAD = L_PAD = 4  # S4-S5 draw vocab and length in 2..4


def s5_loss_error(model, kappa, vocab: int, expected_loss) -> float:
    """Library ``sum_t E_{x_t ~ p_t(.|x1)} dfm_cross_entropy`` vs the engine's loss, for every x1 (one batched call).

    Padded to vocab 4 (logit ``-inf``: probability 0), length 4 (rate 0: such terms contribute exactly 0) and
    ``mask_id = 4``, batch to a power-of-two bucket: a handful of compiles per run."""
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
    size = bucket(rows, 1024)
    logits = np.full((size, L_PAD, V_PAD), -np.inf)
    logits[..., 0] = 0.0
    logits[:rows, :length, :vocab] = np.log(model[ix])
    x1_pad = np.zeros((size, L_PAD), dtype=np.int64)
    x1_pad[:rows, :length] = x1s[ix1]
    xt_pad = np.full((size, L_PAD), V_PAD, dtype=np.int64)
    xt_pad[:rows, :length] = np.where(xs[ix] == vocab, V_PAD, xs[ix])
    rate_pad = np.zeros((size, L_PAD))
    rate_pad[:rows, :length] = np.concatenate(rows_rate)
    with float64_mode():
        ce = jit_once(dfm_cross_entropy, mask_id=V_PAD)(logits, x1_pad, xt_pad, rate_pad)
        ce = np.asarray(ce)[:rows]
    if ce.dtype != np.float64:
        return float("inf")
    loss = np.zeros(d)
    np.add.at(loss, ix1, np.concatenate(weights) * ce)
    return maxdiff(loss, expected_loss)


def s5_ar_nll_error(model, vocab: int, length: int, expected) -> float:
    """Library ``ar_nll`` with causal logits read at the AR states vs the engine's AR NLL (padded to vocab 4 with
    probability-0 tokens and length 4 with log-probability-0 positions, 256 rows: one compile)."""
    from dfm.losses import ar_nll

    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    d = x1s.shape[0]
    size = V_PAD**L_PAD
    logits = np.full((size, L_PAD, V_PAD), -np.inf)
    logits[..., 0] = 0.0
    for t in range(length):
        idx = tb.state_index(np.where(np.arange(length)[None, :] < t, x1s, vocab), vocab)
        logits[:d, t, :] = -np.inf
        logits[:d, t, :vocab] = np.log(model[idx, t, :])
    tokens = np.zeros((size, L_PAD), dtype=np.int64)
    tokens[:d, :length] = x1s
    with float64_mode():
        out = np.asarray(jit_once(ar_nll)(logits, tokens))[:d]
    if out.dtype != np.float64:
        return float("inf")
    return maxdiff(out, expected)


def scheduler_tables_error(name: str, num_steps: int, length: int) -> float:
    """Library ``discretize(scheduler, L, T)`` (``.kappa``, ``.rates()``) and ``euler_rates(scheduler, L, T)`` vs the
    numpy tables of :mod:`proofs_check.schedulers` (kappa, the discrete rates ``1 - S(t_{s+1}) / S(t_s)`` and the
    Euler rates), for the library's own scheduler of the same kappa (THEORY S6, S7)."""
    from dfm.samplers import euler_rates
    from dfm.schedules import discretize
    from proofs_check import schedulers as sc

    scheduler = sc.library_scheduler(name)
    with float64_mode():
        sched = discretize(scheduler, length, num_steps)
        kap, rates = np.asarray(sched.kappa), np.asarray(sched.rates())
        e = np.asarray(euler_rates(scheduler, length, num_steps))
    if kap.dtype != np.float64 or rates.dtype != np.float64 or e.dtype != np.float64:
        return float("inf")
    col = lambda v: np.repeat(np.asarray(v)[:, None], length, axis=1)  # noqa: E731
    return worst(maxdiff(kap, sc.kappa_table(name, num_steps, length)),
                 maxdiff(rates, col(sc.discrete_rates(name, num_steps))),
                 maxdiff(e, col(sc.euler_rates(name, num_steps))))


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

    fn = jit_once(validity_error)
    x_t = np.arange(PAD_STATES)
    with float64_mode():
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
    with float64_mode():
        res = np.asarray(jit_once(continuity_residual)(pad_rows(np.asarray(p_t), PAD_STATES, 0.0),
                                                    pad_rows(np.asarray(p_next), PAD_STATES, 0.0),
                                                    _pad_square(np.asarray(u), PAD_STATES)))
    if res.dtype != np.float64:
        return float("inf")
    return float(np.max(np.abs(res[:m] - tb.continuity_residual_divergence(p_t, p_next, u))))
