"""Mixture probability paths on the full state space (THEORY S4), exact in float64.

Per coordinate the conditional path interpolates between the source value and the data value:
``p_t(x^i | x0, x1) = (1 - kappa_t^i) delta_{x0^i} + kappa_t^i delta_{x1^i}``, with ``x0^i = m`` (mask,
``m = vocab``) for a masked source. A source is given as

* nothing (masked source: ``x0`` is the all-mask state; states include the mask, ``M = (vocab+1)**L``),
* ``source [D]``: ``x0 ~ source`` independent of ``x1`` (e.g. uniform), states ``[vocab]^L``,
* ``coupling [D (x0), D (x1)]``: a joint law ``pi(x0, x1)`` whose x1-marginal is ``q``.

Shapes: ``q [D]`` with ``D = vocab**L`` over data states (:func:`enumerate_states` with
``with_mask=False``); ``kappa [T + 1, L]``; paths ``[T + 1, M]``.
"""
from __future__ import annotations

import functools

import numpy as np

from dfm.tabular import _validate as V
from dfm.tabular._einsum import einsum
from dfm.tabular.states import enumerate_states


def rates(kappa) -> np.ndarray:
    """Discrete-time rates ``r[t, i] = (kappa[t+1, i] - kappa[t, i]) / (1 - kappa[t, i])``, ``[T, L]``.

    0 where ``kappa[t, i] = 1`` (THEORY S4 / S5(d) ``r_t^i``). Raises ValueError for a bad kappa.
    """
    kappa = V.check_kappa(kappa)
    return rates_between(kappa[:-1], kappa[1:])


def rates_between(kappa_t, kappa_next) -> np.ndarray:
    """Elementwise rate ``(kappa_next - kappa_t) / (1 - kappa_t)``, 0 where ``kappa_t == 1``."""
    k0 = np.asarray(kappa_t, dtype=np.float64)
    k1 = np.asarray(kappa_next, dtype=np.float64)
    denom = np.where(k0 < 1.0, 1.0 - k0, 1.0)
    return np.where(k0 < 1.0, (k1 - k0) / denom, 0.0)


def resolve_source(q, vocab: int, length: int, source=None, coupling=None):
    """Return ``(pi [S0, D], with_mask)`` for the source conventions of this module.

    Masked source: ``pi = q[None]`` (one source state, all-mask). ``source``: ``pi = source ⊗ q``.
    ``coupling``: validated joint law with x1-marginal ``q``.

    Raises:
      ValueError: both source and coupling given; wrong sizes; not distributions; coupling
        marginal differs from q.
    """
    d = vocab**length
    q = V.check_distribution("q", q, d)
    if source is not None and coupling is not None:
        raise ValueError("source and coupling are exclusive; pass one of them")
    if coupling is not None:
        pi = np.asarray(coupling, dtype=np.float64)
        if pi.shape != (d, d):
            raise ValueError(f"coupling must have shape [{d}, {d}], got {pi.shape}")
        V.check_distribution("coupling", pi.reshape(-1))
        if np.max(np.abs(pi.sum(0) - q)) > 1e-9:
            raise ValueError("coupling's x1-marginal (sum over axis 0) must equal q")
        return pi, False
    if source is not None:
        p0 = V.check_distribution("source", source, d)
        return p0[:, None] * q[None, :], False
    return q[None, :], True


def _source_values(vocab: int, length: int, with_mask: bool) -> np.ndarray:
    """Source states ``[S0, L]``: the all-mask state, or all data states."""
    if with_mask:
        return np.full((1, length), vocab, dtype=np.int64)
    return enumerate_states(vocab, length, with_mask=False)


def pair_path_at(kappa_t, vocab: int, with_mask: bool) -> np.ndarray:
    """Conditional path ``p_t(x | x0, x1)`` for all pairs, ``[M, S0, D]`` (small cases: ``M*S0*D`` floats)."""
    k = np.asarray(kappa_t, dtype=np.float64)
    length = k.shape[0]
    xs = enumerate_states(vocab, length, with_mask=with_mask)
    x0s = _source_values(vocab, length, with_mask)
    x1s = enumerate_states(vocab, length, with_mask=False)
    out = np.ones((xs.shape[0], x0s.shape[0], x1s.shape[0]))
    for i in range(length):
        at0 = xs[:, None, i] == x0s[None, :, i]
        at1 = xs[:, None, i] == x1s[None, :, i]
        out *= (1.0 - k[i]) * at0[:, :, None] + k[i] * at1[:, None, :]
    return out


@functools.lru_cache(maxsize=None)
def _mask_structure(vocab: int, length: int):
    """(revealed [M, L] bool, consistent [M, D] float): x^i != m, and x agrees with x1 where revealed."""
    xs = enumerate_states(vocab, length, with_mask=True)
    x1s = enumerate_states(vocab, length, with_mask=False)
    revealed = xs != vocab
    consistent = np.all((~revealed[:, None, :]) | (xs[:, None, :] == x1s[None, :, :]), axis=2).astype(np.float64)
    revealed.setflags(write=False)
    consistent.setflags(write=False)
    return revealed, consistent


def joint_path_at(kappa_t, pi, vocab: int, with_mask: bool) -> np.ndarray:
    """``J_t[x, x1] = sum_{x0} pi(x0, x1) p_t(x | x0, x1)``, ``[M, D]``, for one kappa row ``[L]``.

    ``J_t.sum(1)`` is the marginal path ``p_t``; ``J_t / p_t`` the posterior ``p_t(x1 | x)``.
    """
    k = np.asarray(kappa_t, dtype=np.float64)
    length = k.shape[0]
    pi = np.asarray(pi, dtype=np.float64)
    if with_mask:
        revealed, consistent = _mask_structure(vocab, length)
        weight = np.prod(np.where(revealed, k[None, :], 1.0 - k[None, :]), axis=1)  # [M]
        return consistent * (weight[:, None] * pi[0][None, :])
    eye_s = np.eye(vocab)
    tensor = pi.reshape((vocab,) * (2 * length))
    args: list = [tensor, list(range(2 * length))]
    for i in range(length):
        a_i = (1.0 - k[i]) * eye_s[:, :, None] + k[i] * eye_s[:, None, :]  # [x, x0, x1]
        args += [a_i, [2 * length + i, i, length + i]]
    out = list(range(2 * length, 3 * length)) + list(range(length, 2 * length))
    res = einsum(*args, out)
    return res.reshape(vocab**length, vocab**length)


def conditional_path(kappa, t: int, vocab: int, *, source=None, coupling=None) -> np.ndarray:
    """Conditional path ``p_t(x | x1)``, ``[M, D]`` (columns sum to 1; THEORY S4).

    Masked source by default; ``source [D]`` for an independent source; ``coupling [D, D]``
    for ``pi(x0, x1)`` (columns of x1 with zero marginal are zeros).
    Raises ValueError on bad kappa / t / source / coupling.
    """
    kappa = V.check_kappa(kappa)
    t = V.check_step(t, kappa.shape[0] - 1, allow_last=True)
    length = kappa.shape[1]
    V.check_vocab_length(vocab, length)
    d = vocab**length
    if coupling is not None:
        coupling = np.asarray(coupling, dtype=np.float64)
        pi, with_mask = resolve_source(coupling.sum(0), vocab, length, coupling=coupling)
    else:
        pi, with_mask = resolve_source(np.full(d, 1.0 / d), vocab, length, source=source)
    marg = pi.sum(0)
    joint = joint_path_at(kappa[t], pi, vocab, with_mask)
    safe = np.where(marg > 0, marg, 1.0)
    return np.where(marg[None, :] > 0, joint / safe[None, :], 0.0)


def marginal_path(q, kappa, vocab: int, *, source=None, coupling=None) -> np.ndarray:
    """Marginal probability path ``p_t(x) = sum_z p_t(x | z) pi(z)``, ``[T + 1, M]`` (THEORY S3/S4).

    ``p_0`` is the source law (all-mask delta for a masked source) and ``p_T`` is ``q`` (embedded).
    Raises ValueError on bad q / kappa / source / coupling.
    """
    kappa = V.check_kappa(kappa)
    length = kappa.shape[1]
    V.check_vocab_length(vocab, length)
    pi, with_mask = resolve_source(q, vocab, length, source, coupling)
    return np.stack([joint_path_at(k, pi, vocab, with_mask).sum(1) for k in kappa])


def single_conditional_path(kappa_t, x0, x1, vocab: int, with_mask: bool = True) -> np.ndarray:
    """``p_t(x | x0, x1) = prod_i [(1 - kappa^i) delta_{x0^i} + kappa^i delta_{x1^i}]`` for one pair, ``[M]``.

    ``x0 = None`` means the all-mask source (requires ``with_mask``). kappa_t ``[L]``; x0, x1 ``[L]``.
    """
    k = np.asarray(kappa_t, dtype=np.float64)
    length = k.shape[0]
    x1 = np.asarray(x1)
    x0 = np.full(length, vocab) if x0 is None else np.asarray(x0)
    if x1.shape != (length,) or x0.shape != (length,):
        raise ValueError(f"x0 and x1 must have shape [{length}], got {x0.shape} and {x1.shape}")
    xs = enumerate_states(vocab, length, with_mask=with_mask)
    out = np.ones(xs.shape[0])
    for i in range(length):
        out *= (1.0 - k[i]) * (xs[:, i] == x0[i]) + k[i] * (xs[:, i] == x1[i])
    return out
