"""Posteriors and exact marginal velocities (THEORY S3, S4).

``posterior[x, x1] = p_t(x1 | x)``; ``coordinate_posteriors[x, i, v] = p_{1|t}(x1^i = v | x)`` (the
denoiser a network learns). Rows of unreachable states (``p_t(x) = 0``) are zeros; the joint
velocity there is 0 (the state stays put), which is valid and never used by the path.
"""
from __future__ import annotations

import functools

import numpy as np

from dfm.tabular import _validate as V
from dfm.tabular.paths import joint_path_at, pair_path_at, rates_between, resolve_source
from dfm.tabular.states import enumerate_states, num_symbols


def _normalize_rows(joint: np.ndarray, marg: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (joint.ndim - 1)
    safe = np.where(marg > 0, marg, 1.0).reshape(shape)
    return np.where(marg.reshape(shape) > 0, joint / safe, 0.0)


def posterior_at(kappa_t, pi, vocab: int, with_mask: bool):
    """``(p_t(x1 | x) [M, D], p_t(x) [M])`` for one kappa row ``[L]`` and coupling ``pi [S0, D]``."""
    joint = joint_path_at(kappa_t, pi, vocab, with_mask)
    marg = joint.sum(1)
    return _normalize_rows(joint, marg), marg


def _setup(q, kappa, t, vocab, source, coupling, allow_last=True):
    kappa = V.check_kappa(kappa)
    t = V.check_step(t, kappa.shape[0] - 1, allow_last=allow_last)
    length = kappa.shape[1]
    V.check_vocab_length(vocab, length)
    pi, with_mask = resolve_source(q, vocab, length, source, coupling)
    return kappa, t, length, pi, with_mask


def posterior(q, kappa, t: int, vocab: int, *, source=None, coupling=None) -> np.ndarray:
    """Posterior ``p_t(x1 | x)``, ``[M, D]`` (rows of unreachable x: zeros). Raises ValueError on bad input."""
    kappa, t, _, pi, with_mask = _setup(q, kappa, t, vocab, source, coupling)
    return posterior_at(kappa[t], pi, vocab, with_mask)[0]


def pair_posterior(q, kappa, t: int, vocab: int, *, source=None, coupling=None) -> np.ndarray:
    """Posterior over pairs ``p_t(x0, x1 | x)``, ``[M, S0, D]`` (``z = (x0, x1)``; small cases only)."""
    kappa, t, _, pi, with_mask = _setup(q, kappa, t, vocab, source, coupling)
    joint = pair_path_at(kappa[t], vocab, with_mask) * pi[None]
    return _normalize_rows(joint, joint.sum((1, 2)))


@functools.lru_cache(maxsize=None)
def _coordinate_onehots(vocab: int, length: int) -> np.ndarray:
    """``E [D, L * vocab]``: ``E[x1, i * vocab + v] = 1[x1^i = v]``."""
    x1s = enumerate_states(vocab, length, with_mask=False)
    out = np.eye(vocab)[x1s].reshape(x1s.shape[0], length * vocab)
    out.setflags(write=False)
    return out


def coordinate_posteriors_from(post, vocab: int, length: int) -> np.ndarray:
    """Per-coordinate marginals of a posterior ``[M, D]`` -> ``[M, L, vocab]`` (also works on ``p_t(x, x1)``)."""
    post = np.asarray(post, dtype=np.float64)
    return (post @ _coordinate_onehots(vocab, length)).reshape(post.shape[0], length, vocab)


def coordinate_posteriors(q, kappa, t: int, vocab: int, *, source=None, coupling=None) -> np.ndarray:
    """Denoiser ``p_{1|t}(x1^i = v | x)``, ``[M, L, vocab]`` (THEORY S4). Raises ValueError on bad input."""
    kappa, t, length, pi, with_mask = _setup(q, kappa, t, vocab, source, coupling)
    joint = joint_path_at(kappa[t], pi, vocab, with_mask)
    return _normalize_rows(coordinate_posteriors_from(joint, vocab, length), joint.sum(1))


def expected_conditional_kernel(post, rate, vocab: int, with_mask: bool = True, columns=None) -> np.ndarray:
    """``K[y, x] = sum_{x1} p_t(x1 | x) K_t(y | x, x1)`` for the conditional product kernels of THEORY S4.

    post ``[M, D]``, rate ``[L]``. Contracted coordinate by coordinate (batched matmuls), never
    materializing ``[D, M, M]``. Columns of unreachable x (zero posterior rows) are ``delta_x``.
    columns: optional state indices ``[C]``; then only those columns are computed, ``[M, C]``.
    """
    post = np.asarray(post, dtype=np.float64)
    m_all, d = post.shape
    r = np.asarray(rate, dtype=np.float64)
    length = r.shape[0]
    xs = enumerate_states(vocab, length, with_mask=with_mask)
    cols = np.arange(m_all) if columns is None else np.asarray(columns, dtype=np.int64)
    xs, post = xs[cols], post[cols]
    m = cols.shape[0]
    s = num_symbols(vocab, with_mask)
    eye_s = np.eye(s)
    tensor = post.reshape((m,) + (vocab,) * length)
    for i in range(length):
        stay = eye_s[xs[:, i]]  # [C, S]: delta(y, x^i)
        movable = (xs[:, i] == vocab) if with_mask else np.ones(m, dtype=bool)
        # G[x, a, y] = delta(y, x^i) + r_i movable (delta(y, a) - delta(y, x^i))
        g = stay[:, None, :] + (r[i] * movable)[:, None, None] * (eye_s[None, :vocab, :] - stay[:, None, :])
        moved = np.moveaxis(tensor, 1 + i, -1)
        shp = moved.shape
        res = np.matmul(moved.reshape(m, -1, shp[-1]), g)  # [C, R, S]
        tensor = np.moveaxis(res.reshape(shp[:-1] + (s,)), -1, 1 + i)
    kern = tensor.reshape(m, -1).T
    dead = np.flatnonzero(post.sum(1) == 0)
    kern[:, dead] = 0.0
    kern[cols[dead], dead] = 1.0
    return kern


def joint_velocity(q, kappa, t: int, vocab: int, *, source=None, coupling=None) -> np.ndarray:
    """Marginal joint velocity ``u_t(y, x) = sum_z u_t(y, x | z) p_t(z | x)``, ``[M, M]`` (THEORY S3).

    ``K_t = I + u_t`` is column-stochastic and ``p_{t+1} = K_t p_t``. Velocity 0 at unreachable x.
    Raises ValueError on bad input (t must be < T).
    """
    kappa, t, _, pi, with_mask = _setup(q, kappa, t, vocab, source, coupling, allow_last=False)
    post = posterior_at(kappa[t], pi, vocab, with_mask)[0]
    kern = expected_conditional_kernel(post, rates_between(kappa[t], kappa[t + 1]), vocab, with_mask)
    return kern - np.eye(kern.shape[0])


def padded_posterior(post: np.ndarray, vocab: int, with_mask: bool):
    """``(states [M, L], delta_{x^i} [M, L, S], p_{1|t} zero-padded to S symbols [M, L, S], alive [M, L, 1])``
    for per-coordinate posteriors ``post [M, L, vocab]``; ``alive`` is False on unreachable rows (all zeros)."""
    _, length, v = post.shape
    xs = enumerate_states(vocab, length, with_mask=with_mask)
    eye = np.eye(num_symbols(vocab, with_mask))[xs]
    padded = np.zeros_like(eye)
    padded[..., :v] = post
    return xs, eye, padded, post.sum(-1, keepdims=True) > 0


def coordinate_velocity(coord_post, rate, vocab: int, *, with_mask: bool = True) -> np.ndarray:
    """Marginal per-coordinate velocity ``u^i(y, x) = r_i 1[movable] (p_{1|t}(y | x) - delta_{x^i}(y))``,
    ``[M, L, S]`` (THEORY S4: ``delta_{x1^i}`` replaced by the posterior). Zero on unreachable rows."""
    post = np.asarray(coord_post, dtype=np.float64)
    m, length, _ = post.shape
    r = np.broadcast_to(np.asarray(rate, dtype=np.float64), (length,))
    xs, eye, padded, alive = padded_posterior(post, vocab, with_mask)
    movable = (xs == vocab)[..., None] if with_mask else np.ones((m, length, 1), dtype=bool)
    return np.where(alive & movable, r[None, :, None] * (padded - eye), 0.0)
