"""THEORY S8 (velocity, denoiser and kernel decompose over experts with the router), S9 (AR router is a
Bayes filter), S10 (the router minimizes the classification loss), by exact enumeration."""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check import library as lib
from proofs_check import library_decentral as ld
from proofs_check import library_ensemble as le
from proofs_check.cases import ar_kappa, random_dist, random_mixture, random_positive_dist, random_schedule, random_size
from proofs_check.report import Row, Tracker


def expert_tables(experts, kappa, t, vocab, kwargs):
    """Per expert: (p_t^k [K, M], posterior [K, M, D]) for the same conditional path (THEORY S8)."""
    length = kappa.shape[1]
    paths, posts = [], []
    for qk in experts:
        pi, wm = tb.resolve_source(qk, vocab, length, **kwargs)
        post, marg = tb.posterior_at(kappa[t], pi, vocab, wm)
        paths.append(marg)
        posts.append(post)
    return np.stack(paths), np.stack(posts), wm


def check_s8(rng, cases: int, library: bool = False) -> Row:
    """S8: u = sum_k rho u^k, p_{1|t} = sum_k rho p^k_{1|t}, K = sum_k rho K^k (masked and uniform sources).
    With ``library``: ``mix_log_probs`` of the experts' exact denoisers with the exact router == the mixture's
    denoiser, and the ensemble (``ensemble_posterior_fn`` + ``CallableRouter``) inside ``sample_discrete``."""
    tr = Tracker()
    lrng = rng.spawn(1)[0] if library else None  # library-only randomness: the cases do not depend on `library`
    visited = 0
    for c in range(cases):
        v, n = random_size(rng)
        d = v**n
        w, experts, q = random_mixture(rng, d)
        kwargs = {} if c % 2 == 0 else {"source": np.full(d, 1.0 / d) if c % 4 == 1 else random_dist(rng, d)}
        kappa = random_schedule(rng, n)
        t = int(rng.integers(kappa.shape[0] - 1))
        label = f"case {c} ({'mask' if not kwargs else 'uniform'}, vocab {v}, length {n}, t {t})"
        paths, posts, wm = expert_tables(experts, kappa, t, v, kwargs)
        pi, _ = tb.resolve_source(q, v, n, **kwargs)
        post, p_t = tb.posterior_at(kappa[t], pi, v, wm)
        tr.diff(p_t, w @ paths, f"{label}: p_t != sum_k w_k p_t^k")
        rho = tb.router(w, paths)
        alive = p_t > 0
        tr.diff(rho.sum(1)[alive], np.ones(alive.sum()), f"{label}: router rows do not sum to 1")
        r = tb.rates_between(kappa[t], kappa[t + 1])
        kern = tb.expected_conditional_kernel(post, r, v, wm)
        kern_k = np.stack([tb.expected_conditional_kernel(pk, r, v, wm) for pk in posts])  # [K, y, x]
        eye = np.eye(kern.shape[0])
        mixed_u = np.einsum("xk,kyx->yx", rho, kern_k - eye[None])
        tr.diff((kern - eye)[:, alive], mixed_u[:, alive], f"{label}: joint velocity != sum_k rho u^k")
        tr.diff(kern[:, alive], np.einsum("xk,kyx->yx", rho, kern_k)[:, alive], f"{label}: joint kernel != sum_k rho K^k")
        coord = tb.coordinate_posteriors_from(post, v, n)
        coord_k = np.stack([tb.coordinate_posteriors_from(pk, v, n) for pk in posts])
        tr.diff(coord[alive], tb.route(rho, coord_k)[alive], f"{label}: denoiser != sum_k rho p^k_(1|t)")
        tr.diff(post[alive], tb.route(rho, posts)[alive], f"{label}: posterior != sum_k rho p^k_t(x1|x)")
        if library:
            lib.record(tr, f"{label}: library mix_log_probs", ld.s8_mix_error, coord_k, rho, coord, alive)

            def ensemble(*args):
                nonlocal visited
                err, count = le.s8_ensemble_error(*args)
                visited += count
                return err

            lib.record(tr, f"{label}: library ensemble in sample_discrete", ensemble, int(lrng.integers(2**31)), w,
                       experts, kappa, v, n, rho if wm else None, alive if wm else None)
        tr.cases += 1
    extra, method = [], "enumeration"
    if library:
        method = "enumeration + library"
        extra.append("library: dfm.decentral.mix_log_probs(log p^k_{1|t}, rho_t) == p_{1|t} on every reachable state "
                     "of every case (float64)")
        extra.append(f"library: ensemble_posterior_fn + CallableRouter (exact router table) inside "
                     f"dfm.samplers.sample_discrete (jit), mask source, the case's random schedule (from_kappa; "
                     f"cases padded to vocab 4, length 4, 5 steps), "
                     f"{le.BATCH} trajectories on every case: mixed output == exact mixture denoiser at "
                     f"{visited} visited (state, step) pairs of positive probability")
    return tr.row("S8", "velocity / denoiser / kernel decompose with router rho_t", method, extra)


def check_s9(rng, cases: int, library: bool = False) -> Row:
    """S9 (AR schedule): S8's router at (x^{<t}, m..) == w_k q_k(x^{<t}) / sum == online Bayes filter, and
    q(x^t | x^{<t}) == sum_k rho_t(k) q_k(x^t | x^{<t}). With ``library``: ``BayesFilterRouter`` (online
    and batch), ``mixture_token_log_probs`` and the Bayes-filter ensemble inside ``sample_discrete``."""
    tr = Tracker()
    lrng = rng.spawn(1)[0] if library else None  # library-only randomness: the cases do not depend on `library`
    visited = 0
    for c in range(cases):
        v, n = random_size(rng)
        w, experts, q = random_mixture(rng, v**n)
        kappa = ar_kappa(n)
        pm_k = [tb.prefix_marginals(e, v, n) for e in experts]
        nt_k = [tb.next_token_conditionals(e, v, n) for e in experts]
        pm = tb.prefix_marginals(q, v, n)
        nt = tb.next_token_conditionals(q, v, n)
        online = np.broadcast_to(w, (1, w.shape[0]))  # [prefixes, K] at t = 0
        for t in range(n):
            label = f"case {c} (vocab {v}, length {n}, t {t})"
            alive = pm[t] > 0
            batch = w[None, :] * np.stack([p[t] for p in pm_k], axis=1)  # [V^t, K]
            batch = batch / np.where(alive, batch.sum(1), 1.0)[:, None]
            paths = np.stack([tb.joint_path_at(kappa[t], e[None], v, True).sum(1) for e in experts])
            rho = tb.router(w, paths)  # [M, K]
            prefixes = tb.enumerate_states(v, t, with_mask=False) if t else np.zeros((1, 0), dtype=np.int64)
            states = np.concatenate([prefixes, np.full((prefixes.shape[0], n - t), v)], axis=1)
            rho_prefix = rho[tb.state_index(states, v)]
            tr.diff(rho_prefix[alive], batch[alive], f"{label}: S8 router != w_k q_k(prefix) / sum")
            tr.diff(online[alive], batch[alive], f"{label}: online filter != batch posterior")
            cond_k = np.stack([nt[t] for nt in nt_k], axis=1)  # [V^t, K, V]
            mixed = np.einsum("pk,pkv->pv", batch, cond_k)
            tr.diff(mixed[alive], nt[t][alive], f"{label}: sum_k rho q_k(next | prefix) != q(next | prefix)")
            # online update to t + 1: rho_{t+1}(k | prefix, x) ∝ rho_t(k | prefix) q_k(x | prefix)
            upd = online[:, None, :] * np.swapaxes(cond_k, 1, 2)  # [V^t, V, K]
            upd = upd.reshape(-1, w.shape[0])
            tot = upd.sum(1, keepdims=True)
            online = np.where(tot > 0, upd / np.where(tot > 0, tot, 1.0), 0.0)
        if library:
            label = f"case {c} (vocab {v}, length {n})"
            lp, _ = ld.token_log_probs(experts, v, n)
            x1s = tb.enumerate_states(v, n, with_mask=False)
            prefix_post = np.empty((x1s.shape[0], n, w.shape[0]))
            prefix_alive = np.empty((x1s.shape[0], n), dtype=bool)
            next_lp = np.empty((x1s.shape[0], n))
            for t in range(n):
                pidx = x1s[:, :t] @ (v ** np.arange(t - 1, -1, -1)) if t else np.zeros(x1s.shape[0], dtype=np.int64)
                joint = w[None, :] * np.stack([p[t] for p in pm_k], axis=1)[pidx]
                prefix_alive[:, t] = pm[t][pidx] > 0
                prefix_post[:, t] = joint / np.where(prefix_alive[:, t], joint.sum(1), 1.0)[:, None]
                with np.errstate(divide="ignore"):
                    next_lp[:, t] = np.log(nt[t][pidx, x1s[:, t]])
            with np.errstate(divide="ignore"):
                log_q = np.log(q)
            lib.record(tr, f"{label}: library Bayes filter / mixture_token_log_probs", ld.s9_filter_error, w, lp,
                       prefix_post, prefix_alive, next_lp, log_q)

            def ensemble(*args):
                nonlocal visited
                err, count = le.s9_ensemble_error(*args)
                visited += count
                return err

            lib.record(tr, f"{label}: library Bayes-filter ensemble in sample_discrete", ensemble,
                       int(lrng.integers(2**31)), w, experts, v, n)
        tr.cases += 1
    extra, method = [], "enumeration"
    if library:
        method = "enumeration + library"
        extra.append("library: BayesFilterRouter online (init/update/weights) and batch (posterior) == "
                     "w_k q_k(prefix) / sum, mixture_token_log_probs(from_priors(w)) == log q(x^t | x^{<t}) "
                     "(summed: log q(x)) with the "
                     "same weights, on every sequence and position of every case (float64)")
        extra.append(f"library: ensemble_posterior_fn + BayesFilterRouter inside dfm.samplers.sample_discrete (jit) "
                     f"under dfm.schedules.autoregressive(4) (cases padded to vocab 4, length 4), {le.BATCH} "
                     f"trajectories on every case: output == q(next | prefix) at {visited} visited (state, step) pairs")
    return tr.row("S9", "AR router is a Bayes filter (online == batch)", method, extra)


def check_s10(rng, cases: int, library: bool = False) -> Row:
    """S10: loss(rho) == H(K | X_t); loss(r) - loss(rho) == E_x KL(rho || r) >= 0 for random other routers r.
    With ``library``: ``dfm.decentral.router_objective`` on all enumerated (x_t, k) pairs gives the same."""
    tr = Tracker()
    min_gap = np.inf
    for c in range(cases):
        v, n = random_size(rng)
        d = v**n
        w, experts, q = random_mixture(rng, d)
        kwargs = {} if c % 2 == 0 else {"source": random_dist(rng, d)}
        kappa = random_schedule(rng, n)
        t = int(rng.integers(kappa.shape[0]))  # t = 0..T (both endpoints included)
        paths, _, _ = expert_tables(experts, kappa, t, v, kwargs)
        joint = (w[:, None] * paths).T  # [M, K]: P(X_t = x, K = k)
        rho = tb.router(w, paths)
        p_x = joint.sum(1)

        def loss(r):
            return float(-np.sum(np.where(joint > 0, joint * np.log(np.where(joint > 0, r, 1.0)), 0.0)))

        h_cond = float(tb.entropy(joint.reshape(-1)) - tb.entropy(p_x))
        base = loss(rho)
        tr.diff(base, h_cond, f"case {c}: loss(rho) != H(K | X_t)")
        k = w.shape[0]
        routers, losses, kls = [rho], [base], []
        for j, other in enumerate((
            random_positive_dist(rng, k, (joint.shape[0],)),
            0.5 * rho + 0.5 * random_positive_dist(rng, k, (joint.shape[0],)),
            np.abs(rho + 1e-3 * rng.standard_normal(rho.shape)) + 1e-12,
        )):
            other = other / other.sum(1, keepdims=True)
            gap = loss(other) - base
            kl = sum(p_x[x] * tb.kl_divergence(rho[x], other[x]) for x in np.flatnonzero(p_x > 0))
            tr.diff(gap, kl, f"case {c} router {j}: loss gap != E_x KL(rho || r)")
            routers.append(other)
            losses.append(loss(other))
            kls.append(kl)
            tr.error(max(0.0, -gap), f"case {c} router {j}: a router beats rho")
            min_gap = min(min_gap, gap)
        if library:
            lib.record(tr, f"case {c}: library router_objective", ld.s10_errors, joint, routers, h_cond,
                       np.array(losses), np.array(kls))
        tr.cases += 1
    extra = [f"min loss(r) - loss(rho) over perturbed routers: {min_gap:.3e} (>= 0)"]
    if library:
        extra.append("library: dfm.decentral.router_objective(log r, k, P(X_t = x, K = k)) on all enumerated pairs == "
                     "H(K | X_t) for rho and H(K | X_t) + E_x KL(rho || r) for the perturbed routers, every case")
    method = "enumeration + library" if library else "enumeration"
    return tr.row("S10", "router minimizes the classification loss (Gibbs gap = E KL)", method, extra)
