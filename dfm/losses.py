"""DFM training losses: weighted denoiser cross-entropy (THEORY S5(d,e)), generalized KL, AR NLL.

All losses take denoiser *logits* ``[batch, length, vocab]`` (posterior ``p_{1|t} = softmax(logits)``)
and return per-sequence values ``[batch]`` (sum over positions) unless stated otherwise.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dfm.checks import check_mask_id, check_shape, check_tokens
from dfm.paths import sample_masked_path
from dfm.schedules import DiscreteSchedule

Array = jax.Array


def _pick(logits: Array, tokens: Array) -> Array:
    """``logits[..., tokens]`` as a masked sum (a select, not a gather: its gradient is elementwise)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.sum(jnp.where(iota == tokens[..., None].astype(jnp.int32), logits, 0.0), axis=-1)


def _log_prob_at(logits: Array, tokens: Array, lse: Array | None = None) -> Array:
    """``log softmax(logits)[..., tokens]`` for tokens in range, ``[batch, length]``.

    Computed as ``logits[tokens] - logsumexp(logits)``: the backward pass is then one fused
    elementwise ``softmax - onehot``, where ``take_along_axis`` of ``log_softmax`` needs a zeroed
    ``[batch, length, vocab]`` buffer and a scatter (about 15% of the decoder training step on CPU,
    see ``benchmarks/README.md``). ``lse`` may pass a precomputed ``logsumexp(logits, -1)``.
    """
    if lse is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
    return _pick(logits, tokens) - lse


def dfm_cross_entropy(logits: Array, x1: Array, x_t: Array, rate: Array, *, mask_id: int | None) -> Array:
    """Denoiser cross-entropy weighted by the step rates (THEORY S5(d,e)).

    ``sum_i rate^i 1[x_t^i = m] (-log p_{1|t}(x_1^i | x_t))``. Under the AR schedule the weight is 1 on
    the moving position and 0 elsewhere, so summing over ``t`` gives the AR NLL (S5(d)); for any masked
    schedule the sum over ``t`` upper-bounds ``-log`` of the sampler's probability of ``x_1`` (S5(e)).
    Terms with zero weight contribute exactly 0 (even if their log-probability is ``-inf``).

    Args:
      logits: ``[batch, length, vocab]`` denoiser logits at ``x_t``.
      x1: ``[batch, length]`` int data in ``[0, vocab)``.
      x_t: ``[batch, length]`` int noisy states.
      rate: ``[length]`` or ``[batch, length]`` step rates (``DiscreteSchedule.rates()[t]``).
      mask_id: the mask token; None (uniform source) weights every coordinate.

    Returns:
      ``[batch]`` in nats.

    Raises:
      ValueError: on shape mismatch, ``x1`` out of range, ``mask_id`` inside the vocabulary.
    """
    check_shape(logits, (*x1.shape, None), "logits")
    check_shape(x_t, x1.shape, "x_t")
    check_tokens(x1, logits.shape[-1], "x1")
    weight = jnp.broadcast_to(jnp.asarray(rate), x1.shape)
    if mask_id is not None:
        check_mask_id(mask_id, logits.shape[-1])
        weight = jnp.where(x_t == mask_id, weight, 0.0)
    nll = -_log_prob_at(logits, x1)
    return jnp.sum(jnp.where(weight > 0, weight * nll, 0.0), axis=-1)


_T_SAMPLING = ("uniform", "rate", "rate_stratified")


def step_proposal(schedule: DiscreteSchedule, t_sampling: str = "uniform") -> Array:
    """Probabilities ``q [T]`` with which `dfm_loss` draws the step ``t`` (THEORY S5(d)).

    ``"uniform"``: ``q(t) = 1 / T``. ``"rate"`` / ``"rate_stratified"``: ``q(t) proportional to
    mean_i rate[t, i]`` (steps where no position moves are never drawn; they contribute 0 to the
    objective). For a masked path with the same kappa at every position the weight of a masked
    position, ``rate[t] / q(t) = sum_s rate[s]``, is then the same at every step.

    Raises:
      ValueError: on an unknown ``t_sampling``.
    """
    if t_sampling not in _T_SAMPLING:
        raise ValueError(f"t_sampling: must be one of {_T_SAMPLING}, got {t_sampling!r}")
    if t_sampling == "uniform":
        return jnp.full((schedule.num_steps,), 1.0 / schedule.num_steps)
    mean_rate = jnp.mean(schedule.rates(), axis=-1)
    return mean_rate / jnp.sum(mean_rate)


def _draw_steps(key: Array, q: Array, batch: int, stratified: bool) -> Array:
    """``t [batch]`` with marginal ``q``; stratified: inverse CDF at ``frac(u + b / batch)`` (one ``u``)."""
    if stratified:
        u = jnp.mod(jax.random.uniform(key, (), dtype=q.dtype) + jnp.arange(batch, dtype=q.dtype) / batch, 1.0)
    else:
        u = jax.random.uniform(key, (batch,), dtype=q.dtype)
    cdf = jnp.cumsum(q)
    t = jnp.searchsorted(cdf / cdf[-1], u, side="right")
    return jnp.minimum(t, q.shape[0] - 1).astype(jnp.int32)


def dfm_loss(key: Array, denoiser: Callable[[Array], Array], x1: Array, schedule: DiscreteSchedule, *,
             mask_id: int, t_sampling: str = "uniform") -> Array:
    """The discrete-time DFM loss, one random step per sequence (THEORY S5(d,e)).

    Draws a step ``t ~ q`` per sequence, ``x_t ~ p_t(. | x_1)`` on the masked path, and returns
    ``dfm_cross_entropy(denoiser(x_t), x1, x_t, rate[t]) / q(t)``: an unbiased estimate of the
    objective ``sum_t E_{x_t}[dfm_cross_entropy_t]`` for every proposal ``q`` (importance
    sampling over t). (The path posterior of a masked path depends only on ``x_t``, so the
    denoiser is not given ``t``.)

    ``t_sampling`` chooses ``q`` (`step_proposal`); all three estimate the same objective:

    - ``"uniform"`` (default): ``t ~ U{0..T-1}``, loss ``T * dfm_cross_entropy_t``. For a linear
      kappa a masked position weighs ``T / (T - t)``, between 1 and ``T``: the few masked positions
      of a late step carry weight ``T`` each, a high-variance gradient at small batch sizes.
    - ``"rate"``: ``q(t)`` proportional to the mean step rate; every masked position then weighs
      ``sum_s rate[s]`` (about ``log T`` for a linear kappa) whatever the step: late steps (few
      masked positions, the ones that teach the use of context) are drawn more often instead of
      being up-weighted. Equal to ``"uniform"`` for the AR schedule.
    - ``"rate_stratified"``: ``q`` as ``"rate"``, and the batch's steps drawn jointly at the
      inverse CDF of ``frac(u + b / batch)`` (one ``u ~ U[0, 1)``, b = row): each row's step has
      marginal ``q`` (so each row is unbiased), and the batch covers the steps evenly.

    Args:
      key: jax PRNG key.
      denoiser: ``x_t [batch, length] -> logits [batch, length, vocab]``.
      x1: ``[batch, length]`` int data.
      schedule: ``DiscreteSchedule`` of length ``x1.shape[1]``.
      mask_id: the mask token (``>= vocab``).
      t_sampling: ``"uniform"``, ``"rate"`` or ``"rate_stratified"``.

    Returns:
      ``[batch]`` per-sequence loss in nats.

    Raises:
      ValueError: on shape mismatch or an unknown ``t_sampling``.
    """
    check_shape(x1, (None, schedule.length), "x1")
    q = step_proposal(schedule, t_sampling)
    key_t, key_x = jax.random.split(key)
    rates = schedule.rates()
    if t_sampling == "uniform":
        t = jax.random.randint(key_t, (x1.shape[0],), 0, schedule.num_steps)
        x_t = sample_masked_path(key_x, x1, schedule.kappa[t], mask_id)
        return schedule.num_steps * dfm_cross_entropy(denoiser(x_t), x1, x_t, rates[t], mask_id=mask_id)
    t = _draw_steps(key_t, q.astype(rates.dtype), x1.shape[0], t_sampling == "rate_stratified")
    x_t = sample_masked_path(key_x, x1, schedule.kappa[t], mask_id)
    return dfm_cross_entropy(denoiser(x_t), x1, x_t, rates[t] / q[t][:, None], mask_id=mask_id)


def generalized_kl(logits: Array, x1: Array, x_t: Array, kappa: Array, d_kappa: Array, *,
                   reduction: str = "mean") -> Array:
    """Generalized KL of Gat et al. 2024 for the mixture path; equals flow_matching's
    ``MixturePathGeneralizedKL`` (1.0.10) on the same inputs.

    ``l_i = -d_kappa / (1 - kappa) * [p_{1|t}(x_t^i | x_t) - delta_{x_1^i}(x_t^i)
    + (1 - delta_{x_1^i}(x_t^i)) log p_{1|t}(x_1^i | x_t)]``. States ``x_t^i >= vocab`` (the mask) have
    ``p_{1|t}(x_t^i) = 0``.

    Args:
      logits: ``[batch, length, vocab]``.
      x1: ``[batch, length]`` int data; x_t: ``[batch, length]`` int states.
      kappa, d_kappa: ``[batch]`` (one time per sequence, as flow_matching) or ``[batch, length]``.
      reduction: ``"none"`` (``[batch, length]``), ``"mean"`` or ``"sum"`` (scalars).

    Raises:
      ValueError: on an unknown ``reduction`` or shape mismatch.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction: must be 'none', 'mean' or 'sum', got {reduction!r}")
    check_shape(logits, (*x1.shape, None), "logits")
    check_shape(x_t, x1.shape, "x_t")
    vocab = logits.shape[-1]
    kappa, d_kappa = jnp.asarray(kappa), jnp.asarray(d_kappa)
    if kappa.ndim == 1:
        kappa, d_kappa = kappa[:, None], d_kappa[:, None]
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_p_x1 = _log_prob_at(logits, x1, lse)
    in_vocab = x_t < vocab
    p_xt = jnp.where(in_vocab, jnp.exp(_log_prob_at(logits, jnp.where(in_vocab, x_t, 0), lse)), 0.0)
    jump = jnp.broadcast_to(d_kappa / (1.0 - kappa), x1.shape)
    same = x_t == x1
    delta = same.astype(log_p_x1.dtype)
    loss = -jump * (p_xt - delta + jnp.where(same, 0.0, log_p_x1))
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    return loss


def ar_nll(causal_logits: Array, x1: Array) -> Array:
    """Autoregressive negative log-likelihood ``-sum_j log p(x_1^j | x_1^{<j})`` (THEORY S5(d)).

    Args:
      causal_logits: ``[batch, length, vocab]``, row ``j`` predicts ``x_1^j`` from ``x_1^{<j}``
        (one teacher-forced pass: ``causal_fn(shift_right(x1, bos_id))``).
      x1: ``[batch, length]`` int data.

    Returns:
      ``[batch]`` in nats.
    """
    check_shape(causal_logits, (*x1.shape, None), "causal_logits")
    check_tokens(x1, causal_logits.shape[-1], "x1")
    return -jnp.sum(_log_prob_at(causal_logits, x1), axis=-1)
