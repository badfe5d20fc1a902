"""THEORY S6 (cost of factorization) and S7 (continuous-time limit), by exact enumeration.

S6: the block identity ``KL(q || p_sampled) = sum_blocks E[TC]``; for any masked kappa table the reveal-order
decomposition ``p_T = sum_pi P(pi) p_pi`` (:mod:`proofs_check.reveal`) and the proven bounds ``TV <= eps``,
``KL <= chi2 <= eps (1 - nu(S)) + eps^2 (1 + 1/q_min) / (1 - eps)``; for discretized schedulers
``eps <= C(N, 2) K1 / T`` (O(1/T)). S7: the Euler kernel is the factorized kernel with the Euler rates; per
step ``|r_s - e_s| <= h^2 max|kappa''| / (2 (1 - kappa(t_s)))`` (:func:`proofs_check.schedulers.rate_difference_bound`,
O(h^2) only where ``1 - kappa(t_s)`` stays away from 0); globally ``TV(p_Euler, q) <= eps_Euler <=
C(N, 2) max(rho_T, 2) K1 / T`` for a nondecreasing hazard. Rates of decrease fitted to the measured errors are
printed as measurements, never asserted.
"""
from __future__ import annotations

import math

import numpy as np

from dfm import tabular as tb
from proofs_check import library as lib
from proofs_check import library_kernels as lk
from proofs_check import reveal as rv
from proofs_check.cases import block_kappa, random_blocks, random_dist, random_positive_dist, random_schedule, random_size
from proofs_check.report import Tracker
from proofs_check.schedulers import (  # noqa: F401  (re-exported: the notebooks import them from here)
    SCHEDULERS, discrete_collision_bound, discrete_rates, euler_collision_bound, euler_rates, euler_sampler_law,
    euler_tables, factorized_sampler_law, fit_rate, hazard_is_nondecreasing, kappa_table, rate_difference_bound,
    survival_ratio,
)

RATE_STEPS = (2, 4, 8, 16, 32, 64)
STEP_T = (2, 4, 8, 16, 32, 64, 128, 512)       # per-step rate comparison (cheap: tables only)
LIBRARY_MAX_T = 64                              # library tables compared up to here (1 - kappa >= 6e-4 for cosine)
STUDY = ("kappa=t", "kappa=t^2", "cosine")


def check_decomposition(tr, q, law_on_data, a, vocab: int, length: int, label: str) -> dict:
    """Record the reveal-order decomposition and the bounds of THEORY S6 / S7 for one law; returns the numbers.

    ``law_on_data [D]`` the sampler's exact law (kernel engine) on the data states, ``a [T, L]`` its step laws.
    Exact: ``law == sum_pi P(pi) p_pi`` on supp(q), ``sum_pi P(pi) == 1``, the chi2 identity. Inequalities:
    ``TV <= eps <= pairwise``, ``KL <= chi2 <= bound``."""
    support = q > 0
    dec, eps, nu_mass = rv.decomposed_law(q, vocab, length, a)
    tr.diff(law_on_data[support], dec[support], f"{label}: law != sum_pi P(pi) p_pi")
    tr.diff(rv.total_probability(a, length), 1.0, f"{label}: sum_pi P(pi) != 1")
    tv = rv.tv_on_support(law_on_data[support], q[support])
    pair = rv.pairwise_bound(a)
    tr.error(max(0.0, tv - eps), f"{label}: TV > eps")
    tr.error(max(0.0, eps - pair), f"{label}: eps > pairwise bound")
    kl, chi2, identity, bound = rv.kl_bounds(q, law_on_data, eps, nu_mass)
    tr.error(max(0.0, kl - chi2), f"{label}: KL > chi2")
    tr.error(abs(chi2 - identity) / max(1.0, abs(chi2)), f"{label}: chi2 identity (relative)")
    tr.error(max(0.0, chi2 - bound) / max(1.0, abs(bound)) if math.isfinite(bound) else 0.0, f"{label}: chi2 > bound")
    return {"tv": tv, "kl": kl, "eps": eps, "pairwise": pair}


def _study_dists(rng, n_dists: int):
    out = []
    for j in range(n_dists):
        v, n = (2, 3) if j % 2 == 0 else (3, 3)
        out.append((v, n, random_dist(rng, v**n) if j % 3 else rng.dirichlet(np.ones(v**n))))
    return out


def _series(per_dist: list[list[dict]]) -> dict:
    """Geometric means over the distributions, per T, of TV, KL and eps; a distribution whose value at the
    smallest T is <= 1e-12 (e.g. a point mass q, sampled exactly at every T) is left out of that mean."""
    out = {}
    for key, k in (("TV", "tv"), ("KL", "kl"), ("eps", "eps")):
        curves = np.array([[row[k] for row in rows] for rows in per_dist if rows[0][k] > 1e-12])
        out[key] = (np.exp(np.mean(np.log(np.maximum(curves, 1e-300)), axis=0)).tolist() if curves.size
                    else [0.0] * len(per_dist[0]))
    return out


def _measured_line(label: str, name: str, steps, series: dict) -> str:
    parts = []
    for key, values in series.items():
        slope = fit_rate(steps[2:], values[2:]) if min(values[2:]) > 1e-300 else float("nan")
        parts.append(f"{key} " + ", ".join(f"{v:.2e}" for v in values) + f" (fitted slope T>=8: {slope:.2f})")
    return f"{label} {name}, measured (geometric means over q) at T={list(steps)}: " + "; ".join(parts)


def check_s6(rng, cases: int, rate_dists: int = 6, library: bool = False):
    """S6: block identity on every case; on a random masked kappa table per case, the reveal-order decomposition
    and its bounds; for discretized schedulers, ``eps <= C(N, 2) K1 / T`` (rates of TV / KL printed, measured)."""
    tr = Tracker()
    max_kl, max_ratio = 0.0, 0.0
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
        kap_r = random_schedule(rng, n)
        label = f"case {c} (vocab {v}, length {n}, random kappa T={kap_r.shape[0] - 1})"
        a = rv.step_law(tb.rates(kap_r))
        got = check_decomposition(tr, q, factorized_sampler_law(q, kap_r, v)[tb.data_index(v, n)], a, v, n, label)
        if got["eps"] > 0:
            max_ratio = max(max_ratio, got["tv"] / got["eps"])
        if library:
            lib.record(tr, f"{label}: library from_kappa rates", lk.step_law_error, kap_r, a)
        tr.cases += 1
    extra = [f"block identity: max KL(q || p_sampled) over cases {max_kl:.3f} nats (matched by the TC sum)",
             f"random kappa tables (one per case): law == sum_pi P(pi) p_pi exactly; TV <= eps <= pairwise bound and "
             f"KL <= chi2 <= eps(1 - nu(S)) + eps^2 (1 + 1/q_min)/(1 - eps) on every case (max TV/eps {max_ratio:.3f})"]
    data = {}
    dists = _study_dists(rng, rate_dists)
    for name in STUDY:
        per_dist = [[] for _ in dists]
        for T in RATE_STEPS:
            for j, (v, n, q) in enumerate(dists):
                label = f"{name} T={T} dist {j}"
                kap = kappa_table(name, T, n)
                a = rv.step_law(np.repeat(discrete_rates(name, T)[:, None], n, axis=1))
                got = check_decomposition(tr, q, factorized_sampler_law(q, kap, v)[tb.data_index(v, n)], a, v, n, label)
                bound = discrete_collision_bound(name, T, n)
                tr.error(max(0.0, rv.pairwise_bound(a) - bound), f"{label}: pairwise bound > C(N,2) K1 / T")
                per_dist[j].append(got)
            if library:
                lib.record(tr, f"{name} T={T}: library discretize tables", lib.scheduler_tables_error, name, T, 3)
        series = _series(per_dist)
        data[name] = {"steps": list(RATE_STEPS), **{k: v for k, v in series.items()},
                      "proven_eps_bound_length3": [discrete_collision_bound(name, T, 3) for T in RATE_STEPS]}
        extra.append(_measured_line("discretized", name, RATE_STEPS, series)
                     + f"; proven: TV <= eps <= 3 K1/T = {discrete_collision_bound(name, 64, 3):.2e} at T=64")
    extra.append("asserted (proven): the identities and TV <= eps <= C(N,2) K1 / T, KL <= chi2 <= bound; the fitted "
                 "slopes are measurements, not assertions")
    if library:
        extra.append("library: block identity with the law propagated through dfm.samplers.transition_probabilities "
                     "(exact denoiser, rates of dfm.schedules.from_kappa / block), kernel vs the formula on every "
                     "state, on every case; from_kappa(kappa).rates() give the same step laws; discretize(...) kappa "
                     "and rates() == the numpy tables (float64)")
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S6", "factorization: KL == sum E[TC]; TV <= P(collision) = O(1/T)", method, extra, data)


def check_s7(rng, cases: int, rate_dists: int = 6, library: bool = False):
    """S7: the Euler kernel identity on every case; the per-step rate bound (every scheduler, T up to 512);
    the Euler law's reveal-order decomposition and ``eps_Euler <= C(N, 2) max(rho_T, 2) K1 / T``."""
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
    extra, data = [], {"per_step": {}, "global": {}}
    # per step: |r_s - e_s| <= h^2 max|kappa''| / (2 (1 - kappa(t_s)))
    for name in SCHEDULERS:
        worst, total, where = [], [], []
        for T in STEP_T:
            diff = np.abs(discrete_rates(name, T) - euler_rates(name, T))
            tr.error(np.maximum(0.0, diff - rate_difference_bound(name, T)), f"{name} T={T}: per-step rate bound")
            worst.append(float(diff.max()))
            total.append(float(diff.sum()))
            if diff.max() > 1e-12:
                where.append(int(T - np.argmax(diff)))
            if library and T <= LIBRARY_MAX_T:
                lib.record(tr, f"{name} T={T}: library rate tables", lib.scheduler_tables_error, name, T, 3)
        data["per_step"][name] = {"steps": list(STEP_T), "max_abs_diff": worst, "sum_abs_diff": total}
        extra.append(f"per step {name}, measured |r_s - e_s| at T={list(STEP_T)}: max " + ", ".join(f"{w:.3g}" for w in worst)
                     + (" (at s = T - " + ",".join(str(k) for k in sorted(set(where))) + ")" if where else " (rounding)")
                     + "; sum over s "
                     + ", ".join(f"{t:.3g}" for t in total))
    # globally: the Euler law, its decomposition and the proven collision bound
    dists = _study_dists(rng, rate_dists)
    for name in STUDY:
        tr.require(hazard_is_nondecreasing(name), f"{name}: hazard kappa'/(1 - kappa) not nondecreasing")
        per_dist = [[] for _ in dists]
        bounds = []
        for T in RATE_STEPS:
            bound = euler_collision_bound(name, T, 3)
            for j, (v, n, q) in enumerate(dists):
                label = f"Euler {name} T={T} dist {j}"
                a = rv.step_law(np.repeat(euler_rates(name, T)[:, None], n, axis=1))
                law = euler_sampler_law(q, name, T, v, n)[tb.data_index(v, n)]
                got = check_decomposition(tr, q, law, a, v, n, label)
                tr.error(max(0.0, got["pairwise"] - bound), f"{label}: pairwise bound > C(N,2) max(rho_T, 2) K1 / T")
                per_dist[j].append(got)
            bounds.append(bound)
        series = _series(per_dist)
        data["global"][name] = {"steps": list(RATE_STEPS), **series, "proven_eps_bound_length3": bounds}
        extra.append(_measured_line("Euler", name, RATE_STEPS, series)
                     + "; proven eps bound C(3,2) max(rho_T,2) K1/T: " + ", ".join(f"{b:.2e}" for b in bounds))
    extra.append("asserted (proven): Euler kernel == discrete kernel with the Euler rates; |r_s - e_s| <= "
                 "h^2 max|kappa''| / (2 (1 - kappa(t_s))) at every step of every scheduler and T (not O(h^2) "
                 "uniformly: see the cosine maxima); the Euler law == sum_pi P(pi) p_pi, TV <= eps <= "
                 "C(N,2) max(rho_T,2) K1/T, KL <= chi2 <= bound; the fitted slopes are measurements")
    if library:
        extra.append("library: the sampler's kernel dfm.samplers.transition_probabilities as an Euler step on every "
                     "state of every case (vs the formula; product kernel vs the engine's Euler kernel on reachable "
                     "states); dfm.samplers.euler_rates, dfm.schedules.discretize(...).kappa / .rates() of "
                     "LinearScheduler, PolynomialScheduler(2, 3), CosineScheduler == the numpy tables (T <= 64)")
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S7", "Euler: per step |r-e| <= h^2|k''|/2(1-k); TV <= eps = O(1/T)", method, extra, data)
