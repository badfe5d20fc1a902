"""Row S7.law: the law of what the library's random functions actually draw (THEORY S4-S7), by sampling.

The other rows check the sampler's kernel ``transition_probabilities`` on its own and the mixed posterior at
visited states; this row runs the library's samplers end to end and compares the empirical law of their
draws with the exact law (numpy enumeration, :mod:`dfm.tabular`), at every step:

* ``dfm.samplers.sample_discrete`` with the exact denoiser (a table looked up by state index), a random
  masked kappa table (``dfm.schedules.from_kappa``), mask source (``dfm.paths.mask_source``) at temperature
  1 and 0.5 (posterior ``p^(1/tau)`` normalized), and uniform source (``dfm.paths.uniform_source``, the
  time-dependent denoiser);
* ``dfm.samplers.sample_euler`` (linear and cosine schedulers);
* ``dfm.paths.sample_masked_path`` and ``sample_path``: ``x_t ~ p_t(. | x_1)`` with ``x_1 ~ q``.

The exact law of the states ``X_t`` (t = 1..T) is propagated with THEORY S4's per-coordinate kernel written
out in numpy (:func:`proofs_check.library_kernels.factor_formula`, product over coordinates), with the same
convention as the posterior table at unreachable states (uniform posterior), so it is the law of what the
library should draw everywhere. Each step's empirical law of ``N`` draws is compared by Pearson's chi-square
test (cells of expected count < 5 merged, smallest first; a draw of probability 0 fails at once); the row
FAILs when a p-value is below ``P_MIN``. This is a statistical check: a correct library fails a given test
with probability at most ``P_MIN`` (at most ``tests * P_MIN`` per run; the draws are seeded, so a run is
reproducible). Sizes are fixed (vocab 3, length 3, 64 states, T <= 5 padded to ``T_PAD`` steps), so each
sampler compiles once per run.
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.stats

from dfm import tabular as tb
from proofs_check.cases import random_dist, random_schedule
from proofs_check.library import float64_mode, jit_once
from proofs_check.library_kernels import factor_formula
from proofs_check.report import Tracker
from proofs_check.schedulers import euler_rates

V, L = 3, 3
MASK = V
T_PAD = 5
EULER_T = 6
N = 8192
P_MIN = 1e-7
MAX_CASES = 250
KINDS = ("discrete, mask, tau 1", "discrete, mask, tau 0.5", "discrete, uniform source", "euler")


def chi_square_pvalue(counts, probs) -> float:
    """Pearson chi-square p-value of ``counts [C]`` against ``probs [C]``; cells with expected count < 5 are
    merged (smallest first) until every group expects >= 5; a count on a cell of probability 0 gives 0."""
    counts = np.asarray(counts, np.float64)
    probs = np.asarray(probs, np.float64)
    if np.any((probs <= 1e-300) & (counts > 0)):
        return 0.0
    n = counts.sum()
    live = probs > 1e-300
    exp, obs = n * probs[live], counts[live]
    order = np.argsort(exp)
    groups_e, groups_o, acc_e, acc_o = [], [], 0.0, 0.0
    for j in order:
        acc_e += exp[j]
        acc_o += obs[j]
        if acc_e >= 5.0:
            groups_e.append(acc_e)
            groups_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0 and groups_e:
        groups_e[-1] += acc_e
        groups_o[-1] += acc_o
    if len(groups_e) < 2:
        return 1.0
    e, o = np.array(groups_e), np.array(groups_o)
    return float(scipy.stats.chi2.sf(np.sum((o - e) ** 2 / e), e.size - 1))


def _filled(post) -> np.ndarray:
    post = np.asarray(post, np.float64)
    return np.where(post.sum(-1, keepdims=True) > 0, post, 1.0 / post.shape[-1])


def _tempered(post, tau: float) -> np.ndarray:
    p = post ** (1.0 / tau)
    return p / p.sum(-1, keepdims=True)


def exact_laws(p0, posts, rates, with_mask: bool) -> np.ndarray:
    """``[T + 1, M]`` laws of ``X_0..X_T`` under per-step posterior tables ``posts [T, M, L, V]`` and rates
    ``[T, L]`` (THEORY S4's factor ``delta + r 1[movable] (p - delta)``, product over coordinates)."""
    xs = tb.enumerate_states(V, L, with_mask=with_mask)
    laws = [np.asarray(p0, np.float64)]
    for post, r in zip(posts, rates):
        kern = tb.product_kernel(factor_formula(post, xs, np.broadcast_to(r, xs.shape), V, with_mask), V, with_mask)
        laws.append(kern @ laws[-1])
    return np.stack(laws)


# ------------------------------------------------------------------------------------------------------------
# the library's samplers, jitted once per variant
# ------------------------------------------------------------------------------------------------------------
def _table_fn(log_table, base: int, time_dependent: bool):
    import jax.numpy as jnp

    radix = jnp.asarray(base ** np.arange(L - 1, -1, -1), jnp.int32)

    def posterior_fn(x_t, t, positions, state):
        idx = jnp.sum(x_t.astype(jnp.int32) * radix, axis=-1)
        table = log_table[t] if time_dependent else log_table
        return jnp.take(table[idx], positions, axis=1), state

    return posterior_fn


def _discrete_mask(key, schedule, log_table, temperature):
    from dfm.paths import mask_source
    from dfm.samplers import sample_discrete

    x0 = mask_source((N, L), MASK)
    return sample_discrete(key, _table_fn(log_table, V + 1, False), schedule, x0, temperature=temperature,
                           mask_id=MASK, return_intermediates=True)[1]


def _discrete_uniform(key, schedule, log_tables):
    import jax

    from dfm.paths import uniform_source
    from dfm.samplers import sample_discrete

    k0, k1 = jax.random.split(key)
    x0 = uniform_source(k0, (N, L), V)
    return sample_discrete(k1, _table_fn(log_tables, V, True), schedule, x0, return_intermediates=True)[1]


def _euler(key, log_table, scheduler):
    from dfm.paths import mask_source
    from dfm.samplers import sample_euler

    return sample_euler(key, _table_fn(log_table, V + 1, False), scheduler, mask_source((N, L), MASK), EULER_T,
                        mask_id=MASK, return_intermediates=True)[1]


def _paths(key, x1, x0, kappa_t):
    import jax

    from dfm.paths import sample_masked_path, sample_path

    k0, k1 = jax.random.split(key)
    return sample_masked_path(k0, x1, kappa_t, MASK), sample_path(k1, x0, x1, kappa_t)


def _log(p):
    with np.errstate(divide="ignore"):
        return np.log(p)


@functools.lru_cache(maxsize=None)
def _euler_scheduler(name: str):
    from proofs_check.schedulers import library_scheduler

    return library_scheduler(name)


def _counts(states, with_mask: bool) -> np.ndarray:
    states = np.asarray(states)
    m = (V + 1) ** L if with_mask else V**L
    return np.stack([np.bincount(tb.state_index(s, V, with_mask=with_mask), minlength=m) for s in states])


# ------------------------------------------------------------------------------------------------------------
# the row
# ------------------------------------------------------------------------------------------------------------
def check_law(rng, cases: int, library: bool = False):
    """S7.law: per case one sampler variant (``KINDS``, in turn) on a random q and schedule; the chi-square
    p-value of every step's draws against the exact law must be >= ``P_MIN``. Without ``library`` the draws
    come from numpy's Generator with the exact laws (a check of the test itself)."""
    tr = Tracker()
    lrng = rng.spawn(1)[0]
    used = min(cases, MAX_CASES)
    min_p, tests = {k: 1.0 for k in KINDS + ("paths",)}, 0
    for c in range(used):
        kind = KINDS[c % len(KINDS)]
        q = random_dist(rng, V**L)
        mask_post = _filled(tb.coordinate_posteriors(q, np.array([[0.0] * L, [0.5] * L, [1.0] * L]), 1, V))
        key_seed = int(lrng.integers(2**31))
        if kind == "euler":
            name = ("kappa=t", "cosine")[(c // len(KINDS)) % 2]
            rates = np.repeat(euler_rates(name, EULER_T)[:, None], L, axis=1)
            steps = EULER_T
            laws = exact_laws(tb.point_mass(tb.mask_index(V, L), (V + 1) ** L), [mask_post] * steps, rates, True)
            label = f"case {c} ({kind} {name}, T {steps})"
        else:
            kappa = random_schedule(rng, L)
            steps = kappa.shape[0] - 1
            kap = np.ones((T_PAD + 1, L))
            kap[:steps + 1] = kappa
            rates = tb.rates(kap)
            label = f"case {c} ({kind}, T {steps})"
            if kind == "discrete, uniform source":
                src = np.full(V**L, 1.0 / V**L)
                posts = np.stack([_filled(tb.coordinate_posteriors(q, kap, t, V, source=src)) for t in range(T_PAD)])
                laws = exact_laws(src, posts, rates, False)
            else:
                tau = 0.5 if kind.endswith("0.5") else 1.0
                posts = [_tempered(mask_post, tau)] * T_PAD
                laws = exact_laws(tb.point_mass(tb.mask_index(V, L), (V + 1) ** L), posts, rates, True)
        with_mask = kind != "discrete, uniform source"
        if library:
            euler = kind == "euler"
            xs = _library_draws(kind, key_seed, None if euler else kap, mask_post, q, name if euler else None)
            if xs is None:
                tr.fail(f"{label}: library draws are not float64 / int")
                continue
            counts = _counts(xs[1:steps + 1], with_mask)
        else:
            gen = np.random.default_rng(key_seed)
            counts = np.stack([gen.multinomial(N, laws[t] / laws[t].sum()) for t in range(1, steps + 1)])
        for t in range(1, steps + 1):
            p = chi_square_pvalue(counts[t - 1], laws[t])
            tests += 1
            min_p[kind] = min(min_p[kind], p)
            tr.require(p >= P_MIN, f"{label}: step {t}: chi-square p-value {p:.2e} < {P_MIN:.0e}")
        if library and kind in ("discrete, mask, tau 1", "discrete, uniform source"):
            p = _path_pvalue(kind, key_seed, q, kap[min(1, steps)], rng=lrng)
            tests += 1
            min_p["paths"] = min(min_p["paths"], p)
            tr.require(p >= P_MIN, f"{label}: {'sample_masked_path' if with_mask else 'sample_path'} p-value {p:.2e}")
        tr.cases += 1
    extra = [f"{tests} chi-square tests ({N} draws each, vocab {V}, length {L}); smallest p-value per kind: "
             + ", ".join(f"{k}: {v:.2e}" for k, v in min_p.items()) + f" (FAIL below {P_MIN:.0e}; a correct sampler "
             f"fails a test with probability <= {P_MIN:.0e}, so <= {tests * P_MIN:.1e} per run; seeded)"]
    if cases > used:
        extra.append(f"{used} of the {cases} cases requested (the row's cap: {MAX_CASES})")
    if library:
        extra.append("library: dfm.samplers.sample_discrete (from_kappa schedules, mask source at tau 1 and 0.5, "
                     "uniform source with dfm.paths.uniform_source), dfm.samplers.sample_euler (LinearScheduler, "
                     "CosineScheduler), dfm.paths.sample_masked_path and sample_path: the law of X_t at every step "
                     "against the exact law (float64)")
        method = "sampling + enumeration + library"
    else:
        extra.append("no library: the same tests on numpy draws from the exact laws (checks the test only)")
        method = "sampling + enumeration"
    return tr.row("S7.law", "samplers draw the law of S4-S7 (chi-square, every step)", method, extra,
                  {"min_p_value": min_p, "tests": tests})


def _library_draws(kind, seed, kap, mask_post, q, name):
    import jax

    from dfm.schedules import from_kappa

    key = jax.random.key(seed)
    with float64_mode():
        if kind == "euler":
            xs = jit_once(_euler, scheduler=_euler_scheduler(name))(key, _log(mask_post))
        else:
            schedule = from_kappa(kap, max_moves=L)
            if kind == "discrete, uniform source":
                src = np.full(V**L, 1.0 / V**L)
                tables = np.stack([_filled(tb.coordinate_posteriors(q, kap, t, V, source=src)) for t in range(T_PAD)])
                xs = jit_once(_discrete_uniform)(key, schedule, _log(tables))
            else:
                tau = 0.5 if kind.endswith("0.5") else 1.0
                xs = jit_once(_discrete_mask, temperature=tau)(key, schedule, _log(mask_post))
        xs = np.asarray(xs)
    return xs if np.issubdtype(xs.dtype, np.integer) else None


def _path_pvalue(kind, seed, q, kappa_t, rng) -> float:
    """``x_1 ~ q`` (numpy), then the library's path sampler at ``kappa_t``; p-value of ``x_t`` against the
    exact marginal path law ``sum_{x_1} q(x_1) p_t(. | x_1)`` (mask source, or the uniform source with an
    independent uniform ``x_0``)."""
    import jax

    x1s = tb.enumerate_states(V, L, with_mask=False)
    x1 = x1s[rng.choice(V**L, size=N, p=q / q.sum())]
    x0 = rng.integers(V, size=(N, L))
    with float64_mode():
        masked, noised = jit_once(_paths)(jax.random.key(seed + 1), x1, x0, np.asarray(kappa_t, np.float64))
    if kind == "discrete, mask, tau 1":
        want = tb.joint_path_at(kappa_t, q[None], V, True).sum(1)
        return chi_square_pvalue(_counts(np.asarray(masked)[None], True)[0], want)
    want = tb.joint_path_at(kappa_t, np.full(V**L, 1.0 / V**L)[:, None] * q[None], V, False).sum(1)
    return chi_square_pvalue(_counts(np.asarray(noised)[None], False)[0], want)
