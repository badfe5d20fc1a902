"""Symbolic (sympy) checks on generic small cases: THEORY S3 and S5(b), S5(d).

Generic means: the data law, the schedule values, the source coupling and the model denoiser are
free symbols, so an identity that simplifies to 0 holds for every value, not only sampled ones.
Each function returns ``(max_error, lines)``: error 0.0 when every residual simplifies to exactly 0,
``inf`` otherwise.
"""
from __future__ import annotations

import itertools

import sympy as sp

VOCAB, LENGTH = 2, 2
MASK = VOCAB


def _states(with_mask: bool):
    base = VOCAB + 1 if with_mask else VOCAB
    return list(itertools.product(range(base), repeat=LENGTH))


def _data():
    return list(itertools.product(range(VOCAB), repeat=LENGTH))


def _delta(a, b):
    return sp.Integer(1) if a == b else sp.Integer(0)


def _cond_path(x, x0, x1, kap):
    out = sp.Integer(1)
    for i in range(LENGTH):
        out *= (1 - kap[i]) * _delta(x[i], x0[i]) + kap[i] * _delta(x[i], x1[i])
    return out


def _cond_kernel(y, x, x0, x1, rate):
    """prod_i [delta(y^i, x^i) + r_i 1[x^i == x0^i] (delta(y^i, x1^i) - delta(y^i, x^i))] (THEORY S4)."""
    out = sp.Integer(1)
    for i in range(LENGTH):
        move = rate[i] if x[i] == x0[i] else 0
        out *= _delta(y[i], x[i]) + move * (_delta(y[i], x1[i]) - _delta(y[i], x[i]))
    return out


def _s3_residuals(with_mask: bool):
    """Continuity residuals p_{t+1} - p_t - sum_x u(y, x) p_t(x) and (V1) sums of the marginal velocity."""
    a = sp.symbols(f"a0:{LENGTH}")  # kappa_t
    b = sp.symbols(f"b0:{LENGTH}")  # kappa_{t+1}
    rate = [(b[i] - a[i]) / (1 - a[i]) for i in range(LENGTH)]
    states = _states(with_mask)
    sources = [(MASK,) * LENGTH] if with_mask else _data()
    pairs = [(x0, x1) for x0 in sources for x1 in _data()]
    pi = {z: sp.Symbol(f"pi_{''.join(map(str, z[0]))}_{''.join(map(str, z[1]))}", positive=True) for z in pairs}
    p_t = {x: sum(_cond_path(x, *z, a) * pi[z] for z in pairs) for x in states}
    p_n = {x: sum(_cond_path(x, *z, b) * pi[z] for z in pairs) for x in states}
    # u(y, x) = sum_z u(y, x | z) p_t(z | x), p_t(z | x) = p_t(x | z) pi(z) / p_t(x)
    u = {
        (y, x): sum(((_cond_kernel(y, x, *z, rate) - _delta(y, x)) * _cond_path(x, *z, a) * pi[z]) for z in pairs) / p_t[x]
        for y in states for x in states
    }
    residuals = [p_n[y] - p_t[y] - sum(u[(y, x)] * p_t[x] for x in states) for y in states]
    v1 = [sum(u[(y, x)] for y in states) for x in states]
    return residuals + v1


def symbolic_s3() -> tuple[float, list[str]]:
    """THEORY S3 for vocab 2, length 2, generic kappa_t, kappa_{t+1} and generic law (mask source: q(x1);
    source sample: a generic coupling pi(x0, x1), z = (x0, x1))."""
    bad = 0
    for with_mask in (True, False):
        for expr in _s3_residuals(with_mask):
            if sp.cancel(sp.together(expr)) != 0:
                bad += 1
    line = f"S3 symbolic (sympy, vocab 2, length 2, mask and coupling sources): {bad} nonzero residuals"
    return (0.0 if bad == 0 else float("inf")), [line]


def symbolic_s5() -> tuple[float, list[str]]:
    """THEORY S5(b) (marginal velocity = next-token distribution) and S5(d) (weighted loss = AR NLL =
    -log P(sampler -> x1)) for vocab 2, length 2, generic q and generic positive model denoiser."""
    states = _states(True)
    data = _data()
    q = {x1: sp.Symbol(f"q_{x1[0]}{x1[1]}", positive=True) for x1 in data}
    kappa = [[1 if i < t else 0 for i in range(LENGTH)] for t in range(LENGTH + 1)]
    rates = [[1 if (kappa[t + 1][i] - kappa[t][i]) else 0 for i in range(LENGTH)] for t in range(LENGTH)]
    mask_src = (MASK,) * LENGTH
    bad = 0
    # (b): for each t and reachable x = (x1^{<t}, m, ..): u_t(y, x) = q(y^t | x^{<t}) - delta_m(y^t) on y that
    # differ from x at most at coordinate t; 0 elsewhere.
    for t in range(LENGTH):
        for prefix in itertools.product(range(VOCAB), repeat=t):
            x = tuple(prefix) + (MASK,) * (LENGTH - t)
            p_x = sum(_cond_path(x, mask_src, x1, kappa[t]) * q[x1] for x1 in data)
            q_prefix = sum(q[x1] for x1 in data if x1[:t] == tuple(prefix))
            for y in states:
                u = sum((_cond_kernel(y, x, mask_src, x1, rates[t]) - _delta(y, x)) * _cond_path(x, mask_src, x1, kappa[t])
                        * q[x1] for x1 in data) / p_x
                if any(y[i] != x[i] for i in range(LENGTH) if i != t):
                    expected = sp.Integer(0)
                elif y[t] == MASK:
                    expected = sp.Integer(-1)  # q(m | prefix) - 1
                else:
                    expected = sum(q[x1] for x1 in data if x1[:t + 1] == tuple(prefix) + (y[t],)) / q_prefix
                if sp.cancel(sp.together(u - expected)) != 0:
                    bad += 1
    # (d): generic model denoiser theta[x, i, v] > 0 (normalized over v).
    theta = {}
    for x in states:
        for i in range(LENGTH):
            s = sp.Symbol(f"th_{''.join(map(str, x))}_{i}", positive=True)
            theta[(x, i, 0)], theta[(x, i, 1)] = s, 1 - s
    law = {x: _delta(x, mask_src) for x in states}
    for t in range(LENGTH):
        new = {}
        for y in states:
            total = sp.Integer(0)
            for x in states:
                k = sp.Integer(1)
                for i in range(LENGTH):
                    move = rates[t][i] if x[i] == MASK else 0
                    target = theta[(x, i, y[i])] if y[i] != MASK else 0
                    k *= _delta(y[i], x[i]) + move * (target - _delta(y[i], x[i]))
                total += k * law[x]
            new[y] = sp.expand(total)
        law = new
    for x1 in data:
        loss = sum(
            _cond_path(x, mask_src, x1, kappa[t]) * rates[t][i] * (-sp.log(theta[(x, i, x1[i])]))
            for t in range(LENGTH) for x in states for i in range(LENGTH) if x[i] == MASK
        )
        ar = -sum(sp.log(theta[(tuple(x1[:t]) + (MASK,) * (LENGTH - t), t, x1[t])]) for t in range(LENGTH))
        if sp.simplify(sp.expand_log(loss - ar, force=True)) != 0:
            bad += 1
        if sp.simplify(sp.powsimp(sp.exp(-loss)) - law[x1]) != 0:  # loss == -log P(sampler -> x1)
            bad += 1
    line = f"S5 symbolic (sympy, vocab 2, length 2, generic q and model): {bad} nonzero residuals in (b), (d)"
    return (0.0 if bad == 0 else float("inf")), [line]
