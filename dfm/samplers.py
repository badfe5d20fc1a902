"""``jax.lax.scan`` samplers for factorized DFM: discrete time (THEORY S4-S6) and Euler (S7); the law of
their draws is checked end to end by ``proofs_check`` row S7.law.

One internal scan over a rate table ``rate [T, length]`` serves both samplers. At step ``s`` each
coordinate ``i`` that may move draws its next value from ``transition_probabilities``: the kernel
``delta_{x^i} + u^i`` with ``u^i = rate (p_{1|t} - delta_{x^i})`` computed by
``dfm.velocities.posterior_to_velocity`` (zero on revealed coordinates with a mask source). So the
sampler's jump rule and the velocity of THEORY S4 / S7 are one implementation, and
``proofs_check`` checks the sampler's own kernel against the enumeration.

The model is a *posterior function* (``PosteriorFn``)::

    posterior_fn(x_t [batch, length] int, t, positions [m] int32, state) -> (logits [batch, m, vocab], state)

``t`` is the integer step (discrete sampler) or the float time ``s / T`` (Euler sampler).
``positions`` are the coordinates that may move this step (``DiscreteSchedule.moving_positions``), so
under the AR schedule (``max_moves = 1``) the model is asked for one position per step and a cached
model does O(1) work per step; ``state`` (e.g. a KV cache, any pytree, or None) is threaded through
the scan.

Guards: with a mask source, logits whose class count ``vocab`` has ``mask_id < vocab`` are refused at
trace time (ValueError naming ``posterior_fn``); ``check_finite=True`` reports the first step whose
logits or transition probabilities are not finite (``FloatingPointError``; see ``sample_discrete``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfm.checks import check_mask_id, check_rate, check_shape, is_tracer
from dfm.schedules import DiscreteSchedule, KappaScheduler
from dfm.velocities import posterior_to_velocity

Array = jax.Array
PosteriorFn = Callable[[Array, Array, Array, Any], tuple[Array, Any]]


def posterior_fn_from_denoiser(fn: Callable[..., Array], *, with_time: bool = False) -> PosteriorFn:
    """Adapt a stateless denoiser ``fn(x_t) -> logits [batch, length, vocab]`` to a ``PosteriorFn``.

    With ``with_time=True`` the denoiser is called as ``fn(x_t, t)``. The full posterior is computed
    and the rows at ``positions`` are returned; ``state`` is passed through unchanged.
    """

    def posterior_fn(x_t, t, positions, state):
        logits = fn(x_t, t) if with_time else fn(x_t)
        if _is_all_positions(positions, logits.shape[1]):
            return logits, state                                   # Euler sampler: no gather
        return jnp.take(logits, positions, axis=1), state

    return posterior_fn


def _is_all_positions(positions, length: int) -> bool:
    """True for a concrete (numpy) ``positions == arange(length)``, as the Euler sampler passes."""
    return (isinstance(positions, np.ndarray) and positions.shape == (length,)
            and bool(np.all(positions == np.arange(length))))


def euler_rates(scheduler: KappaScheduler, length: int, num_steps: int) -> Array:
    """Jump probabilities of the Euler sampler (THEORY S7), ``[num_steps, length]``.

    ``rate[s] = min(1, h * d_kappa(t_s) / (1 - kappa(t_s)))`` with ``h = 1 / T``, ``t_s = s h``; the last
    step has rate 1 (every coordinate still masked is drawn from ``p_{1|t}``, as flow_matching's
    ``MixtureDiscreteEulerSolver`` sets ``x_t = x_1`` on its final step). They differ from the exact
    rates of ``discretize(scheduler, length, T).rates()`` by at most
    ``h^2 max|kappa''| / (2 (1 - kappa(t_s)))`` per step: ``O(h^2)`` where ``1 - kappa`` stays away from 0,
    not in the last steps of e.g. the cosine scheduler; the sampler's law still converges to q at rate
    ``O(1/T)`` in total variation (THEORY S7).

    Raises:
      ValueError: if ``num_steps`` or ``length`` is not a positive integer.
    """
    for name, v in (("num_steps", num_steps), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    return _euler_rates(scheduler, length, num_steps)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _euler_rates(scheduler, length, num_steps):
    dtype = jnp.result_type(float)
    h = 1.0 / num_steps
    t = jnp.arange(num_steps, dtype=dtype) * h
    kappa = jnp.asarray(scheduler.kappa(t), dtype)
    d_kappa = jnp.asarray(scheduler.d_kappa(t), dtype)
    denom = 1.0 - kappa
    r = jnp.where(denom > 0, h * d_kappa / jnp.where(denom > 0, denom, 1.0), 1.0)
    r = jnp.clip(r, 0.0, 1.0).at[-1].set(1.0)
    return jnp.broadcast_to(r[:, None], (num_steps, length))


def categorical(key: Array, logits: Array) -> Array:
    """One draw from ``softmax(logits)`` over the last axis by inverse CDF: ``[..., vocab] -> [...]`` int32.

    One uniform per draw (``jax.random.categorical``'s Gumbel-max uses ``vocab`` of them and a
    variadic argmax, about 5x slower on CPU for ``[4096, 32]``, see ``benchmarks/README.md``). Token
    ``j`` is drawn iff ``cdf[j-1] <= u * cdf[-1] < cdf[j]`` with ``cdf = cumsum(exp(logits - max))``,
    so its probability is ``p_j`` up to float rounding (uniform resolution ``2**-24`` of the total
    mass, as Gumbel-max's "low" mode); a token with ``p_j = 0`` (logit ``-inf``) is never drawn.
    """
    vocab = logits.shape[-1]
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))         # unnormalized, max entry 1
    cdf = _cumsum_last(w)
    x = jax.random.uniform(key, logits.shape[:-1] + (1,), dtype=cdf.dtype) * cdf[..., -1:]
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    positive = w > 0
    first = jnp.min(jnp.where((cdf > x) & positive, iota, vocab), axis=-1)
    last = jnp.max(jnp.where(positive, iota, 0), axis=-1)                # x rounded up to the total mass
    return jnp.where(first < vocab, first, last)


_MATMUL_CUMSUM_MAX_VOCAB = 64


def _cumsum_last(w: Array) -> Array:
    """Inclusive cumulative sum over the last axis. For a small last axis (``<= 64``) it is one matmul
    with an upper-triangular ones matrix (XLA's CPU ``cumsum`` is ~4x slower at ``[4096, 32]``)."""
    vocab = w.shape[-1]
    if vocab > _MATMUL_CUMSUM_MAX_VOCAB:
        return jnp.cumsum(w, axis=-1)
    upper = jnp.triu(jnp.ones((vocab, vocab), dtype=w.dtype))             # upper[k, j] = 1[k <= j]
    return jnp.matmul(w, upper, precision=jax.lax.Precision.HIGHEST)


def posterior_probabilities(logits: Array, temperature: float = 1.0) -> Array:
    """The posterior the sampler draws from: ``softmax(logits / temperature)``, or the one-hot of the
    argmax for ``temperature = 0`` (greedy), ``[..., vocab]``."""
    if not is_tracer(temperature) and temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)
    if not is_tracer(temperature) and temperature == 1:
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.softmax(logits / temperature, axis=-1)


def transition_probabilities(logits: Array, x: Array, rate: Array, *, temperature: float = 1.0,
                             mask_id: int | None = None) -> Array:
    """One step of the factorized sampler per coordinate: ``K^i = delta_{x^i} + u^i`` (THEORY S4, S7).

    ``u^i = rate^i (p_{1|t} - delta_{x^i})`` from ``dfm.velocities.posterior_to_velocity`` with the
    posterior ``posterior_probabilities(logits, temperature)``; with a mask source it is zero on
    revealed coordinates (``x^i != mask_id``), which therefore stay.

    Args:
      logits: ``[batch, m, vocab]`` the posterior's logits at the moving coordinates.
      x: ``[batch, m]`` int their current values (``mask_id`` or a token).
      rate: ``[m]`` or ``[batch, m]`` jump probabilities in [0, 1].
      temperature: ``>= 0``; mask_id: the mask token (``>= vocab``) or None (uniform source).

    Returns:
      ``[batch, m, num_states]`` probabilities (``num_states = mask_id + 1`` or ``vocab``).

    Raises:
      ValueError: as ``posterior_to_velocity`` (e.g. ``mask_id`` inside the vocabulary), on
        concrete inputs.
    """
    probs = posterior_probabilities(logits, temperature)
    u = posterior_to_velocity(probs, x, rate, mask_id=mask_id)
    return jax.nn.one_hot(x, u.shape[-1], dtype=u.dtype) + u


def _scan_sampler(key, posterior_fn, rates, times, positions, valid, x0, *, temperature, mask_id, state,
                  return_intermediates, check_finite=False):
    """The one scan: rates/times/positions/valid are ``[T, length]``/``[T]``/``[T, m]``/``[T, m]``.

    ``positions = valid = None`` means every position may move at every step (the Euler sampler):
    ``posterior_fn`` gets ``arange(length)`` (a numpy array, so that ``posterior_fn_from_denoiser``
    can skip its gather) and the per-step gather/scatter of the moving coordinates is skipped
    (same law, same random draws).

    ``check_finite`` adds a running ``first_bad`` step index (int32, -1 while all steps are finite) to
    the carry and the step index to the scanned inputs, and reports it once after the scan
    (``_report_non_finite``); without it the program is the one of earlier versions.
    """
    check_shape(x0, (None, None), "x0")
    if not is_tracer(temperature) and not float(temperature) >= 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature!r}")
    if mask_id is not None:
        check_mask_id(mask_id, 0)
    check_rate(rates, "rates")
    batch, length = x0.shape
    if rates.shape[1] != length:
        raise ValueError(f"x0: length {length} does not match the schedule length {rates.shape[1]}")
    dense = positions is None
    num_moves = length if dense else positions.shape[1]
    keys = jax.random.split(key, rates.shape[0])
    all_positions = np.arange(length, dtype=np.int32)                  # concrete: see _is_all_positions

    def step(carry, xs):
        if check_finite:
            (x, st, first_bad), (xs, s) = carry, xs
        else:
            x, st = carry
        if dense:
            k, rate_row, t = xs
            pos = all_positions
        else:
            k, rate_row, t, pos, ok = xs
        logits, st = posterior_fn(x, t, pos, st)
        if logits.ndim != 3 or logits.shape[:2] != (batch, num_moves):
            raise ValueError(
                f"posterior_fn: returned logits of shape {tuple(logits.shape)}, expected "
                f"[batch={batch}, positions={num_moves}, vocab]")
        _check_classes(logits.shape[-1], mask_id)
        x_pos = x if dense else jnp.take(x, pos, axis=1)               # [batch, m]
        r = rate_row if dense else jnp.take(rate_row, pos)             # [m]
        kernel = transition_probabilities(logits, x_pos, r.astype(logits.dtype), temperature=temperature,
                                          mask_id=mask_id)
        new = categorical(k, jnp.log(kernel)).astype(x.dtype)
        if dense:
            x = new
        else:
            idx = jnp.where(ok, pos, length)                           # padded entries: dropped
            x = x.at[:, idx].set(new, mode="drop")
        if check_finite:
            finite = (~jnp.any(jnp.isnan(logits) | jnp.isposinf(logits))) & jnp.all(jnp.isfinite(kernel))
            first_bad = jnp.where((first_bad < 0) & ~finite, s, first_bad)
            return (x, st, first_bad), (x if return_intermediates else None)
        return (x, st), (x if return_intermediates else None)

    scanned = (keys, rates, times) if dense else (keys, rates, times, positions, valid)
    if check_finite:
        steps = jnp.arange(rates.shape[0], dtype=jnp.int32)
        (x, state, first_bad), xs = jax.lax.scan(step, (x0, state, jnp.int32(-1)), (scanned, steps))
        _report_non_finite(first_bad, posterior_fn, rates.shape[0])
    else:
        (x, state), xs = jax.lax.scan(step, (x0, state), scanned)
    if return_intermediates:
        return x, jnp.concatenate([x0[None], xs], axis=0)
    return x


def _check_classes(vocab: int, mask_id) -> None:
    """Trace-time check (shapes are static) that the posterior's class count leaves ``mask_id`` outside
    the vocabulary: ``mask_id >= vocab``. Skipped when ``mask_id`` is None or traced."""
    if mask_id is None or is_tracer(mask_id):
        return
    if int(mask_id) < int(vocab):
        raise ValueError(
            f"posterior_fn: returned logits over {vocab} classes, but mask_id={int(mask_id)} lies inside "
            f"[0, {vocab}): the mask must lie outside the posterior's vocabulary (mask_id >= {vocab}), "
            "else samples may hold the mask or ids outside the vocabulary")


def _non_finite_message(posterior_fn, step: int, num_steps: int) -> str:
    name = getattr(posterior_fn, "__qualname__", None) or type(posterior_fn).__name__
    return (f"posterior_fn ({name}): non-finite logits (NaN or +inf) or transition probabilities, first "
            f"at step {step} (steps 0..{num_steps - 1}); raised because check_finite=True")


def _report_non_finite(first_bad, posterior_fn, num_steps: int) -> None:
    """Raise ``FloatingPointError`` when ``first_bad >= 0``: now if it is concrete (an eager call), else
    from a host callback when the compiled program runs (JAX re-raises it as its runtime error)."""
    if not is_tracer(first_bad):
        if int(first_bad) >= 0:
            raise FloatingPointError(_non_finite_message(posterior_fn, int(first_bad), num_steps))
        return

    def report(bad):
        bad = np.asarray(bad).reshape(-1)                              # [] (or [n] under vmap)
        bad = bad[bad >= 0]
        if bad.size:
            raise FloatingPointError(_non_finite_message(posterior_fn, int(bad.min()), num_steps))

    jax.debug.callback(report, first_bad)


def sample_discrete(key: Array, posterior_fn: PosteriorFn, schedule: DiscreteSchedule, x0: Array, *,
                    temperature: float = 1.0, mask_id: int | None = None, state: Any = None,
                    return_intermediates: bool = False, check_finite: bool = False):
    """Discrete-time factorized sampler ``X_{t+1} ~ prod_i (delta + u_t^i)(. | X_t)`` (THEORY S4-S6).

    At step ``t = 0..T-1`` the coordinates ``schedule.moving_positions(t)`` draw their next value from
    ``transition_probabilities``: a still-masked coordinate jumps with probability ``rate[t, i]`` to a
    draw from ``softmax(logits / temperature)`` (``temperature = 0``: the argmax). Under ``autoregressive(length)`` this is next-token sampling, exact for the
    exact posterior (THEORY S5(c)).

    Args:
      key: jax PRNG key.
      posterior_fn: ``PosteriorFn`` (see module docstring); called with the integer step ``t``.
      schedule: ``DiscreteSchedule`` with ``length`` equal to ``x0.shape[1]``.
      x0: ``[batch, length]`` int source states (``mask_source`` or ``uniform_source``).
      temperature: ``>= 0`` (a Python float; 0 is greedy).
      mask_id: mask token for a mask source (only masked coordinates move), None for a uniform source.
      state: initial model state (pytree or None), threaded through the scan.
      return_intermediates: also return all states ``xs [T + 1, batch, length]`` (``xs[0] = x0``).
      check_finite: detect a bad posterior: a step is bad when its logits hold NaN or +inf, or its
        transition probabilities a non-finite value (e.g. a moving coordinate whose logits are all
        -inf); -inf logits alone (tokens of probability 0) are fine. A running flag is carried in
        the scan and reported once after it (no per-step host callback). False (default): no check,
        the compiled program is unchanged.

    Returns:
      ``x1 [batch, length]`` or ``(x1, xs)``.

    Raises:
      ValueError: bad ``x0`` shape or length, negative ``temperature``, invalid ``mask_id``,
        ``posterior_fn`` returning logits of the wrong shape, or (at trace time) logits whose class
        count ``vocab`` has ``mask_id < vocab`` (the message names ``posterior_fn``, ``vocab`` and
        ``mask_id``).
      FloatingPointError: with ``check_finite=True``, some step was bad; the message names
        ``posterior_fn`` and the first bad step. Raised directly by an eager call. Inside ``jax.jit``
        (or any trace) it is raised by a host callback when the compiled program runs, and JAX
        re-raises it as ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``; ``XlaRuntimeError`` in
        older JAX) whose message contains ``FloatingPointError: posterior_fn ...``; it surfaces at
        the call or, with asynchronous dispatch, when the result is first read.
    """
    # A concrete schedule closed over inside jit: build its tables now, not as constants that XLA
    # folds at compile time (seconds for an AR schedule of length 256; same values either way).
    with jax.ensure_compile_time_eval():
        positions, valid = schedule.moving_table()
        rates = schedule.rates()
    times = jnp.arange(schedule.num_steps, dtype=jnp.int32)
    return _scan_sampler(key, posterior_fn, rates, times, positions, valid, x0, temperature=temperature,
                         mask_id=mask_id, state=state, return_intermediates=return_intermediates,
                         check_finite=check_finite)


def sample_euler(key: Array, posterior_fn: PosteriorFn, scheduler: KappaScheduler, x0: Array,
                 num_steps: int, *, temperature: float = 1.0, mask_id: int | None = None,
                 state: Any = None, return_intermediates: bool = False, check_finite: bool = False):
    """Continuous-time Euler sampler of Gat et al. 2024 for the mixture path (THEORY S7).

    Step ``s`` (time ``t = s / T``) uses ``euler_rates``: ``min(1, h d_kappa / (1 - kappa))``, every
    position may move (``positions = arange(length)``), and ``posterior_fn`` gets the float time ``t``.
    Same arguments (``check_finite`` included), returns and errors as ``sample_discrete``; the step
    named by a ``FloatingPointError`` is the step index ``s`` (time ``s / T``).
    """
    length = x0.shape[1]
    rates = euler_rates(scheduler, length, num_steps)
    times = jnp.arange(num_steps, dtype=rates.dtype) / num_steps
    return _scan_sampler(key, posterior_fn, rates, times, None, None, x0, temperature=temperature,
                         mask_id=mask_id, state=state, return_intermediates=return_intermediates,
                         check_finite=check_finite)
