"""Ensembles inside the library's sampler, checked against the enumeration (THEORY S8, S9), float64.

``dfm.decentral.ensemble_posterior_fn`` mixes K expert posterior functions with a router at every step of
``dfm.samplers.sample_discrete`` (inside ``jax.jit``, ``lax.scan``). Here every expert's posterior function
looks up its exact denoiser table by state index, the router is

* S8: ``CallableRouter`` looking up the exact router table ``rho_t(k | x)`` (random masked schedule,
  ``dfm.schedules.from_kappa``),
* S9: ``BayesFilterRouter.from_priors(w)`` updated by the ensemble from the revealed tokens
  (``dfm.schedules.autoregressive(L)``),

(``available=``: the experts that may be used, a static mask, for row S8.avail) and the ensemble's posterior
function is wrapped: at every step it compares the mixed log-probs it returns
at the visited states (``BATCH`` trajectories from the all-mask source ``dfm.paths.mask_source``) with the
exact mixture denoiser (table lookup by state index), accumulates the max abs error of the probabilities and
the number of compared states in the scan carry, and reports them at the last step through
``jax.debug.callback``.

On a masked path the path factor ``p_t(x | x1)`` is the same for every ``x1`` consistent with ``x``, so the
exact denoisers and the router do not depend on t on the support: the tables are computed once per case
(at kappa = 1/2) and a state is compared at step t iff ``p_t(x) > 0``. Tables are jit arguments and every case
is padded to one shape, so each sampler compiles once per run: vocab 4 (the mask is token 4; tokens >= vocab
have probability 0), length 4 (extra coordinates whose data value is 0 with probability 1; on the random
schedule they are revealed at the first step), ``K_PAD`` experts (weight 0), ``T_PAD`` steps (kappa = 1 after
the last step: nothing moves).
"""
from __future__ import annotations

import functools

import numpy as np

from dfm import tabular as tb
from proofs_check.library import jit_once, float64_mode, maxdiff, worst

V_PAD = 4
L_PAD = 4
MASK = V_PAD
K_PAD = 4
T_PAD = 5  # random_schedule draws T in 1..5
BATCH = 64

_ERRORS: list = []
_SCHEDULES: dict = {}  # autoregressive(L_PAD), built once


def _collect(err, count) -> None:
    _ERRORS.append((float(err), int(count)))


def _index(x_t):
    import jax.numpy as jnp

    length = x_t.shape[1]
    weights = (V_PAD + 1) ** np.arange(length - 1, -1, -1)
    return jnp.sum(x_t.astype(jnp.int32) * jnp.asarray(weights, jnp.int32), axis=-1)


def _expert(tables, k: int):
    """Expert k's posterior function: its exact denoiser at ``x_t`` (table lookup), rows ``positions``."""
    import jax.numpy as jnp

    def posterior_fn(x_t, t, positions, state):
        log_p = jnp.log(tables[k][_index(x_t)])  # [batch, L, V]
        return jnp.take(log_p, positions, axis=1), state

    return posterior_fn


def _checked(posterior_fn, mix_tab, alive_tab, last_step: int):
    """Wrap a posterior function: compare its output at the visited states with the exact mixture denoiser.

    The wrapper's state is ``(inner state, (max error, compared count))``: the error is accumulated in the scan
    carry and reported once, at step ``last_step``, by ``jax.debug.callback`` (one callback per run, not per
    step: a callback costs more than the rest of a step)."""
    import jax
    import jax.numpy as jnp

    def wrapped(x_t, t, positions, state):
        inner, (acc_err, acc_count) = state
        out, inner = posterior_fn(x_t, t, positions, inner)
        idx = _index(x_t)
        exact = jnp.take(mix_tab[idx], positions, axis=1)
        alive = alive_tab[t, idx]
        diff = jnp.abs(jnp.exp(out) - exact)
        diff = jnp.where(jnp.isnan(diff), jnp.inf, diff)
        acc_err = jnp.maximum(acc_err, jnp.max(jnp.where(alive[:, None, None], diff, 0.0)))
        acc_count = acc_count + jnp.sum(alive, dtype=acc_count.dtype)
        jax.lax.cond(t == last_step, lambda e, c: jax.debug.callback(_collect, e, c), lambda e, c: None,
                     acc_err, acc_count)
        return out, (inner, (acc_err, acc_count))

    return wrapped


def _start(inner, dtype):
    import jax.numpy as jnp

    return inner, (jnp.zeros((), dtype), jnp.zeros((), jnp.int32))


def _available(available):
    return None if available is None else np.asarray(available, bool)


def s8_sample(seed, schedule, expert_tabs, router_tab, mix_tab, alive_tab, available=None):
    import jax

    from dfm.decentral import CallableRouter, ensemble_init_state, ensemble_posterior_fn
    from dfm.paths import mask_source
    from dfm.samplers import sample_discrete

    length = schedule.kappa.shape[1]
    router = CallableRouter(lambda x_t, t: router_tab[_index(x_t)], K_PAD)
    ens = ensemble_posterior_fn([_expert(expert_tabs, k) for k in range(K_PAD)], router, mask_id=MASK,
                                available=_available(available))
    state = ensemble_init_state(router, [None] * K_PAD, batch=BATCH, num_moving=schedule.max_moves, vocab=V_PAD,
                                dtype=expert_tabs.dtype)
    return sample_discrete(jax.random.key(seed), _checked(ens, mix_tab, alive_tab, T_PAD - 1), schedule,
                           mask_source((BATCH, length), MASK), mask_id=MASK, state=_start(state, expert_tabs.dtype))


def s9_sample(seed, schedule, router, expert_tabs, mix_tab, alive_tab, available=None):
    import jax

    from dfm.decentral import ensemble_init_state, ensemble_posterior_fn
    from dfm.paths import mask_source
    from dfm.samplers import sample_discrete

    length = schedule.kappa.shape[1]
    ens = ensemble_posterior_fn([_expert(expert_tabs, k) for k in range(K_PAD)], router, mask_id=MASK,
                                available=_available(available))
    state = ensemble_init_state(router, [None] * K_PAD, batch=BATCH, num_moving=schedule.max_moves, vocab=V_PAD,
                                dtype=expert_tabs.dtype)
    return sample_discrete(jax.random.key(seed), _checked(ens, mix_tab, alive_tab, L_PAD - 1), schedule,
                           mask_source((BATCH, length), MASK), mask_id=MASK, state=_start(state, expert_tabs.dtype))


def denoiser_tables(w, experts, vocab: int, length: int):
    """Exact tables of the masked path at kappa = 1/2 (every consistent state reachable), on the real states:
    ``(coord_k [K, M, L, V], rho [M, K], coord [M, L, V], alive [M])``."""
    half = np.full(length, 0.5)
    paths, coords = [], []
    for e in experts:
        post, marg = tb.posterior_at(half, e[None], vocab, True)
        paths.append(marg)
        coords.append(tb.coordinate_posteriors_from(post, vocab, length))
    q = w @ experts
    post, marg = tb.posterior_at(half, q[None], vocab, True)
    return np.stack(coords), tb.router(w, np.stack(paths)), tb.coordinate_posteriors_from(post, vocab, length), marg > 0


@functools.lru_cache(maxsize=None)
def _embedding(vocab: int, length: int):
    """``(digits [625, 4], inside [625], ridx [625])``: the padded states (values 0..4, 4 = mask), whether one
    belongs to the padded problem of a (vocab, length) case, and the index of its real part."""
    digits = tb.enumerate_states(V_PAD, L_PAD)
    real, dummy = digits[:, :length], digits[:, length:]
    inside = np.all((real < vocab) | (real == MASK), axis=1) & np.all((dummy == 0) | (dummy == MASK), axis=1)
    ridx = np.where(real == MASK, vocab, real) @ ((vocab + 1) ** np.arange(length - 1, -1, -1))
    return digits, inside, np.where(inside, ridx, 0)


def padded_tables(coord_k, rho, coord, vocab: int, length: int, kappa_pad):
    """The tables on the padded problem: states ``[0, 5)^4`` (vocab 4, mask 4, length 4), K_PAD experts.

    A case of vocab v < 4 has tokens v..3 of probability 0; a case of length n < 4 gets coordinates n..3 whose
    data value is 0 with probability 1 for every expert (the padded laws are ``q_k ⊗ delta_0``). Rows of states
    outside the padded problem, or unreachable for an expert, hold the uniform distribution over the real
    tokens (router weight 1/K where the mixture is unreachable). ``kappa_pad [T + 1, 4]``: the padded schedule;
    returns ``(experts [K_PAD, M, 4, 4], router [M, K_PAD], mix [M, 4, 4], alive [T, M])`` with ``alive[t, x]``
    iff ``p_t(x) > 0`` (``p_t(x) = Q(x) prod_i (kappa_t^i if x^i revealed else 1 - kappa_t^i)`` on a masked path,
    ``Q(x)`` the data mass consistent with x)."""
    k = coord_k.shape[0]
    digits, inside, ridx = _embedding(vocab, length)
    uniform = np.zeros(V_PAD)
    uniform[:vocab] = 1.0 / vocab
    delta0 = np.eye(V_PAD)[0]
    m_pad = digits.shape[0]

    def embed(table):  # [..., M_real, n, v] -> [..., M_pad, 4, 4]
        out = np.broadcast_to(uniform, table.shape[:-3] + (m_pad, L_PAD, V_PAD)).copy()
        out[..., length:, :] = delta0
        out[..., inside, :length, :vocab] = table[..., ridx[inside], :, :]
        return out

    experts = np.broadcast_to(embed(np.full((1,) + coord_k.shape[1:], 1.0 / vocab))[0],
                              (K_PAD, m_pad, L_PAD, V_PAD)).copy()
    experts[:k] = embed(np.where(coord_k.sum(-1, keepdims=True) > 0, coord_k, 1.0 / vocab))
    mix = embed(coord)
    live = inside & (rho.sum(1)[ridx] > 0)
    router = np.zeros((m_pad, K_PAD))
    router[:, :k] = 1.0 / k
    router[live, :k] = rho[ridx[live]]
    masked = digits == MASK
    alive = np.stack([live & np.all(np.where(masked, kap < 1.0, kap > 0.0), axis=1) for kap in kappa_pad[:-1]])
    return experts, router, mix, alive


def run_checked(fn, *args) -> tuple[float, int]:
    import jax

    _ERRORS.clear()
    with float64_mode():
        out = fn(*args)
        jax.block_until_ready(out)
        jax.effects_barrier()
    errs = list(_ERRORS)
    _ERRORS.clear()
    if not errs:
        return float("inf"), 0
    return worst(*(e for e, _ in errs)), sum(c for _, c in errs)


def s8_ensemble_error(seed: int, w, experts, kappa, vocab: int, length: int, rho_t=None, alive_t=None):
    """``(error, compared states)`` of the S8 ensemble in ``sample_discrete`` on the masked schedule ``kappa``
    (padded to T_PAD steps and length 4, see :func:`padded_tables`). ``rho_t [M, K]`` / ``alive_t [M]``: the
    enumeration's router at the case's step (mask source), compared with the table (which does not depend on t
    on the support)."""
    from dfm.schedules import from_kappa

    coord_k, rho, coord, _ = denoiser_tables(w, experts, vocab, length)
    steps = kappa.shape[0] - 1
    kap = np.ones((T_PAD + 1, L_PAD))
    kap[0] = 0.0
    kap[:steps + 1, :length] = kappa
    experts_pad, router_pad, mix_pad, alive = padded_tables(coord_k, rho, coord, vocab, length, kap)
    with float64_mode():
        schedule = from_kappa(kap, max_moves=L_PAD)
    err, count = run_checked(jit_once(s8_sample), np.uint32(seed), schedule, experts_pad, router_pad, mix_pad, alive)
    if rho_t is not None:
        err = worst(err, maxdiff(rho_t[alive_t], rho[alive_t]))
    return err, count


def s9_ensemble_error(seed: int, w, experts, vocab: int, length: int):
    """``(error, compared states)`` of the S9 ensemble (Bayes filter) in ``sample_discrete`` under
    ``autoregressive(4)`` (the case padded to length 4, see :func:`padded_tables`): at every visited state its
    output equals ``q(next | prefix)``."""
    from dfm.decentral import BayesFilterRouter
    from dfm.schedules import autoregressive

    coord_k, rho, coord, _ = denoiser_tables(w, experts, vocab, length)
    kap = (np.arange(L_PAD)[None, :] < np.arange(L_PAD + 1)[:, None]).astype(np.float64)
    experts_pad, _, mix_pad, alive = padded_tables(coord_k, rho, coord, vocab, length, kap)
    with float64_mode():  # from_priors makes a jax array: float64 only under x64
        if "ar" not in _SCHEDULES:
            _SCHEDULES["ar"] = autoregressive(L_PAD)
        router = BayesFilterRouter.from_priors(np.concatenate([w, np.zeros(K_PAD - w.shape[0])]))
    schedule = _SCHEDULES["ar"]
    return run_checked(jit_once(s9_sample), np.uint32(seed), schedule, router, experts_pad, mix_pad, alive)
