"""Row S8.avail: THEORY S8 / S9 restricted to the available experts (a lost expert), exactly, in float64.

Statement. For a subset A of the experts, the router of the mixture ``q_A = sum_{k in A} w_k q_k / w(A)`` of
the available ones is S8's router restricted to A and renormalized,

    rho^A_t(k | x) = w_k p_t^k(x) / sum_{j in A} w_j p_t^j(x) = rho_t(k | x) / rho_t(A | x)   (k in A),

wherever ``p_t^A(x) > 0`` (then ``rho_t(A | x) > 0``); so the ensemble of the available experts with the
restricted, renormalized router is the exact denoiser of ``q_A`` (S8), and under AR the Bayes filter
restricted to A is ``w_k q_k(x^{<t})`` renormalized over A (S9). Checked by enumeration on every case, and
in the library (``available=``, a fixed mask ``AVAILABLE`` of the ``K_PAD = 4`` padded experts; the case's
experts come in random order, so which clusters are lost varies):

* ``dfm.decentral.mixing.available_weights`` of a ``CallableRouter`` (the exact rho table) on every state;
* ``mixture_token_log_probs(BayesFilterRouter.from_priors(w), ..., available=)``: token log-probs
  ``log q_A(x^j | x^{<j})`` and weights on every sequence with ``q_A(x^{<j}) > 0``;
* ``ensemble_posterior_fn(..., available=)`` inside ``dfm.samplers.sample_discrete``, with the exact router
  table (random masked schedule) and with the Bayes filter (``autoregressive``): the mixed output equals
  ``q_A``'s denoiser at every visited state of positive probability under ``q_A``'s path.
"""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check import library_ensemble as le
from proofs_check.cases import random_dist, random_schedule, random_size
from proofs_check.library import float64_mode, jit_once, maxdiff, record, worst
from proofs_check.library_decentral import pad_experts, token_log_probs
from proofs_check.report import Tracker

K_PAD = le.K_PAD
AVAILABLE = (True, False, True, False)   # experts 1 and 3 are lost (3 is padding when K < 4)
INF = float("inf")


def restricted(rho, avail) -> np.ndarray:
    """``rho`` ``[M, K]`` restricted to ``avail [K]`` and renormalized (rows with no weight on A: zeros)."""
    r = np.where(np.asarray(avail, bool)[None, :], rho, 0.0)
    s = r.sum(1, keepdims=True)
    return np.where(s > 0, r / np.where(s > 0, s, 1.0), 0.0)


def _scores(router, lp, valid, available):
    from dfm.decentral import mixture_token_log_probs

    out = mixture_token_log_probs(router, lp, valid=valid, available=np.asarray(available))
    return out.log_probs, out.weights


def scoring_error(w, experts, avail_k, vocab: int, length: int) -> float:
    """``mixture_token_log_probs`` with the Bayes filter of the full priors and ``available=AVAILABLE``: log-probs
    == ``log q_A(x^j | x^{<j})`` and weights == ``w_k q_k(x^{<j})`` renormalized over A, where ``q_A(x^{<j}) > 0``."""
    from dfm.decentral import BayesFilterRouter

    k = len(w)
    wa = np.where(avail_k, w, 0.0)
    q_a = (wa / wa.sum()) @ experts
    lp, _ = token_log_probs(experts, vocab, length)
    d = vocab**length
    size = 256
    valid = np.zeros((size, le.L_PAD), dtype=bool)
    valid[:d, :length] = True
    with float64_mode():
        router = BayesFilterRouter.from_priors(np.concatenate([w, np.zeros(K_PAD - k)]))
        log_probs, weights = (np.asarray(a) for a in jit_once(_scores, available=AVAILABLE)(
            router, pad_experts(lp, size), valid))
    if log_probs.dtype != np.float64:
        return INF
    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    nexts = tb.next_token_conditionals(q_a, vocab, length)
    prefix_a = tb.prefix_marginals(q_a, vocab, length)
    errs = []
    for j in range(length):
        pidx = x1s[:, :j] @ (vocab ** np.arange(j - 1, -1, -1)) if j else np.zeros(d, dtype=np.int64)
        alive = prefix_a[j][pidx] > 0
        want_lp = np.log(np.maximum(nexts[j][pidx, x1s[:, j]], 1e-300))
        ok = alive & (nexts[j][pidx, x1s[:, j]] > 0)
        errs.append(maxdiff(log_probs[:d, j][ok], want_lp[ok]))
        errs.append(maxdiff(np.exp(log_probs[:d, j][alive & ~ok]), 0.0))
        pk = np.stack([tb.prefix_marginals(e, vocab, length)[j][pidx] for e in experts], 1)  # [D, K]
        want_w = restricted(w[None, :] * pk, avail_k)
        errs.append(maxdiff(weights[:d, j, :k][alive], want_w[alive]))
        errs.append(maxdiff(weights[:d, j, k:][alive]))
    return worst(*errs)


def weights_error(rho, avail_k, alive_a) -> float:
    """``available_weights(CallableRouter(rho table), None, x_t, None, mask)`` on every state (eager) ==
    ``restricted(rho)`` where ``p_t^A(x) > 0``."""
    from dfm.decentral import CallableRouter
    from dfm.decentral.mixing import available_weights

    m, k = rho.shape
    table = np.zeros((m, K_PAD))
    table[:, :k] = np.where(rho.sum(1, keepdims=True) > 0, rho, 1.0 / k)
    x_t = np.arange(m)[:, None]
    with float64_mode():
        router = CallableRouter(lambda x, t: np.asarray(table)[np.asarray(x)[:, 0]], K_PAD)
        got, _ = available_weights(router, None, x_t, None, np.asarray(AVAILABLE))
        got = np.asarray(got)
    if got.dtype != np.float64:
        return INF
    return worst(maxdiff(got[alive_a, :k], restricted(rho, avail_k)[alive_a]), maxdiff(got[alive_a, k:]))


def ensemble_errors(seed: int, w, experts, avail_k, kappa, vocab: int, length: int):
    """``(error, visited)`` of ``ensemble_posterior_fn(..., available=AVAILABLE)`` in ``sample_discrete``: the exact
    rho table (``CallableRouter``) on the random masked ``kappa``, and the Bayes filter under ``autoregressive``."""
    from dfm.decentral import BayesFilterRouter
    from dfm.schedules import autoregressive, from_kappa

    coord_k, rho, _, _ = le.denoiser_tables(w, experts, vocab, length)
    wa = np.where(avail_k, w, 0.0)
    _, rho_a_sub, coord_a, _ = le.denoiser_tables(wa[avail_k] / wa.sum(), experts[avail_k], vocab, length)
    rho_a = np.zeros_like(rho)
    rho_a[:, np.flatnonzero(avail_k)] = rho_a_sub
    steps = kappa.shape[0] - 1
    kap = np.ones((le.T_PAD + 1, le.L_PAD))
    kap[0] = 0.0
    kap[:steps + 1, :length] = kappa
    experts_pad, router_pad, mix_pad, _ = le.padded_tables(coord_k, rho, coord_a, vocab, length, kap)
    alive = le.padded_tables(coord_k, rho_a, coord_a, vocab, length, kap)[3]
    with float64_mode():
        schedule = from_kappa(kap, max_moves=le.L_PAD)
    err1, n1 = le.run_checked(jit_once(le.s8_sample, available=AVAILABLE), np.uint32(seed), schedule, experts_pad,
                       router_pad, mix_pad, alive)
    kap_ar = (np.arange(le.L_PAD)[None, :] < np.arange(le.L_PAD + 1)[:, None]).astype(np.float64)
    experts_ar, _, mix_ar, _ = le.padded_tables(coord_k, rho, coord_a, vocab, length, kap_ar)
    alive_ar = le.padded_tables(coord_k, rho_a, coord_a, vocab, length, kap_ar)[3]
    with float64_mode():
        router = BayesFilterRouter.from_priors(np.concatenate([w, np.zeros(K_PAD - len(w))]))
        schedule_ar = autoregressive(le.L_PAD)
    err2, n2 = le.run_checked(jit_once(le.s9_sample, available=AVAILABLE), np.uint32(seed + 1), schedule_ar, router,
                       experts_ar, mix_ar, alive_ar)
    return worst(err1, err2), n1 + n2


def check_available(rng, cases: int, library: bool = False):
    """S8.avail: the identity rho^A = rho restricted and renormalized (enumeration: routers of q_A and of q at a
    masked state and at AR prefixes); with ``library``, the library's ``available=`` paths (module doc)."""
    tr = Tracker()
    lrng = rng.spawn(1)[0] if library else None
    visited = 0
    for c in range(cases):
        v, n = random_size(rng, max_states=le.V_PAD ** 4)
        k = int(rng.integers(2, K_PAD + 1))
        w = rng.dirichlet(np.ones(k))
        experts = np.stack([random_dist(rng, v**n) for _ in range(k)])
        avail_k = np.asarray(AVAILABLE[:k])
        label = f"case {c} (vocab {v}, length {n}, K {k}, available {np.flatnonzero(avail_k).tolist()})"
        wa = np.where(avail_k, w, 0.0)
        # masked state at kappa = 1/2: routers of q and of q_A from the experts' marginal paths
        half = np.full(n, 0.5)
        paths = np.stack([tb.posterior_at(half, e[None], v, True)[1] for e in experts])  # [K, M] p_t^k(x)
        rho = tb.router(w, paths)
        alive_a = (wa @ paths) > 0
        rho_a = tb.router(wa / wa.sum(), paths)
        tr.diff(restricted(rho, avail_k)[alive_a], rho_a[alive_a], f"{label}: masked rho^A != restricted rho")
        coord_k = np.stack([tb.coordinate_posteriors_from(tb.posterior_at(half, e[None], v, True)[0], v, n)
                            for e in experts])
        q_a = (wa / wa.sum()) @ experts
        coord_a = tb.coordinate_posteriors_from(tb.posterior_at(half, q_a[None], v, True)[0], v, n)
        mixed = np.einsum("mk,kmlv->mlv", restricted(rho, avail_k), coord_k)
        tr.diff(mixed[alive_a], coord_a[alive_a], f"{label}: restricted ensemble != q_A's denoiser")
        # AR prefixes: the Bayes filter restricted to A
        for j in range(n + 1):
            pk = np.stack([tb.prefix_marginals(e, v, n)[j] for e in experts], 1)  # [v^j, K]
            pa = tb.prefix_marginals(q_a, v, n)[j] > 0
            tr.diff(restricted(w * pk, avail_k)[pa], tb.router(wa / wa.sum(), pk.T)[pa], f"{label}: AR prefix {j}")
        if library:
            record(tr, f"{label}: library available_weights", weights_error, rho, avail_k, alive_a)
            record(tr, f"{label}: library mixture_token_log_probs(available=)", scoring_error, w, experts, avail_k, v, n)
            try:
                err, count = ensemble_errors(int(lrng.integers(2**31)), w, experts, avail_k, random_schedule(rng, n),
                                             v, n)
                tr.error(err, f"{label}: library ensemble_posterior_fn(available=) in sample_discrete")
                visited += count
            except Exception as exc:  # noqa: BLE001 - reported as a failure of the row
                tr.fail(f"{label}: library raised {type(exc).__name__}: {exc}")
        else:
            random_schedule(rng, n)          # the same cases with and without the library
        tr.cases += 1
    extra = ["rho^A == rho restricted to A and renormalized, at a masked state (kappa 1/2) and at every AR prefix; the "
             "restricted ensemble == q_A's denoiser (every case, available experts = the 1st and 3rd in random order)"]
    if library:
        extra.append("library: available_weights(CallableRouter) on every state; mixture_token_log_probs(BayesFilterRouter"
                     ".from_priors(w), available=) == log q_A(x^j | x^{<j}) with weights w_k q_k(prefix) over A; "
                     f"ensemble_posterior_fn(available=) in sample_discrete (exact router table on the case's schedule, "
                     f"and the Bayes filter under autoregressive): output == q_A's denoiser at {visited} visited "
                     "(state, step) pairs (float64)")
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S8.avail", "lost experts: rho^A = rho restricted to A, renormalized", method, extra)
