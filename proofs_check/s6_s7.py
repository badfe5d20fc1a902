"""THEORY S6 (cost of factorization: exact block identity, KL rate for kappa schedules) and
S7 (continuous-time limit: Euler identity, error rate), by exact enumeration."""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check import library as lib
from proofs_check import library_kernels as lk
from proofs_check.cases import block_kappa, random_blocks, random_dist, random_positive_dist, random_size

RATE_STEPS = (2, 4, 8, 16, 32, 64)
SCHEDULERS = {  # kappa(t), d kappa / dt on [0, 1]
    "kappa=t": (lambda s: s, lambda s: np.ones_like(s)),
    "kappa=t^2": (lambda s: s**2, lambda s: 2.0 * s),
}


def factorized_sampler_law(q, kappa, vocab: int) -> np.ndarray:
    """Law ``[M]`` of the factorized sampler driven by the exact posteriors of q (THEORY S6), from all-mask."""
    length = kappa.shape[1]
    m = (vocab + 1) ** length
    kernels = (tb.factorized_kernel(tb.coordinate_posteriors(q, kappa, t, vocab), kappa, t, vocab)
               for t in range(kappa.shape[0] - 1))
    return tb.sample_distribution(kernels, tb.point_mass(tb.mask_index(vocab, length), m))


def euler_tables(name: str, num_steps: int, length: int):
    """``(kappa [T + 1, L], d_kappa [T + 1, L], rate [T, L])`` of the Euler scheme: ``kappa(s h)`` and the jump
    probabilities ``min(1, h kappa'(s h) / (1 - kappa(s h)))``, the last one set to 1 (every coordinate still
    masked is drawn from ``p_{1|t}``: flow_matching's ``MixtureDiscreteEulerSolver`` and ``dfm.samplers``)."""
    kap_fn, dk_fn = SCHEDULERS[name]
    h = 1.0 / num_steps
    grid = np.arange(num_steps + 1) * h
    kappa = np.repeat(kap_fn(grid)[:, None], length, axis=1)
    kappa[0], kappa[-1] = 0.0, 1.0
    d_kappa = np.repeat(dk_fn(grid)[:, None], length, axis=1)
    k = kappa[:-1]
    rate = np.where(k < 1.0, np.minimum(1.0, h * d_kappa[:-1] / np.where(k < 1.0, 1.0 - k, 1.0)), 1.0)
    rate[-1] = 1.0
    return kappa, d_kappa, rate


def euler_sampler_law(q, name: str, num_steps: int, vocab: int, length: int) -> np.ndarray:
    """Law ``[M]`` of the Euler scheme with ``u = h u_cont`` and exact posteriors at ``kappa(s h)`` (THEORY S7),
    from the all-mask state; the last step reveals every remaining coordinate (see :func:`euler_tables`)."""
    kappa, d_kappa, _ = euler_tables(name, num_steps, length)
    h = 1.0 / num_steps
    p = tb.point_mass(tb.mask_index(vocab, length), (vocab + 1) ** length)
    for s in range(num_steps):
        post = tb.coordinate_posteriors(q, kappa, s, vocab)
        if s == num_steps - 1:
            kern = tb.factorized_kernel_from_rate(post, np.ones(length), vocab)
        else:
            kern = tb.euler_kernel(post, kappa[s], d_kappa[s], h, vocab)
        p = kern @ p
    return p


def fit_rate(steps, errors) -> float:
    """Least-squares slope of log(error) against log(T)."""
    x, y = np.log(np.asarray(steps, dtype=float)), np.log(np.asarray(errors, dtype=float))
    return float(np.polyfit(x, y, 1)[0])


def _rate_study(rng, tr, measure, label: str, n_dists: int):
    """Error vs T for both schedulers on n_dists random q (vocab 2-3, length 3). Asserts: the error is >= 0 (1e-12 abs.),
    nonincreasing in T (up to 1e-12 absolute), and at T = 64 at most 1/8 of its T = 2 value (or <= 1e-12:
    e.g. a point mass q, sampled exactly for every T)."""
    lines, rates = [], {}
    for name in SCHEDULERS:
        curves = []
        for j in range(n_dists):
            v, n = (2, 3) if j % 2 == 0 else (3, 3)
            q = random_dist(rng, v**n) if j % 3 else rng.dirichlet(np.ones(v**n))
            errs = np.array([measure(q, name, T, v, n) for T in RATE_STEPS])
            tr.require(bool(np.all(errs >= -1e-12)), f"{label} {name} dist {j}: negative error {errs}")
            tr.require(bool(np.all(np.diff(errs) <= 1e-12)), f"{label} {name} dist {j}: not nonincreasing in T: {errs}")
            tr.require(bool(errs[-1] <= errs[0] / 8 or errs[0] <= 1e-12), f"{label} {name} dist {j}: does not decrease toward 0: {errs}")
            if errs[0] > 1e-12:
                curves.append(errs)
        if curves:
            mean = np.exp(np.mean(np.log(np.maximum(curves, 1e-300)), axis=0))
            rate = fit_rate(RATE_STEPS[2:], mean[2:])
            rates[name] = {"steps": list(RATE_STEPS), "error": mean.tolist(), "fitted_rate": rate}
            lines.append(f"{label} {name}: geometric-mean error vs T={list(RATE_STEPS)}: "
                         + ", ".join(f"{e:.2e}" for e in mean) + f"; fitted rate (slope of log err vs log T, T>=8) "
                         f"{rate:.2f}")
    return lines, rates


def check_s6(rng, cases: int, rate_dists: int = 6, library: bool = False):
    """S6: deterministic block schedule, KL(q || p_sampled) == sum_blocks E_prefix[TC_q(block | prefix)]; kappa
    schedules: KL decreases toward 0 with T (rate reported). With ``library``: the block identity again with the
    law propagated through the sampler's own kernel (``transition_probabilities``, the schedule's rates)."""
    from proofs_check.report import Tracker

    tr = Tracker()
    max_kl = 0.0
    for c in range(cases):
        v, n = random_size(rng)
        q = random_dist(rng, v**n)
        blocks = random_blocks(rng, n)
        kappa = block_kappa(blocks, n)
        law = factorized_sampler_law(q, kappa, v)
        on_data = law[tb.data_index(v, n)]  # (mass off data sits on states outside q's path: irrelevant to KL)
        kl = tb.kl_divergence(q, on_data)
        tc = tb.block_total_correlation(q, v, n, blocks)
        tr.diff(kl, tc, f"case {c} blocks {blocks}: KL != sum of TC")
        if library:
            lib.record(tr, f"case {c} blocks {blocks}: library sampler kernel", lk.s6_sampler_error, q, kappa, blocks,
                       v, n, law, tc)
        max_kl = max(max_kl, kl)
        tr.cases += 1

    def measure(q, name, T, v, n):
        kap_fn, _ = SCHEDULERS[name]
        kappa = np.repeat(kap_fn(np.arange(T + 1) / T)[:, None], n, axis=1)
        kappa[-1] = 1.0
        return tb.kl_divergence(q, factorized_sampler_law(q, kappa, v)[tb.data_index(v, n)])

    extra = [f"block identity: max KL(q || p_sampled) over cases {max_kl:.3f} nats (matched by the TC sum)"]
    lines, rates = _rate_study(rng, tr, measure, "KL(q || p_sampled)", rate_dists)
    extra += lines
    extra.append("asserted for kappa schedules, per q: KL >= 0, nonincreasing in T (1e-12 abs.), KL(T=64) <= KL(T=2) / 8")
    if library:
        extra.append("library: block identity with the law propagated through dfm.samplers.transition_probabilities "
                     "(exact denoiser, rates of dfm.schedules.from_kappa / block), kernel vs the formula on every "
                     "state, on every case (float64)")
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S6", "factorization cost: KL == sum_blocks E[TC]; KL -> 0 in T", method, extra,
                  {"rates": rates})


def check_s7(rng, cases: int, rate_dists: int = 6, library: bool = False):
    """S7: Euler kernel (delta + h u_cont) == factorized discrete kernel with rate h kappa'/(1 - kappa) (clipped);
    its error to q decreases toward 0 with T (rate reported)."""
    from proofs_check.report import Tracker

    tr = Tracker()
    lrng = rng.spawn(1)[0] if library else None  # library-only randomness: the cases do not depend on `library`
    for c in range(cases):
        v, n = random_size(rng)
        wm = c % 2 == 0
        m = (v + 1) ** n if wm else v**n
        num_steps = int(rng.integers(1, 65))
        h = 1.0 / num_steps
        kap = rng.uniform(0, 1, size=n) * (rng.uniform(size=n) < 0.8)
        dk = rng.uniform(0, 3, size=n)
        if wm:  # exact posteriors of a masked path: revealed coordinates have p_{1|t} = delta_{x^i}
            q = random_dist(rng, v**n)
            post = tb.coordinate_posteriors_from(tb.posterior_at(kap, q[None], v, True)[0], v, n)
        else:  # any posterior table (uniform source: every coordinate moves)
            post = random_positive_dist(rng, v, (m, n))
        euler = tb.euler_kernel(post, kap, dk, h, v, with_mask=wm)
        rate = np.minimum(1.0, h * dk / (1.0 - kap))
        discrete = tb.factorized_kernel_from_rate(post, rate, v, with_mask=wm)
        label = f"case {c} (vocab {v}, length {n}, T {num_steps})"
        tr.diff(euler, discrete, f"{label}: Euler != discrete kernel")
        if library:
            alive = post.sum(-1).min(-1) > 0
            random_post = lrng.dirichlet(np.ones(v), size=post.shape[:2])  # for the unreachable states
            lib.record(tr, f"{label}: library Euler step", lk.s7_step_error, post, alive, kap, dk, h, v, wm, euler,
                       random_post)
        tr.error(tb.markov_kernel_error(euler), f"case {c}: Euler kernel not Markov")
        tr.cases += 1

    def measure(q, name, T, v, n):
        if library:
            kappa, _, rate = euler_tables(name, T, n)
            lib.record(tr, f"{name} T {T}: library euler_rates / discretize", lib.s7_rates_error, name, T, n, kappa, rate)
        return tb.tv_distance(euler_sampler_law(q, name, T, v, n), tb.embed_data(q, v, n))

    extra, rates = _rate_study(rng, tr, measure, "TV(p_Euler, q)", rate_dists)
    if library:
        extra.append("library: the sampler's kernel dfm.samplers.transition_probabilities as an Euler step on every "
                     "state of every case (vs the formula; product kernel vs the engine's Euler kernel on reachable "
                     "states); dfm.samplers.euler_rates and dfm.schedules.discretize tables in the rate study "
                     "(float64)")
    extra.append("asserted for the Euler sampler, per q: TV nonincreasing in T (1e-12 abs.), TV(T=64) <= TV(T=2) / 8")
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S7", "continuous-time limit: Euler == discrete kernel; error -> 0", method, extra, {"rates": rates})
