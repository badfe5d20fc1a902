"""THEORY S1 (validity), S2 (discrete continuity), S3 (marginalization) by exact enumeration."""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check import library as lib
from proofs_check import library_kernels as lk
from proofs_check.cases import SOURCES, random_dist, random_schedule, random_source_case
from proofs_check.report import Row, Tracker

STRICT = 1e-12  # the classification tolerance for "(V1)+(V2) hold" and "K is Markov"


def _satisfies_v1_v2(u: np.ndarray) -> bool:
    """(V1) sum_y u(y, x) = 0 and (V2) 0 <= delta_x(y) + u(y, x) <= 1, read off u entry by entry."""
    m = u.shape[0]
    diag = np.arange(m)
    v1 = np.all(np.abs(u.sum(0)) <= STRICT)
    shifted = u.copy()
    shifted[diag, diag] += 1.0
    v2 = np.all(shifted >= -STRICT) and np.all(shifted <= 1.0 + STRICT)
    return bool(v1 and v2)


def _is_markov(kernel: np.ndarray) -> bool:
    return bool(np.all(kernel >= -STRICT) and np.all(np.abs(kernel.sum(0) - 1.0) <= STRICT))


def _break(rng, kernel: np.ndarray) -> np.ndarray:
    """An invalid velocity from a valid kernel: breaks (V1), or (V2) below 0, or (V2) above 1 (keeping V1)."""
    m = kernel.shape[0]
    k = kernel.copy()
    x = int(rng.integers(m))
    eps = 10.0 ** rng.uniform(-9, -0.5)
    mode = int(rng.integers(3))
    if mode == 0:  # column sum != 1, entries stay in [0, 1]
        y = int(np.argmax(k[:, x]))
        k[y, x] += -eps if k[y, x] > 0.5 else eps
    elif mode == 1:  # negative entry, column sum kept
        a, b = rng.choice(m, size=2, replace=False)
        shift = k[b, x] + eps
        k[b, x] -= shift
        k[a, x] += shift
    else:  # entry above 1, column sum kept
        a, b = rng.choice(m, size=2, replace=False)
        k[:, x] = 0.0
        k[a, x], k[b, x] = 1.0 + eps, -eps
    return k - np.eye(m)


def check_s1(rng, cases: int, library: bool = False) -> Row:
    """(V1)+(V2) <=> I + u is a Markov kernel, on valid and invalid velocities; convex combinations of
    valid velocities are valid."""
    tr = Tracker()
    for c in range(cases):
        m = int(rng.integers(2, 40))
        kind = ("dirichlet", "sparse", "peaked", "deterministic")[c % 4]
        if kind == "deterministic":
            kernel = np.eye(m)[:, rng.integers(m, size=m)]
        else:
            kernel = tb.random_markov_kernel(rng, m, kind=kind)
        u = kernel - np.eye(m)
        tr.error(tb.velocity_validity_error(u), f"case {c}: valid u violates (V1)/(V2)")
        tr.error(tb.markov_kernel_error(np.eye(m) + u), f"case {c}: I + u of a valid u not Markov")
        tr.require(_satisfies_v1_v2(u) and _is_markov(np.eye(m) + u), f"case {c}: valid u misclassified")
        bad = _break(rng, kernel)
        tr.require(_satisfies_v1_v2(bad) == _is_markov(np.eye(m) + bad), f"case {c}: (V1)+(V2) != Markov")
        tr.require(not _satisfies_v1_v2(bad), f"case {c}: broken u classified valid")
        if library:
            lib.record(tr, f"case {c}: library validity_error", lib.s1_errors, u, bad)
        n = int(rng.integers(2, 6))
        lam = rng.dirichlet(np.ones(n))
        comb = sum(l * (tb.random_markov_kernel(rng, m, kind="sparse") - np.eye(m)) for l in lam[:-1]) + lam[-1] * u
        tr.error(tb.velocity_validity_error(comb), f"case {c}: convex combination invalid")
        tr.cases += 1
    extra = ["library: dfm.velocities.validity_error on the valid and the broken velocity of every case"] if library else []
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S1", "validity (V1)+(V2) <=> Markov kernel; convex combos", method, extra)


def check_s2(rng, cases: int, library: bool = False) -> Row:
    """For valid u: divergence-form residual == kernel-form residual; generating <=> p_{t+1} = K p_t."""
    tr = Tracker()
    for c in range(cases):
        m = int(rng.integers(2, 40))
        kernel = tb.random_markov_kernel(rng, m, kind=("dirichlet", "sparse", "peaked")[c % 3])
        u = kernel - np.eye(m)
        p = random_dist(rng, m)
        generating = c % 2 == 0
        p_next = kernel @ p if generating else random_dist(rng, m)
        r_div = tb.continuity_residual_divergence(p, p_next, u)
        r_ker = tb.continuity_residual_kernel(p, p_next, u)
        tr.diff(r_div, r_ker, f"case {c}: divergence form != kernel form")
        if library:
            lib.record(tr, f"case {c}: library continuity_residual", lib.s2_error, p, p_next, u)
        if generating:
            tr.error(np.abs(r_div), f"case {c}: generating u has divergence residual")
        else:
            true_gap = np.max(np.abs(p_next - kernel @ p))
            if true_gap > 1e-9:
                tr.require(np.max(np.abs(r_div)) > 1e-10, f"case {c}: non-generating u has zero residual")
        tr.cases += 1
    extra = ["library: dfm.velocities.continuity_residual on every case"] if library else []
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S2", "discrete continuity: divergence form == kernel form", method, extra)


def _check_pairs(tr: Tracker, case, kappa, t, label: str) -> None:
    """z = (x0, x1): conditional kernels per pair generate p_t(.|z); their posterior mixture generates p_t."""
    v, n, wm = case.vocab, case.length, case.with_mask
    pair_post = tb.pair_posterior(case.q, kappa, t, v, **case.kwargs)  # [M, S0, D]
    m, s0, d = pair_post.shape
    x0s = np.full((1, n), v) if wm else tb.enumerate_states(v, n, with_mask=False)
    x1s = tb.enumerate_states(v, n, with_mask=False)
    cond_t = tb.pair_path_at(kappa[t], v, wm)
    cond_n = tb.pair_path_at(kappa[t + 1], v, wm)
    za, zb = np.meshgrid(np.arange(s0), np.arange(d), indexing="ij")
    za, zb = za.reshape(-1), zb.reshape(-1)
    kerns = tb.conditional_kernels(kappa, t, x1s[zb], v, x0=None if wm else x0s[za], with_mask=wm)  # [Z, M, M]
    u_z = kerns - np.eye(m)[None]
    tr.error(np.abs(u_z.sum(1)), f"{label}: conditional u(.|z) violates (V1)")
    tr.error(np.maximum(0.0, -kerns), f"{label}: conditional u(.|z) violates (V2)")
    ct = cond_t[:, za, zb]  # [M, Z]
    tr.diff(np.einsum("zyx,xz->zy", kerns, ct), cond_n[:, za, zb].T, f"{label}: u(.|z) does not generate p_t(.|z)")
    u = np.einsum("zyx,xz->yx", u_z, pair_post[:, za, zb])
    pi, _ = tb.resolve_source(case.q, v, n, **case.kwargs)
    p_t = tb.joint_path_at(kappa[t], pi, v, wm).sum(1)
    p_n = tb.joint_path_at(kappa[t + 1], pi, v, wm).sum(1)
    alive = p_t > 0
    u[:, ~alive] = 0.0
    tr.error(tb.velocity_validity_error(u), f"{label}: marginal u (z = (x0, x1)) invalid")
    tr.error(np.abs(tb.continuity_residual_kernel(p_t, p_n, u)), f"{label}: z = (x0, x1) continuity")
    u_x1 = tb.joint_velocity(case.q, kappa, t, v, **case.kwargs)
    tr.diff(u[:, alive], u_x1[:, alive], f"{label}: z = (x0, x1) and z = x1 velocities differ")


def check_s3(rng, cases: int, symbolic: bool = True, library: bool = False) -> Row:
    """Marginal joint velocity from conditional ones is valid and generates the marginal path
    (masked / independent source / coupling; z = x1 for all, z = (x0, x1) on small cases). With ``library``:
    the same joint velocity built from the library's ``conditional_velocity`` and judged by its
    ``validity_error`` / ``continuity_residual`` on every case."""
    tr = Tracker()
    dense = dict.fromkeys(SOURCES, 0)
    for c in range(cases):
        source = SOURCES[c % 3]
        case = random_source_case(rng, source)
        v, n = case.vocab, case.length
        kappa = random_schedule(rng, n)
        t = int(rng.integers(kappa.shape[0] - 1))
        label = f"case {c} ({source}, vocab {v}, length {n}, t {t})"
        pi, wm = tb.resolve_source(case.q, v, n, **case.kwargs)
        p_t = tb.joint_path_at(kappa[t], pi, v, wm).sum(1)
        p_n = tb.joint_path_at(kappa[t + 1], pi, v, wm).sum(1)
        u = tb.joint_velocity(case.q, kappa, t, v, **case.kwargs)
        tr.error(tb.velocity_validity_error(u), f"{label}: marginal u invalid")
        tr.error(np.abs(tb.continuity_residual_kernel(p_t, p_n, u)), f"{label}: continuity")
        if library:
            post = tb.posterior_at(kappa[t], pi, v, wm)[0]
            lib.record(tr, f"{label}: library joint kernel", lk.s3_error, post, p_t, p_n,
                       tb.rates_between(kappa[t], kappa[t + 1]), v, n, wm, u)
        p0 = tb.joint_path_at(kappa[0], pi, v, wm).sum(1)
        pT = tb.joint_path_at(kappa[-1], pi, v, wm).sum(1)
        src = tb.point_mass(tb.mask_index(v, n), (v + 1) ** n) if wm else pi.sum(1)
        tr.diff(p0, src, f"{label}: p_0 != source")
        tr.diff(pT, tb.embed_data(case.q, v, n) if wm else case.q, f"{label}: p_T != q")
        m = p_t.shape[0]
        pairs = pi.shape[0] * pi.shape[1]
        if pairs * m * m <= 3e5 and (source != "mask" or c % 2 == 0):
            _check_pairs(tr, case, kappa, t, label)
            dense[source] += 1
        tr.cases += 1
    extra = ["z = x1 (factored contraction) on every case; z = (x0, x1) per-pair kernels summed densely on "
             + ", ".join(f"{n} {s}" for s, n in dense.items()) + " cases (small state spaces)"]
    method = "enumeration"
    if symbolic:
        from proofs_check.symbolic import symbolic_s3

        err, lines = symbolic_s3()
        tr.error(err, "symbolic S3 residual")
        extra += lines
        method = "both"
    if library:
        extra.append("library: per-z joint kernels prod_i (delta + u^i(.|x, x1)) from "
                     "dfm.velocities.conditional_velocity, "
                     "mixed with the enumeration's p_t(x1|x), judged valid and generating by validity_error / "
                     "continuity_residual and compared with the engine, on every case (float64)")
        method += " + library"
    return tr.row("S3", "marginalization: sum_z u(.|z) p_t(z|x) generates p_t", method, extra)
