"""THEORY S11 (equivalence of objectives and the exact gap I(X; K)), S12 (partition by the conditioning
input), S13 (top-k truncation bound), by exact enumeration."""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check.cases import ar_kappa, random_dist, random_mixture, random_schedule, random_size
from proofs_check.report import Row, Tracker


def _expect(p, values) -> float:
    """``sum_x p(x) values(x)`` over the support of p (values may be inf off the support)."""
    pos = p > 0
    return float(np.sum(p[pos] * values[pos]))


def _ar_denoisers(q, kappa, vocab):
    """Exact denoiser tables of q at every step of the AR schedule, ``[T, M, L, vocab]``."""
    return np.stack([tb.coordinate_posteriors(q, kappa, t, vocab) for t in range(kappa.shape[0] - 1)])


def check_s11(rng, cases: int) -> Row:
    """S11 (AR schedule): E_q[loss(exact denoiser)] == H(q); sum_k w_k E_{q_k}[loss_k] == sum_k w_k H(q_k) == H(X|K);
    H(q) - H(X|K) == I(X; K) == sum_t I(X^{t+1}; K | X^{<=t}); the routed ensemble attains H(q)."""
    tr = Tracker()
    extra, data = [], {}
    for c in range(cases):
        v, n = random_size(rng)
        w, experts, q = random_mixture(rng, v**n)
        kappa = ar_kappa(n)
        label = f"case {c} (vocab {v}, length {n}, K {w.shape[0]})"
        h_q = float(tb.entropy(q))
        central = tb.dfm_loss(_ar_denoisers(q, kappa, v), kappa, v)
        tr.diff(_expect(q, central), h_q, f"{label}: centralized optimum != H(q)")
        expert_losses = []
        tables_k = []
        for e in experts:
            tab = _ar_denoisers(e, kappa, v)
            tables_k.append(tab)
            loss_k = tb.dfm_loss(tab, kappa, v)
            expert_losses.append(_expect(e, loss_k))
            tr.diff(expert_losses[-1], float(tb.entropy(e)), f"{label}: expert optimum != H(q_k)")
        joint = w[:, None] * experts  # [K, D]
        h_x_given_k = float(tb.entropy(joint.reshape(-1)) - tb.entropy(w))
        experts_total = float(w @ np.array(expert_losses))
        tr.diff(experts_total, h_x_given_k, f"{label}: sum_k w_k H(q_k) != H(X | K)")
        mi = tb.mutual_information(joint)
        tr.diff(h_q - experts_total, mi, f"{label}: H(q) - sum_k w_k H(q_k) != I(X; K)")
        tr.diff(mi, float(np.sum(tb.chain_rule_mutual_information(w, experts, v, n))), f"{label}: I(X;K) != chain rule sum")
        ensemble = []
        for t in range(n):
            paths = np.stack([tb.joint_path_at(kappa[t], e[None], v, True).sum(1) for e in experts])
            rho = tb.router(w, paths)
            ensemble.append(tb.route(rho, np.stack([tab[t] for tab in tables_k])))
        ens_loss = tb.dfm_loss(np.stack(ensemble), kappa, v)
        tr.diff(_expect(q, ens_loss), h_q, f"{label}: routed ensemble != H(q)")
        if c == 0:
            data = {"vocab": v, "length": n, "experts": int(w.shape[0]), "H_q": h_q, "sum_w_H_qk": experts_total,
                    "I_X_K": mi}
            extra.append(f"representative case (vocab {v}, length {n}, K {w.shape[0]}): H(q) = {h_q:.4f}, "
                         f"sum_k w_k H(q_k) = {experts_total:.4f}, I(X;K) = {mi:.4f} nats")
        tr.cases += 1
    return tr.row("S11", "objectives: H(q) = H(X|K) + I(X;K); ensemble attains H(q)", "enumeration", extra, data)


def check_s12(rng, cases: int) -> Row:
    """S12: k = h(c) ⇒ rho_t(k | c, x) = 1[k = h(c)] for all t and all reachable x (random and AR schedules)."""
    tr = Tracker()
    for c in range(cases):
        v, n = random_size(rng)
        d = v**n
        n_c = int(rng.integers(2, 6))
        n_k = int(rng.integers(2, min(n_c, 4) + 1))
        h = np.concatenate([np.arange(n_k), rng.integers(n_k, size=n_c - n_k)])
        rng.shuffle(h)
        prior_c = rng.dirichlet(np.ones(n_c))
        q_given_c = np.stack([random_dist(rng, d) for _ in range(n_c)])  # [C, D]
        w = np.array([prior_c[h == k].sum() for k in range(n_k)])
        # expert k: law of (c, x1) restricted to h(c) = k, [K, C, D]
        q_k = np.stack([np.where((h == k)[:, None], prior_c[:, None] * q_given_c, 0.0) / w[k] for k in range(n_k)])
        kappa = ar_kappa(n) if c % 2 == 0 else random_schedule(rng, n)
        for t in range(kappa.shape[0]):
            cond = tb.joint_path_at(kappa[t], np.ones((1, d)), v, True)  # [M, D] p_t(x | x1)
            p_k = np.einsum("md,kcd->kcm", cond, q_k)  # p_t^k(c, x)
            joint = w[:, None, None] * p_k
            tot = joint.sum(0)
            alive = tot > 0
            rho = joint / np.where(alive, tot, 1.0)[None]
            target = (h[None, :, None] == np.arange(n_k)[:, None, None]).astype(float)
            tr.diff(np.where(alive[None], rho, 0.0), np.where(alive[None], target, 0.0),
                    f"case {c} t {t}: rho_t(k | c, x) != 1[k = h(c)]")
        tr.cases += 1
    return tr.row("S12", "partition by conditioning input: rho = 1[k = h(c)]", "enumeration")


def check_s13(rng, cases: int) -> Row:
    """S13: TV(mixture, top-k renormalized mixture) <= 1 - rho(S); attained with disjointly supported experts."""
    tr = Tracker()
    worst = -np.inf
    for c in range(cases):
        n_k = int(rng.integers(2, 7))
        size = int(rng.integers(n_k, 25))
        rho = random_dist(rng, n_k)
        k = int(rng.integers(1, n_k + 1))
        if c % 3 == 0:  # experts from a real mixture: router and next-token laws at an AR state
            v, n = random_size(rng, max_states=81)
            w, experts, q = random_mixture(rng, v**n)
            n_k, size = w.shape[0], v
            k = int(rng.integers(1, n_k + 1))
            nt = [tb.next_token_conditionals(e, v, n)[0][0] for e in experts]
            comps, rho = np.stack(nt), w
        else:
            comps = np.stack([random_dist(rng, size) for _ in range(n_k)])
        trunc = tb.top_k_renormalize(rho, k)
        kept = trunc > 0
        bound = 1.0 - rho[kept].sum()
        tv = tb.tv_distance(rho @ comps, trunc @ comps)
        worst = max(worst, tv - bound)
        tr.error(max(0.0, tv - bound), f"case {c}: TV exceeds 1 - rho(S)")
        # tightness: experts with disjoint supports attain the bound
        parts = np.array_split(rng.permutation(max(size, n_k)), n_k)
        disjoint = np.zeros((n_k, max(size, n_k)))
        for j, part in enumerate(parts):
            disjoint[j, part] = rng.dirichlet(np.ones(len(part)))
        tv_tight = tb.tv_distance(rho @ disjoint, trunc @ disjoint)
        worst = max(worst, tv_tight - bound)
        tr.diff(tv_tight, bound, f"case {c}: disjoint experts do not attain the bound")
        tr.cases += 1
    extra = [f"max over cases of TV - (1 - rho(S)): {worst:.3e} (<= 1e-12); the bound is attained (to rounding) "
             "by disjointly supported experts"]
    return tr.row("S13", "top-k renormalization: TV <= 1 - rho(S), tight", "enumeration", extra,
                  {"max_tv_minus_bound": float(worst)})
