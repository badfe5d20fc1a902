"""A causal language model seen as a DFM denoiser: AR is the schedule of THEORY S5.

Conventions: input index ``j`` of a causal model holds ``x^{j-1}`` (``bos_id`` at ``j = 0``) and its
output row ``j`` predicts ``x^j``. Under ``schedules.autoregressive(length)`` the moving position at
step ``t`` is ``t`` and ``x_t`` reveals exactly the prefix ``x^{<t}`` (THEORY S5(a)), so row ``t`` of
``causal_fn(shift_right(x_t))`` is the exact next-token posterior ``p(x^t | x^{<t})`` (S5(b)); rows
``j > t`` read masked inputs and are never used (their rate is 0). Training needs one teacher-forced
pass: ``losses.ar_nll(causal_fn(shift_right(x1, bos_id)), x1)`` equals the AR DFM loss (S5(d)).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dfm.checks import check_shape

Array = jax.Array


def shift_right(x1: Array, bos_id: int) -> Array:
    """``[bos, x1[:, :-1]]``: the causal model's input, ``[batch, length]`` (dtype of ``x1``)."""
    check_shape(x1, (None, None), "x1")
    bos = jnp.full((x1.shape[0], 1), bos_id, dtype=x1.dtype)
    return jnp.concatenate([bos, x1[:, :-1]], axis=1)


def causal_denoiser(causal_fn: Callable[[Array], Array], bos_id: int) -> Callable[[Array], Array]:
    """Turn a causal LM into a denoiser over ``x_t``.

    Args:
      causal_fn: ``tokens [batch, length] -> logits [batch, length, vocab]``, causal (row j depends
        on inputs ``<= j`` only).
      bos_id: the begin-of-sequence token fed at input index 0.

    Returns:
      ``denoiser(x_t [batch, length]) -> logits [batch, length, vocab]``, row ``j`` = ``p(x^j | x_t^{<j})``,
      the posterior at the AR moving position (valid where the prefix ``x_t^{<j}`` is revealed).
    """

    def denoiser(x_t: Array) -> Array:
        return causal_fn(shift_right(x_t, bos_id))

    return denoiser


def causal_posterior_fn(step_fn: Callable[[Array, Array, Any], tuple[Array, Any]], bos_id: int):
    """A cached, one-token-per-step ``PosteriorFn`` for the AR schedule (``samplers`` contract).

    Args:
      step_fn: ``(tokens [batch] int, position int scalar, state) -> (logits [batch, vocab], state)``;
        consumes the input token at ``position`` (``x^{position-1}``, or ``bos_id`` at position 0),
        updates its cache ``state`` and returns logits predicting ``x^{position}``.
      bos_id: begin-of-sequence token.

    Returns:
      ``posterior_fn(x_t, t, positions, state) -> (logits [batch, 1, vocab], state)``. Valid only under
      ``schedules.autoregressive`` (``positions = [t]``): at step ``t`` it feeds ``bos_id`` if ``t == 0``
      else ``x_t[:, t - 1]`` (revealed at the previous step), so each step costs one cached token.
    """

    def posterior_fn(x_t, t, positions, state):
        position = positions[0]
        prev = jnp.take(x_t, jnp.maximum(position - 1, 0), axis=1)
        tokens = jnp.where(position == 0, jnp.asarray(bos_id, dtype=x_t.dtype), prev)
        logits, state = step_fn(tokens, position, state)
        return logits[:, None, :], state

    return posterior_fn


def prompted_posterior_fn(step_fn: Callable[[Array, Array, Any], tuple[Array, Any]], prompt_length: int):
    """A cached ``PosteriorFn`` that continues a prompt already in the cache (AR schedule).

    Generating ``length`` tokens after a prompt of ``P`` tokens (e.g. a conversation with image
    tokens, prefilled by ``MultimodalModel.prefill``) is the AR schedule over the ``length`` new
    positions: the state is ``(cache, first_logits [batch, vocab])`` where ``first_logits`` are the
    prefill's logits at the last prompt token (predicting new token 0). At step ``t`` it returns
    ``first_logits`` for ``t = 0``, else feeds ``x_t[:, t - 1]`` (revealed at the previous step) at
    absolute position ``P + t - 1`` through ``step_fn`` (``lax.cond``: one branch runs).

    Args:
      step_fn: ``(tokens [batch], position, cache) -> (logits [batch, vocab], cache)``, e.g.
        ``Decoder.decode_step`` / ``MultimodalModel.decode_step``.
      prompt_length: P, the number of prompt tokens in the cache.

    Returns:
      ``posterior_fn(x_t [batch, length], t, positions [1], state) -> (logits [batch, 1, vocab], state)``.
    """

    def posterior_fn(x_t, t, positions, state):
        cache, first = state
        position = positions[0]

        def first_step(cache):
            return first.astype(jnp.float32), cache

        def next_step(cache):
            token = jnp.take(x_t, jnp.maximum(position - 1, 0), axis=1)
            logits, cache = step_fn(token, prompt_length + position - 1, cache)
            return logits.astype(jnp.float32), cache

        logits, cache = jax.lax.cond(position == 0, first_step, next_step, cache)
        return logits[:, None, :], (cache, first)

    return posterior_fn
