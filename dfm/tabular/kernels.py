"""Joint transition kernels ``K[y, x] = K_t(y | x)`` (column-stochastic), velocities and checks.

A discrete-time velocity ``u[y, x]`` acts through ``K = I + u`` (THEORY notation
``K_t(. | x) = delta_x + u_t(., x)``). Kernels act on column vectors: ``p_{t+1} = K @ p_t``.
Per-coordinate kernels are given as factors ``f[x, i, y^i]`` (``[M, L, S]``, ``S`` symbols) and
multiplied into the joint product kernel (THEORY S4: "the product over coordinates of delta + u^i").
"""
from __future__ import annotations

import numpy as np

from dfm.tabular import _validate as V
from dfm.tabular.paths import rates_between
from dfm.tabular.posteriors import coordinate_velocity, padded_posterior
from dfm.tabular.states import enumerate_states, num_symbols, state_index


def product_kernel(factors, vocab: int, with_mask: bool = True) -> np.ndarray:
    """Joint kernel ``K[y, x] = prod_i f[x, i, y^i]`` from per-coordinate factors ``[C, L, S]``.

    Usually ``C = M`` (all states x, result ``[M, M]``); factors of a subset of states give those
    columns only (``[M, C]``). Rows y are in :func:`enumerate_states` order.
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.ndim != 3 or f.shape[2] != num_symbols(vocab, with_mask):
        raise ValueError(f"factors must have shape [C, length, {num_symbols(vocab, with_mask)}], got {f.shape}")
    m, length, s = f.shape
    out = f[:, 0, :]
    for i in range(1, length):  # outer products, first coordinate most significant (C order)
        out = (out[:, :, None] * f[:, i, None, :]).reshape(m, -1)
    return out.T


def coordinate_factors(coord_post, rate, vocab: int, with_mask: bool = True) -> np.ndarray:
    """Per-coordinate kernels ``delta(y, x^i) + u^i(y, x)`` as factors ``[M, L, S]``, with the marginal
    velocity of THEORY S4 (:func:`dfm.tabular.posteriors.coordinate_velocity`):
    ``u^i = r_i 1[x^i movable] (p_{1|t}(. | x) - delta_{x^i})``.

    With a mask a coordinate is movable iff it is masked; without a mask always (Gat et al.'s
    uniform-source form). A posterior row summing to 0 (unreachable state) stays put.
    """
    post = np.asarray(coord_post, dtype=np.float64)
    if post.ndim != 3 or post.shape[2] != vocab:
        raise ValueError(f"coord_post must have shape [M, L, {vocab}], got {post.shape}")
    u = coordinate_velocity(post, rate, vocab, with_mask=with_mask)
    xs = enumerate_states(vocab, post.shape[1], with_mask=with_mask)
    if xs.shape[0] != post.shape[0]:
        raise ValueError(f"coord_post must have {xs.shape[0]} rows (states), got {post.shape[0]}")
    return np.eye(num_symbols(vocab, with_mask))[xs] + u


def factorized_kernel_from_rate(coord_post, rate, vocab: int, *, with_mask: bool = True) -> np.ndarray:
    """Product kernel of :func:`coordinate_factors` for rates ``rate [L]``, ``[M, M]``."""
    return product_kernel(coordinate_factors(coord_post, rate, vocab, with_mask), vocab, with_mask)


def factorized_kernel(coord_post, kappa, t: int, vocab: int, *, with_mask: bool = True) -> np.ndarray:
    """Factorized sampler kernel at step t: product over coordinates of ``delta + u^i`` (THEORY S4, S6).

    coord_post: ``[M, L, vocab]`` per-coordinate posteriors (e.g. :func:`coordinate_posteriors`, or a
    model's denoiser table); kappa ``[T + 1, L]``. Returns ``K[y, x]`` ``[M, M]``.
    Raises ValueError on bad kappa / t / shapes.
    """
    kappa = V.check_kappa(kappa)
    t = V.check_step(t, kappa.shape[0] - 1)
    post = np.asarray(coord_post, dtype=np.float64)
    if post.ndim != 3 or post.shape[1] != kappa.shape[1]:
        raise ValueError(f"coord_post must have shape [M, {kappa.shape[1]}, vocab], got {post.shape}")
    return factorized_kernel_from_rate(post, rates_between(kappa[t], kappa[t + 1]), vocab, with_mask=with_mask)


def euler_kernel(coord_post, kappa_t, d_kappa_t, h: float, vocab: int, *, with_mask: bool = True) -> np.ndarray:
    """One Euler step of Gat et al.'s CTMC (THEORY S7): product over coordinates of
    ``delta_{x^i} + h * u_cont^i``, ``u_cont^i = d_kappa / (1 - kappa) (p_{1|t}(. | x) - delta_{x^i})``.

    The step size ``h * d_kappa / (1 - kappa)`` is clipped to 1 ("clipped as needed"); no indicator
    of masked coordinates is used (for a masked source the posterior of a revealed coordinate
    is ``delta_{x^i}``, so its velocity vanishes by itself). ``[M, M]``.
    """
    post = np.asarray(coord_post, dtype=np.float64)
    length = post.shape[1]
    k = np.broadcast_to(np.asarray(kappa_t, dtype=np.float64), (length,))
    dk = np.broadcast_to(np.asarray(d_kappa_t, dtype=np.float64), (length,))
    step = np.where(k < 1.0, np.minimum(1.0, h * dk / np.where(k < 1.0, 1.0 - k, 1.0)), 0.0)
    _, eye, padded, alive = padded_posterior(post, vocab, with_mask)
    factors = eye + np.where(alive, step[None, :, None] * (padded - eye), 0.0)
    return product_kernel(factors, vocab, with_mask)


def conditional_kernels(kappa, t: int, x1, vocab: int, *, x0=None, with_mask: bool = True) -> np.ndarray:
    """Conditional product kernels ``K_t(y | x, z)``, ``[Z, M, M]``, for a batch of ``z = x1`` or ``z = (x0, x1)``
    (THEORY S4). x1 ``[Z, L]``, x0 ``[Z, L]`` or None. See :func:`conditional_kernel` for the formula.

    Raises:
      ValueError: bad kappa / t, x1 or x0 of the wrong shape or with values out of range.
    """
    kappa = V.check_kappa(kappa)
    t = V.check_step(t, kappa.shape[0] - 1)
    length = kappa.shape[1]
    x1 = np.asarray(x1)
    if x1.ndim != 2 or x1.shape[1] != length:
        raise ValueError(f"x1 must have shape [Z, {length}], got {x1.shape}")
    state_index(x1, vocab, with_mask=False)  # validates values
    r = rates_between(kappa[t], kappa[t + 1])
    xs = enumerate_states(vocab, length, with_mask=with_mask)
    s = num_symbols(vocab, with_mask)
    eye = np.eye(s)[xs][None]  # [1, M, L, S]
    target = np.eye(s)[x1][:, None]  # [Z, 1, L, S]
    if x0 is not None:
        x0 = np.asarray(x0)
        if x0.shape != x1.shape:
            raise ValueError(f"x0 must have shape {x1.shape} (like x1), got {x0.shape}")
        state_index(x0, vocab, with_mask=with_mask)
        movable = (xs[None] == x0[:, None])[..., None]  # [Z, M, L, 1]
    elif with_mask:
        movable = (xs == vocab)[None, ..., None]
    else:
        movable = np.ones((1,) + xs.shape + (1,), dtype=bool)
    factors = eye + np.where(movable, r[None, None, :, None] * (target - eye), 0.0)  # [Z, M, L, S]
    z, m = factors.shape[0], xs.shape[0]
    out = factors[:, :, 0, :]
    for i in range(1, length):
        out = (out[..., :, None] * factors[:, :, i, None, :]).reshape(z, m, -1)
    return np.swapaxes(out, 1, 2)


def conditional_kernel(kappa, t: int, x1, vocab: int, *, x0=None, with_mask: bool = True) -> np.ndarray:
    """Conditional product kernel ``K_t(y | x, z)`` ``[M, M]`` for ``z = x1`` or ``z = (x0, x1)`` (THEORY S4).

    Per coordinate ``delta_{x^i} + r_t^i 1[x^i movable] (delta_{x1^i} - delta_{x^i})`` where movable
    means: ``x^i == m`` (masked source, default), ``x^i == x0^i`` (``x0`` given, source sample
    replaces the mask), or always (``with_mask=False`` and no ``x0``: Gat et al.'s form).
    x1, x0: ``[L]`` ints in ``[0, vocab)``. Raises ValueError on bad inputs.
    """
    x1 = np.asarray(x1)
    if x1.ndim != 1:
        raise ValueError(f"x1 must have shape [length], got {x1.shape}")
    x0b = None
    if x0 is not None:
        x0b = np.asarray(x0)
        if x0b.shape != x1.shape:
            raise ValueError(f"x0 must have shape {x1.shape}, got {x0b.shape}")
        x0b = x0b[None]
    return conditional_kernels(kappa, t, x1[None], vocab, x0=x0b, with_mask=with_mask)[0]


def sample_distribution(kernels, p0) -> np.ndarray:
    """Exact law after applying kernels in order: ``K_{T-1} ... K_0 p0``, ``[M]``."""
    p = np.asarray(p0, dtype=np.float64)
    for k in kernels:
        k = np.asarray(k, dtype=np.float64)
        if k.shape != (p.shape[0], p.shape[0]):
            raise ValueError(f"kernels must have shape [{p.shape[0]}, {p.shape[0]}], got {k.shape}")
        p = k @ p
    return p


def velocity_validity_error(u) -> float:
    """Max violation of (V1) ``sum_y u[y, x] = 0`` and (V2) ``0 <= delta + u <= 1`` (THEORY S1)."""
    u = np.asarray(u, dtype=np.float64)
    k = u + np.eye(u.shape[0])
    v1 = np.max(np.abs(u.sum(0)))
    v2 = max(np.max(-k), np.max(k - 1.0), 0.0)
    return float(max(v1, v2))


def markov_kernel_error(kernel) -> float:
    """Max violation of "K is a Markov kernel": ``K >= 0`` and columns sum to 1 (THEORY S1)."""
    k = np.asarray(kernel, dtype=np.float64)
    return float(max(np.max(np.abs(k.sum(0) - 1.0)), max(np.max(-k), 0.0)))


def divergence(u, p_t) -> np.ndarray:
    """``div(j)(y) = sum_{x != y} [j(x, y) - j(y, x)]`` for the flux ``j(y, x) = u(y, x) p_t(x)`` (THEORY S2)."""
    u = np.asarray(u, dtype=np.float64)
    j = u * np.asarray(p_t, dtype=np.float64)[None, :]
    np.fill_diagonal(j, 0.0)
    return j.sum(0) - j.sum(1)


def continuity_residual_divergence(p_t, p_next, u) -> np.ndarray:
    """Divergence form ``p_{t+1}(y) - p_t(y) + div(j_t)(y)``, ``[M]`` (THEORY S2)."""
    return np.asarray(p_next, dtype=np.float64) - np.asarray(p_t, dtype=np.float64) + divergence(u, p_t)


def continuity_residual_kernel(p_t, p_next, u) -> np.ndarray:
    """Kernel form ``p_{t+1} - (I + u) p_t``, ``[M]`` (THEORY S2)."""
    p_t = np.asarray(p_t, dtype=np.float64)
    return np.asarray(p_next, dtype=np.float64) - (p_t + np.asarray(u, dtype=np.float64) @ p_t)
