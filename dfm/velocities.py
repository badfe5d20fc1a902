"""Discrete-time velocities: conditional (S4), from a posterior, validity (S1), continuity (S2).

A velocity ``u [batch, length, num_states]`` is per coordinate: ``u[b, i, y] = u^i(y, x_t)``; the
factorized kernel is ``prod_i (delta_{x_t^i}(y^i) + u^i(y^i, x_t))`` (THEORY S4). States take values in
``[0, num_states)``: ``num_states = mask_id + 1`` (``= vocab + 1``) with a mask source, ``vocab`` without.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfm.checks import check_mask_id, check_probabilities, check_shape, check_tokens, is_tracer

Array = jax.Array


def _broadcast_rate(rate: Array, x_t: Array, name: str = "rate") -> Array:
    rate = jnp.asarray(rate)
    try:
        jnp.broadcast_shapes(rate.shape, x_t.shape)
    except ValueError:
        raise ValueError(f"{name}: shape {rate.shape} does not broadcast to x_t shape {x_t.shape}") from None
    return jnp.broadcast_to(rate, jnp.broadcast_shapes(rate.shape, x_t.shape))


def conditional_velocity(x_t: Array, x1: Array, rate: Array, num_states: int, *,
                         mask_id: int | None = None) -> Array:
    """The conditional velocity of the mixture path (THEORY S4).

    ``u^i(y) = rate^i * (delta_{x_1^i}(y) - delta_{x_t^i}(y))``: on a masked (or source-valued)
    coordinate it moves mass ``rate`` to ``x_1^i``; it is 0 on a revealed coordinate (``x_t^i = x_1^i``).
    With ``mask_id`` given (mask source) it is 0 on every coordinate with ``x_t^i != mask_id``, as S4
    states; this differs from the formula only off the conditional path (a revealed value other than
    ``x_1^i``, which has probability 0 given ``x_1``).

    Args:
      x_t: ``[batch, length]`` int states in ``[0, num_states)``.
      x1: ``[batch, length]`` int data.
      rate: ``[length]`` or ``[batch, length]``, ``(kappa_{t+1} - kappa_t) / (1 - kappa_t)``.
      num_states: size of the state space per coordinate.
      mask_id: the mask token for a mask source (``< num_states``), or None (uniform source).

    Returns:
      ``[batch, length, num_states]`` in the dtype of ``rate`` (float).

    Raises:
      ValueError: ``x1`` shape differs from ``x_t``; ``rate`` does not broadcast.
    """
    check_shape(x1, x_t.shape, "x1")
    rate = _broadcast_rate(rate, x_t)
    dtype = jnp.result_type(rate.dtype, float)
    diff = jax.nn.one_hot(x1, num_states, dtype=dtype) - jax.nn.one_hot(x_t, num_states, dtype=dtype)
    u = rate[..., None].astype(dtype) * diff
    if mask_id is not None:
        u = jnp.where((x_t == mask_id)[..., None], u, 0.0)
    return u


def posterior_to_velocity(posterior: Array, x_t: Array, rate: Array, *, mask_id: int | None = None) -> Array:
    """The marginal per-coordinate velocity from a posterior (denoiser) ``p_{1|t}`` (THEORY S4, S7).

    ``u^i(y) = rate^i * (p_{1|t}(y | x_t) - delta_{x_t^i}(y))`` with the posterior zero-padded to
    ``num_states``; with ``mask_id`` given (mask source) it is zero on revealed coordinates
    (``x_t^i != mask_id``). The continuous-time velocity of Gat et al. (flow_matching's
    ``MixtureDiscreteProbPath.posterior_to_velocity``) is the same with ``rate = d_kappa / (1 - kappa)``.

    Args:
      posterior: ``[batch, length, vocab]`` probabilities.
      x_t: ``[batch, length]`` int states in ``[0, num_states)``.
      rate: ``[length]`` or ``[batch, length]`` (``[batch, 1]`` for one time per sequence).
      mask_id: the mask token (``>= vocab``), or None for a uniform source.

    Returns:
      ``u [batch, length, num_states]``, ``num_states = mask_id + 1`` if ``mask_id`` else ``vocab``.

    Raises:
      ValueError: posterior not probabilities, shape mismatch, ``mask_id`` inside the vocabulary,
        ``x_t`` values outside ``[0, num_states)``.
    """
    check_shape(posterior, (*x_t.shape, None), "posterior")
    vocab = posterior.shape[-1]
    check_probabilities(posterior, "posterior")
    if mask_id is None:
        num_states = vocab
    else:
        check_mask_id(mask_id, vocab)
        num_states = vocab + 1 if is_tracer(mask_id) else int(mask_id) + 1
    check_tokens(x_t, num_states, "x_t")
    rate = _broadcast_rate(rate, x_t)
    dtype = jnp.result_type(posterior.dtype, rate.dtype, float)
    padded = jnp.pad(posterior.astype(dtype), [(0, 0)] * (posterior.ndim - 1) + [(0, num_states - vocab)])
    u = rate[..., None].astype(dtype) * (padded - jax.nn.one_hot(x_t, num_states, dtype=dtype))
    if mask_id is not None:
        u = jnp.where((x_t == mask_id)[..., None], u, 0.0)
    return u


def validity_error(u: Array, x_t: Array) -> Array:
    """Largest violation of (V1) ``sum_y u(y, x) = 0`` and (V2) ``0 <= delta_x(y) + u(y, x) <= 1``.

    THEORY S1: zero (up to rounding) iff each per-coordinate kernel ``delta + u`` is a Markov kernel.

    Args:
      u: ``[..., num_states]``; x_t: ``[...]`` int.

    Returns:
      scalar ``>= 0``.
    """
    check_shape(x_t, u.shape[:-1], "x_t")
    k = jax.nn.one_hot(x_t, u.shape[-1], dtype=u.dtype) + u
    v1 = jnp.max(jnp.abs(jnp.sum(u, axis=-1)), initial=0.0)
    v2 = jnp.maximum(jnp.max(-k, initial=0.0), jnp.max(k - 1.0, initial=0.0))
    return jnp.maximum(v1, v2)


def check_velocity(u: Array, x_t: Array, atol: float = 1e-6) -> None:
    """Raise ``ValueError`` naming ``u`` if it is not a valid velocity at ``x_t`` (THEORY S1).

    Skipped on tracers.
    """
    if is_tracer(u) or is_tracer(x_t):
        return
    err = float(validity_error(u, x_t))
    if not err <= atol:
        raise ValueError(f"u: not a valid velocity (V1/V2 violated by {err:.3g} > atol {atol:.3g})")


def continuity_residual(p_t: Array, p_next: Array, u: Array) -> Array:
    """Residual of the discrete continuity equation for a joint (tabular) velocity (THEORY S2).

    ``p_{t+1}(y) - p_t(y) + div(j)(y)`` with flux ``j(y, x) = u(y, x) p_t(x)`` for ``y != x`` and
    ``div(j)(y) = sum_{x != y} [j(x, y) - j(y, x)]`` (outflow minus inflow).

    Args:
      p_t, p_next: ``[M]`` distributions over the M joint states.
      u: ``[M (y), M (x)]`` joint velocity (column x is the current state).

    Returns:
      ``[M]`` residual; zero iff ``u`` generates ``p_t -> p_next`` (take ``max |.|``).
    """
    check_shape(u, (p_t.shape[0], p_t.shape[0]), "u")
    check_shape(p_next, p_t.shape, "p_next")
    j = u * p_t[None, :]
    j = j - jnp.diag(jnp.diag(j))
    div = jnp.sum(j, axis=0) - jnp.sum(j, axis=1)  # outflow from y minus inflow into y
    return p_next - p_t + div
