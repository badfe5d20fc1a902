"""Mixture probability paths (THEORY S4): sample ``x_t`` given ``x_1`` (and the source ``x_0``).

``p_t(x^i | x_0, x_1) = (1 - kappa_t^i) delta_{x_0^i} + kappa_t^i delta_{x_1^i}``, independently over
coordinates. With a mask source ``x_0 = (m, .., m)``; with a uniform source ``x_0 ~ U([vocab]^length)``.
Gat et al. 2024; flow_matching's ``MixtureDiscreteProbPath.sample`` (there with one t per sequence).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfm.checks import check_mask_id, check_shape, check_tokens, is_tracer

Array = jax.Array


def mask_source(shape, mask_id: int) -> Array:
    """The all-mask source state ``x_0``: int32 array of ``shape`` (e.g. ``[batch, length]``) filled
    with ``mask_id``."""
    if not is_tracer(mask_id) and (isinstance(mask_id, bool) or int(mask_id) != mask_id or mask_id < 0):
        raise ValueError(f"mask_id: must be a nonnegative integer, got {mask_id!r}")
    return jnp.full(tuple(shape), mask_id, dtype=jnp.int32)


def uniform_source(key: Array, shape, vocab: int) -> Array:
    """A uniform-noise source ``x_0 ~ U([vocab]^shape)``, int32 of ``shape``.

    Raises:
      ValueError: if ``vocab < 1``.
    """
    if int(vocab) < 1:
        raise ValueError(f"vocab: must be >= 1, got {vocab!r}")
    return jax.random.randint(key, tuple(shape), 0, vocab, dtype=jnp.int32)


def sample_path(key: Array, x0: Array, x1: Array, kappa_t: Array) -> Array:
    """Sample ``x_t ~ p_t(. | x_0, x_1)``: ``x_t^i = x_1^i`` w.p. ``kappa_t^i``, else ``x_0^i`` (THEORY S4).

    Args:
      key: jax PRNG key.
      x0: ``[batch, length]`` int, source states.
      x1: ``[batch, length]`` int, data.
      kappa_t: ``[length]`` or ``[batch, length]`` (or ``[batch, 1]``) probabilities in ``[0, 1]``.

    Returns:
      ``x_t [batch, length]`` with the dtype of ``x1``. Exact for kappa in {0, 1}.

    Raises:
      ValueError: on shape mismatch between ``x0`` and ``x1`` or a ``kappa_t`` that does not broadcast.
    """
    check_shape(x1, (None, None), "x1")
    check_shape(x0, x1.shape, "x0")
    kappa_t = jnp.asarray(kappa_t)
    kappa_t = kappa_t.astype(jnp.result_type(kappa_t.dtype, float))
    try:
        jnp.broadcast_shapes(kappa_t.shape, x1.shape)
    except ValueError:
        raise ValueError(f"kappa_t: shape {kappa_t.shape} does not broadcast to x1 shape {x1.shape}") from None
    u = jax.random.uniform(key, x1.shape, dtype=kappa_t.dtype)
    return jnp.where(u < kappa_t, x1, x0.astype(x1.dtype))


def sample_masked_path(key: Array, x1: Array, kappa_t: Array, mask_id: int) -> Array:
    """Sample the masked path: ``x_t^i = x_1^i`` w.p. ``kappa_t^i``, else ``mask_id`` (THEORY S4).

    Args:
      x1: ``[batch, length]`` int tokens in ``[0, vocab)`` with ``vocab <= mask_id``.
      kappa_t: ``[length]`` or ``[batch, length]``.
      mask_id: the mask token (``vocab`` by convention).

    Raises:
      ValueError: if ``x1`` contains ``mask_id`` or larger values (a mask id inside the vocabulary).
    """
    check_shape(x1, (None, None), "x1")
    if not is_tracer(mask_id):
        check_mask_id(mask_id, 0)
        check_tokens(x1, int(mask_id), "x1")
    return sample_path(key, jnp.full(x1.shape, mask_id, dtype=x1.dtype), x1, kappa_t)
