"""THEORY S4 (masked mixture path, conditional and marginal per-coordinate velocity) and
S5 (AR is the degenerate schedule), by exact enumeration (+ sympy for S5(b), S5(d))."""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check.cases import (
    SOURCES, ar_kappa, random_dist, random_positive_dist, random_schedule, random_size, random_source_case,
)
from proofs_check import library as lib
from proofs_check import library_ar as la
from proofs_check import library_kernels as lk
from proofs_check.report import Row, Tracker


def _coordinate_formula_check(tr, kappa, t, x0, x1, vocab, with_mask, label):
    """Per coordinate: (delta + u^i) p_t^i == p_{t+1}^i with THEORY's u^i = r (delta_{x1^i} - delta_{x0^i}) on a
    coordinate still at its source value, 0 on a revealed one; p_t^i = (1 - kappa) delta_{x0^i} + kappa delta_{x1^i}."""
    s = vocab + 1 if with_mask else vocab
    eye = np.eye(s)
    for i in range(x1.shape[0]):
        k0, k1 = kappa[t, i], kappa[t + 1, i]
        r = (k1 - k0) / (1.0 - k0) if k0 < 1.0 else 0.0
        p_i = (1 - k0) * eye[x0[i]] + k0 * eye[x1[i]]
        p_next = (1 - k1) * eye[x0[i]] + k1 * eye[x1[i]]
        kern = np.eye(s)
        if x0[i] != x1[i]:
            kern[:, x0[i]] += r * (eye[x1[i]] - eye[x0[i]])
        tr.diff(kern @ p_i, p_next, f"{label}: coordinate {i} conditional velocity formula")


def check_s4(rng, cases: int, library: bool = False) -> Row:
    """S4: per-coordinate conditional velocity; the product kernel generates the conditional path; the
    marginal per-coordinate velocity is r (p_{1|t} - delta) (masked, independent source, coupling)."""
    tr = Tracker()
    lrng = rng.spawn(1)[0] if library else None  # library-only randomness: the cases do not depend on `library`
    for c in range(cases):
        source = SOURCES[c % 3]
        case = random_source_case(rng, source)
        v, n, wm = case.vocab, case.length, case.with_mask
        kappa = random_schedule(rng, n)
        t = int(rng.integers(kappa.shape[0] - 1))
        label = f"case {c} ({source}, vocab {v}, length {n}, t {t})"
        d = v**n
        x1s = tb.enumerate_states(v, n, with_mask=False)
        r = tb.rates_between(kappa[t], kappa[t + 1])
        # (1) formula per coordinate and (2) the product kernel generates p_t(.|z), on a few pairs z.
        if not wm:
            cond = tb.conditional_path(kappa, t, v, **case.kwargs)
            cond_n = tb.conditional_path(kappa, t + 1, v, **case.kwargs)
        for b in rng.choice(d, size=min(d, 3), replace=False):
            x1 = x1s[b]
            x0 = np.full(n, v) if wm else x1s[int(rng.integers(d))]
            _coordinate_formula_check(tr, kappa, t, x0, x1, v, wm, label)
            kern = tb.conditional_kernel(kappa, t, x1, v, x0=None if wm else x0, with_mask=wm)
            tr.diff(kern @ tb.single_conditional_path(kappa[t], x0, x1, v, wm),
                    tb.single_conditional_path(kappa[t + 1], x0, x1, v, wm), f"{label}: product kernel, z = (x0, x1)")
            if not wm:  # z = x1 with x0 ~ source (Gat et al.'s form, no indicator)
                kern = tb.conditional_kernel(kappa, t, x1, v, with_mask=False)
                tr.diff(kern @ cond[:, b], cond_n[:, b], f"{label}: product kernel, z = x1")
        # (3) marginal per-coordinate velocity == sum_z u^i(.|z) p_t(z | x) == r (p_{1|t} - delta_{x^i}).
        post = tb.posterior(case.q, kappa, t, v, **case.kwargs)  # [M, D]
        alive = post.sum(1) > 0
        rhs = tb.coordinate_velocity(tb.coordinate_posteriors_from(post, v, n), r, v, with_mask=wm)
        xs = tb.enumerate_states(v, n, with_mask=wm)
        s = v + 1 if wm else v
        eye = np.eye(s)
        movable = (xs == v) if wm else np.ones(xs.shape, dtype=bool)
        # z = x1: u^i(y, x | x1) = r_i 1[movable] (delta_{x1^i}(y) - delta_{x^i}(y))
        lhs = np.zeros(rhs.shape)
        for i in range(n):
            target = post.reshape((-1,) + (v,) * n).sum(axis=tuple(a + 1 for a in range(n) if a != i))
            lhs[:, i, :v] += r[i] * movable[:, i, None] * target
            lhs[:, i, :] -= r[i] * movable[:, i, None] * eye[xs[:, i]] * post.sum(1)[:, None]
        tr.diff(lhs[alive], rhs[alive], f"{label}: marginal coordinate velocity (z = x1)")
        if not wm and d**3 <= 5000:  # z = (x0, x1), indicator form of the conditional velocity
            pp = tb.pair_posterior(case.q, kappa, t, v, **case.kwargs)  # [M, S0, D]
            lhs2 = np.zeros(rhs.shape)
            for i in range(n):
                at_src = xs[:, i, None] == x1s[None, :, i]  # [M, S0]: x^i == x0^i
                moved = eye[x1s[:, i]] - eye[xs[:, i]][:, None, :]  # [M, D, S]
                lhs2[:, i] = r[i] * np.einsum("mab,mbs->ms", pp * at_src[:, :, None], moved)
            tr.diff(lhs2[alive], rhs[alive], f"{label}: marginal coordinate velocity (z = (x0, x1))")
        if library:
            coord = tb.coordinate_posteriors_from(post, v, n)
            random_post = lrng.dirichlet(np.ones(v), size=xs.shape)  # for the unreachable states
            lib.record(tr, f"{label}: library velocities vs enumeration", lib.s4_errors,
                       xs, coord, alive, r, v, wm, x1, None if wm else x0, random_post)
            lib.record(tr, f"{label}: library from_kappa(kappa).rates()", lambda k: lk.schedule_rates(k)[1], kappa)
        tr.cases += 1
    method = "enumeration + library" if library else "enumeration"
    extra = []
    if library:
        extra.append("library: dfm.velocities.posterior_to_velocity on every state of every case (reachable: exact "
                     "posteriors vs the engine; unreachable: random posteriors; all vs the formula r (p - delta) on "
                     "movable coordinates, 0 on revealed ones) and conditional_velocity; the rates r_t^i of "
                     "dfm.schedules.from_kappa(kappa).rates() (DiscreteSchedule.rates) (float64)")
    return tr.row("S4", "masked mixture path: conditional / marginal coordinate velocity", method, extra)


LOSS_CASES = 20   # cases of S5 that also test dfm_loss's unbiasedness (statistical, see library_ar)


def check_s5(rng, cases: int, symbolic: bool = True, library: bool = False) -> Row:
    """S5 (a)-(e) under the AR schedule; (e) weighted loss >= -log P(sampler -> x1) on random masked schedules."""
    tr = Tracker()
    extra = []
    min_gap = np.inf
    lrng = rng.spawn(1)[0] if library else None  # library-only randomness: the cases do not depend on `library`
    max_z = 0.0
    for c in range(cases):
        v, n = random_size(rng)
        label = f"case {c} (vocab {v}, length {n})"
        d, m = v**n, (v + 1) ** n
        q = random_dist(rng, d)
        kappa = ar_kappa(n)
        x1s = tb.enumerate_states(v, n, with_mask=False)
        ones = np.ones((1, d))
        conds = [tb.joint_path_at(kappa[t], ones, v, True) for t in range(n + 1)]
        nexts = tb.next_token_conditionals(q, v, n)
        prefix = tb.prefix_marginals(q, v, n)
        law = tb.point_mass(tb.mask_index(v, n), m)
        lib_posts, lib_cols = [], []
        for t in range(n + 1):
            # (a) p_t(. | x1) = delta at (x1^{<t}, m, .., m)
            target = tb.state_index(np.where(np.arange(n)[None, :] < t, x1s, v), v)
            tr.diff(conds[t], np.eye(m)[:, target], f"{label}: (a) t={t}")
            if t == n:
                break
            # (b) only coordinate t moves; u_t = next-token distribution - delta_m at coordinate t
            r = tb.rates_between(kappa[t], kappa[t + 1])
            tr.diff(r, np.eye(n)[t], f"{label}: (b) rates t={t}")
            # AR states reachable at t: (prefix, m, .., m) with q(prefix) > 0; the velocity and kernels are
            # compared on these columns (the others carry no mass at step t)
            prefixes = tb.enumerate_states(v, t, with_mask=False) if t else np.zeros((1, 0), dtype=np.int64)
            alive = prefix[t] > 0
            cols = tb.state_index(np.concatenate([prefixes, np.full((prefixes.shape[0], n - t), v)], 1), v)[alive]
            post = tb.posterior(q, kappa, t, v)
            u = tb.expected_conditional_kernel(post, r, v, True, columns=cols) - np.eye(m)[:, cols]  # S3 velocity
            expected = np.zeros((m, cols.shape[0]))
            stride = (v + 1) ** (n - 1 - t)
            rows = cols[None, :] + (np.arange(v)[:, None] - v) * stride  # coordinate t: m -> y_t
            expected[rows, np.broadcast_to(np.arange(cols.shape[0]), rows.shape)] = nexts[t][alive].T
            expected[cols, np.arange(cols.shape[0])] -= 1.0
            tr.diff(u, expected, f"{label}: (b) velocity t={t}")
            factors = tb.coordinate_factors(tb.coordinate_posteriors_from(post, v, n), r, v)
            kern_f = tb.product_kernel(factors[cols], v)  # factorized kernel, columns cols
            if library:
                lib_posts.append(tb.coordinate_posteriors_from(post, v, n))
                lib_cols.append((cols, kern_f))
            tr.diff(kern_f, np.eye(m)[:, cols] + u, f"{label}: (b) factorized == joint kernel t={t}")
            # (c) propagate the factorized sampler's law (its mass must stay on the reachable AR states)
            off = np.ones(m, dtype=bool)
            off[cols] = False
            tr.error(np.abs(law[off]), f"{label}: (c) sampler mass off the AR states at t={t}")
            law = kern_f @ law[cols]
        # (c) the factorized sampler samples q
        tr.diff(law, tb.embed_data(q, v, n), f"{label}: (c) sampler law != q")
        # (d) weighted loss == AR NLL == -log P(sampler -> x1) for a random positive model
        model = random_positive_dist(rng, v, (m, n))
        loss = tb.dfm_loss(model, kappa, v)
        tr.diff(loss, tb.ar_nll(model, v, n), f"{label}: (d) loss != AR NLL")
        tr.diff(loss, tb.sampler_nll(model, kappa, v), f"{label}: (d)/(e) loss != -log P(sampler -> x1) under AR")
        # (e) random masked schedule: loss >= -log P(sampler -> x1)
        kap_r = random_schedule(rng, n)
        loss_r = tb.dfm_loss(model, kap_r, v)
        nll_r = tb.sampler_nll(model, kap_r, v)
        tr.error(np.maximum(0.0, nll_r - loss_r), f"{label}: (e) ELBO violated")
        if library:
            lib.record(tr, f"{label}: library dfm_cross_entropy (AR)", lib.s5_loss_error, model, kappa, v, loss)
            lib.record(tr, f"{label}: library dfm_cross_entropy", lib.s5_loss_error, model, kap_r, v, loss_r)
            lib.record(tr, f"{label}: library ar_nll", lib.s5_ar_nll_error, model, v, n, tb.ar_nll(model, v, n))
            lib.record(tr, f"{label}: (c) library sampler kernel", lk.s5_sampler_error, q, kappa, v, n,
                       np.stack(lib_posts), lib_cols)
            lib.record(tr, f"{label}: library any_order", la.any_order_error, q, v, n, lrng.permutation(n))
            lib.record(tr, f"{label}: library causal_denoiser / causal_posterior_fn", la.causal_errors, q, v, n)
            if c < LOSS_CASES:
                m3 = (la.LOSS_V + 1) ** la.LOSS_L
                model3 = random_positive_dist(lrng, la.LOSS_V, (m3, la.LOSS_L))
                kap3 = random_schedule(lrng, la.LOSS_L)
                sampling = ("uniform", "rate_stratified")[c % 2]
                try:
                    z = la.dfm_loss_z(int(lrng.integers(2**31)), model3, kap3, sampling)
                    max_z = max(max_z, z)
                    tr.require(z <= la.Z_MAX, f"{label}: library dfm_loss ({sampling}) biased: |z| = {z:.1f}")
                except Exception as err:  # noqa: BLE001 - reported as a failure of the row
                    tr.fail(f"{label}: library dfm_loss raised {type(err).__name__}: {err}")
        min_gap = min(min_gap, float(np.min(loss_r - nll_r)))
        tr.cases += 1
    extra.append(f"(e) min over cases and x1 of loss - (-log P(sampler -> x1)) on random schedules: {min_gap:.3e} (>= 0)")
    method = "enumeration"
    if library:
        extra.append("library: dfm.losses.dfm_cross_entropy (summed over steps, AR and random schedules) and "
                     "dfm.losses.ar_nll on every case (float64)")
        extra.append("library (c): the sampler's kernel dfm.samplers.transition_probabilities (exact denoiser, "
                     "rates of dfm.schedules.autoregressive) on every state, multiplied over coordinates: its law "
                     "from all-mask == q, on every case; the same under dfm.schedules.any_order(random permutation)")
        extra.append("library: dfm.autoregressive.causal_denoiser and causal_posterior_fn (a table causal model) at the "
                     "AR states == q(. | x^{<t}), every case; dfm.losses.dfm_loss (one random step per sequence, "
                     f"'uniform' / 'rate_stratified') unbiased for the exact loss: z-test on {la.DRAWS} draws per "
                     f"sequence, first {LOSS_CASES} cases, max |z| {max_z:.2f} (FAIL above {la.Z_MAX:.0f})")
    if symbolic:
        from proofs_check.symbolic import symbolic_s5

        err, lines = symbolic_s5()
        tr.error(err, "symbolic S5 residual")
        extra += lines
        method = "both"
    if library:
        method += " + library"
    return tr.row("S5", "AR schedule: (a)-(d) exact, (e) ELBO with equality under AR", method, extra)
