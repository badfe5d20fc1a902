"""Kappa schedules: continuous schedulers on ``t in [0, 1]`` and discrete per-position tables.

A mixture path (THEORY S4) reveals coordinate ``i`` by time ``t`` with probability ``kappa_t^i``.
Continuous schedulers follow Gat et al. 2024 (and ``flow_matching.path.scheduler``); the discrete
tables ``kappa[t, i]``, ``t = 0..T``, are per position, so that autoregression is a schedule
(THEORY S5): ``autoregressive(length)`` reveals position ``t`` at step ``t``.

Positions are 0-indexed, as everywhere (docs/theory.md, Notation): the AR schedule is ``kappa[t, i] = 1[i < t]``
(the specification's 1-indexed ``kappa_t^i = 1[i <= t]``), so ``x_t`` reveals the prefix ``x^{<t}``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from dfm.checks import check_kappa_table, is_tracer

Array = jax.Array


def _float_dtype():
    return jnp.result_type(float)


# ----------------------------------------------------------------------------------------------
# Continuous schedulers
# ----------------------------------------------------------------------------------------------
@runtime_checkable
class KappaScheduler(Protocol):
    """A continuous-time scheduler: ``kappa(t)`` nondecreasing on ``[0, 1]``, ``kappa(0) = 0``,
    ``kappa(1) = 1``, and its time derivative ``d_kappa(t)``. Both act elementwise on arrays."""

    def kappa(self, t: Array) -> Array: ...

    def d_kappa(self, t: Array) -> Array: ...


@dataclasses.dataclass(frozen=True)
class PolynomialScheduler:
    """``kappa(t) = t**n``, ``d_kappa(t) = n t**(n - 1)``; flow_matching's ``PolynomialConvexScheduler``.

    Raises:
      ValueError: if ``exponent <= 0``.
    """

    exponent: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.exponent, (int, float)) and self.exponent > 0):
            raise ValueError(f"exponent: must be a positive number, got {self.exponent!r}")

    def kappa(self, t: Array) -> Array:
        return jnp.asarray(t) ** self.exponent

    def d_kappa(self, t: Array) -> Array:
        return self.exponent * jnp.asarray(t) ** (self.exponent - 1)


@dataclasses.dataclass(frozen=True)
class LinearScheduler:
    """``kappa(t) = t``, ``d_kappa(t) = 1`` (flow_matching's ``CondOTScheduler``)."""

    def kappa(self, t: Array) -> Array:
        return jnp.asarray(t) * 1.0

    def d_kappa(self, t: Array) -> Array:
        return jnp.ones_like(jnp.asarray(t) * 1.0)


@dataclasses.dataclass(frozen=True)
class CosineScheduler:
    """``kappa(t) = sin(pi t / 2)**2``, ``d_kappa(t) = (pi / 2) sin(pi t)``."""

    def kappa(self, t: Array) -> Array:
        return jnp.sin(0.5 * jnp.pi * jnp.asarray(t)) ** 2

    def d_kappa(self, t: Array) -> Array:
        return 0.5 * jnp.pi * jnp.sin(jnp.pi * jnp.asarray(t))


# ----------------------------------------------------------------------------------------------
# Discrete per-position schedules
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete per-position schedule ``kappa [T + 1, length]`` (THEORY S4, S5).

    A registered pytree: ``kappa`` is a leaf, ``max_moves`` is static, so a schedule can be passed
    into ``jax.jit``. Build it with ``autoregressive``, ``any_order``, ``block``, ``discretize`` or
    ``from_kappa`` (these validate; the constructor itself does not, so that pytree unflattening
    inside transformations works).

    Attributes:
      kappa: ``[T + 1, length]`` float, ``kappa[0] = 0``, ``kappa[T] = 1``, nondecreasing in t.
      max_moves: static upper bound on the number of positions with ``rate > 0`` at any step.
    """

    kappa: Array
    max_moves: int

    @property
    def num_steps(self) -> int:
        """``T``, the number of sampling steps."""
        return self.kappa.shape[0] - 1

    @property
    def length(self) -> int:
        """Sequence length (number of positions)."""
        return self.kappa.shape[1]

    def rates(self) -> Array:
        """``rate[t, i] = (kappa[t+1, i] - kappa[t, i]) / (1 - kappa[t, i])`` (0 where kappa = 1).

        Returns ``[T, length]``, values in ``[0, 1]``: the probability that a still-masked
        coordinate is revealed at step ``t`` (THEORY S4; ``r_t^i`` of S5(d)).
        """
        return _rates(self.kappa)

    def moving_positions(self, t) -> Array:
        """Positions that may move at step ``t`` (``rate[t] > 0``), ``[max_moves]`` int32.

        Ascending; padded with repeats of the first moving position (or 0 if none moves). A padded
        entry is harmless: it names a position whose own rate applies, and the samplers write each
        position once. ``t`` may be traced.
        """
        return self.moving_table()[0][t]

    def moving_table(self) -> tuple[Array, Array]:
        """``(positions [T, max_moves] int32, valid [T, max_moves] bool)`` for all steps;
        ``valid`` is False on padded entries."""
        return _moving_table(self.kappa, self.max_moves)


@jax.jit
def _rates(kappa: Array) -> Array:
    k0, k1 = kappa[:-1], kappa[1:]
    denom = 1.0 - k0
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.clip(jnp.where(denom > 0, (k1 - k0) / safe, 0.0), 0.0, 1.0)


def _moving_row(rate_row: Array, max_moves: int) -> tuple[Array, Array]:
    idx = jnp.nonzero(rate_row > 0, size=max_moves, fill_value=-1)[0]
    valid = idx >= 0
    first = jnp.where(valid[0], idx[0], 0)
    return jnp.where(valid, idx, first).astype(jnp.int32), valid


@functools.partial(jax.jit, static_argnums=1)
def _moving_table(kappa: Array, max_moves: int) -> tuple[Array, Array]:
    return jax.vmap(lambda row: _moving_row(row, max_moves))(_rates(kappa))


jax.tree_util.register_dataclass(DiscreteSchedule, data_fields=["kappa"], meta_fields=["max_moves"])


def _max_moving(kappa: np.ndarray) -> int:
    k0, k1 = kappa[:-1], kappa[1:]
    moving = (k1 > k0) & (k0 < 1)
    return max(1, int(moving.sum(axis=1).max()))


def from_kappa(kappa, max_moves: int | None = None) -> DiscreteSchedule:
    """A validated custom schedule from a table ``kappa [T + 1, length]``.

    Args:
      kappa: ``[T + 1, length]``; must satisfy ``check_kappa_table``.
      max_moves: static bound on moving positions per step; default: the exact maximum.

    Raises:
      ValueError: naming ``kappa`` (non-monotone, outside [0, 1], wrong endpoints, wrong rank) or
        ``max_moves`` (smaller than the number of positions that move at some step).
    """
    if is_tracer(kappa):
        raise ValueError("kappa: from_kappa needs a concrete table (build schedules outside jit)")
    check_kappa_table(kappa, "kappa")
    a = np.asarray(kappa, dtype=np.float64)
    needed = _max_moving(a)
    if max_moves is None:
        max_moves = needed
    if not isinstance(max_moves, (int, np.integer)) or max_moves < needed:
        raise ValueError(f"max_moves: must be an int >= {needed} (positions moving at some step), got {max_moves!r}")
    return DiscreteSchedule(jnp.asarray(kappa, dtype=_float_dtype()), int(max_moves))


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def autoregressive(length: int) -> DiscreteSchedule:
    """The AR schedule of THEORY S5: ``T = length``, ``kappa[t, i] = 1[i < t]``, ``max_moves = 1``.

    At step ``t`` exactly position ``t`` is revealed (rate 1 there, 0 elsewhere): next-token sampling.
    """
    length = _check_positive_int(length, "length")
    t = np.arange(length + 1)[:, None]
    i = np.arange(length)[None, :]
    return DiscreteSchedule(jnp.asarray(i < t, dtype=_float_dtype()), 1)


def any_order(permutation) -> DiscreteSchedule:
    """Any-order AR (THEORY S5): position ``permutation[s]`` is revealed at step ``s + 1``.

    ``T = length``, ``kappa[t, perm[s]] = 1[s < t]``, ``max_moves = 1``.

    Raises:
      ValueError: if ``permutation`` is not a permutation of ``0..length-1``.
    """
    perm = np.asarray(permutation)
    if perm.ndim != 1 or perm.size == 0 or not np.issubdtype(perm.dtype, np.integer) \
            or not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise ValueError(f"permutation: must be a permutation of 0..length-1, got {perm.tolist()}")
    order = np.empty_like(perm)
    order[perm] = np.arange(perm.size)  # order[i] = step (0-based) at which position i is revealed
    t = np.arange(perm.size + 1)[:, None]
    return DiscreteSchedule(jnp.asarray(order[None, :] < t, dtype=_float_dtype()), 1)


def block(length: int, block_size: int) -> DiscreteSchedule:
    """Block AR (THEORY S5/S6): ``T = ceil(length / b)``, ``kappa[t, i] = 1[i // b < t]``, ``max_moves = b``."""
    length = _check_positive_int(length, "length")
    b = _check_positive_int(block_size, "block_size")
    num_steps = math.ceil(length / b)
    t = np.arange(num_steps + 1)[:, None]
    i = np.arange(length)[None, :]
    return DiscreteSchedule(jnp.asarray(i // b < t, dtype=_float_dtype()), min(b, length))


def discretize(scheduler: KappaScheduler, length: int, num_steps: int) -> DiscreteSchedule:
    """A continuous scheduler on ``T = num_steps`` equal steps: ``kappa[t, i] = scheduler.kappa(t / T)``.

    The same for every position; endpoints are set exactly to 0 and 1 and rounding is removed by a
    running maximum so the table is nondecreasing. ``max_moves = length``.

    Raises:
      ValueError: on a non-positive ``length``/``num_steps`` or a scheduler giving an invalid table.
    """
    length = _check_positive_int(length, "length")
    num_steps = _check_positive_int(num_steps, "num_steps")
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    k = np.array(scheduler.kappa(jnp.asarray(t, dtype=_float_dtype())), dtype=np.float64)
    k[0], k[-1] = 0.0, 1.0
    if not np.all(np.isfinite(k)):
        raise ValueError("scheduler: kappa(t) is not finite on [0, 1]")
    if k.min() < 0 or k.max() > 1:
        raise ValueError("scheduler: kappa(t) leaves [0, 1]")
    if np.diff(k).min() < -1e-6:
        raise ValueError("scheduler: kappa(t) must be nondecreasing on [0, 1]")
    k = np.maximum.accumulate(k)
    table = np.broadcast_to(k[:, None], (num_steps + 1, length))
    check_kappa_table(table, "scheduler")
    table = jnp.asarray(table, dtype=_float_dtype())
    return DiscreteSchedule(table, length)
