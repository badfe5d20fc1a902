"""Input validation helpers shared by the core DFM modules.

Every check raises ``ValueError`` whose message starts with the argument's name and says what was
wrong. Checks run only on concrete arrays: given a ``jax.core.Tracer`` (inside ``jit``/``vmap``/
``scan``) they return silently, so core functions stay jit- and vmap-able.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def is_tracer(x) -> bool:
    """True if ``x`` is a jax Tracer (abstract value inside a transformation)."""
    return isinstance(x, jax.core.Tracer)


def _concrete(x) -> np.ndarray | None:
    """Return ``x`` as a numpy array, or None if it is a tracer (checks are then skipped)."""
    if is_tracer(x):
        return None
    return np.asarray(x)


def check_probabilities(p, name: str, axis: int = -1, atol: float = 1e-5) -> None:
    """Check that ``p`` holds probability vectors along ``axis``.

    Args:
      p: array ``[..., n]`` (any shape; normalized along ``axis``).
      name: argument name used in the error message.
      axis: the axis that must sum to 1.
      atol: tolerance for the sum and for negative entries (entries ``< -atol`` are errors).

    Raises:
      ValueError: if ``p`` contains NaN/inf, negative entries, or does not sum to 1 along ``axis``.
    """
    a = _concrete(p)
    if a is None:
        return
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: probabilities contain NaN or inf")
    if a.size and a.min() < -atol:
        raise ValueError(f"{name}: probabilities must be nonnegative, found minimum {a.min():.3g}")
    sums = a.sum(axis=axis)
    if sums.size and np.max(np.abs(sums - 1.0)) > atol:
        raise ValueError(
            f"{name}: probabilities must sum to 1 along axis {axis}, "
            f"found sums in [{sums.min():.6g}, {sums.max():.6g}]"
        )


def check_kappa_table(kappa, name: str = "kappa", atol: float = 0.0) -> None:
    """Check a discrete per-position schedule table ``kappa [T + 1, length]`` (THEORY S4).

    Requirements: 2-D with ``T >= 1``, finite, values in ``[0, 1]``, ``kappa[0] = 0``,
    ``kappa[T] = 1`` and nondecreasing in ``t`` (up to ``atol``).

    Raises:
      ValueError: naming ``name`` and the violated requirement.
    """
    a = _concrete(kappa)
    if a is None:
        return
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected shape [T + 1, length] with T >= 1, got {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    if a.min() < -atol or a.max() > 1 + atol:
        raise ValueError(f"{name}: values must lie in [0, 1], found [{a.min():.6g}, {a.max():.6g}]")
    if np.max(np.abs(a[0])) > atol:
        raise ValueError(f"{name}: kappa[0] must be 0 (source at t = 0), found max {np.abs(a[0]).max():.6g}")
    if np.max(np.abs(a[-1] - 1.0)) > atol:
        raise ValueError(f"{name}: kappa[T] must be 1 (data at t = T), found min {a[-1].min():.6g}")
    steps = np.diff(a, axis=0)
    if steps.min() < -atol:
        t, i = np.unravel_index(np.argmin(steps), steps.shape)
        raise ValueError(f"{name}: must be nondecreasing in t, but kappa[{t + 1}, {i}] < kappa[{t}, {i}]")


def check_mask_id(mask_id, vocab: int, name: str = "mask_id") -> None:
    """Check that the mask token lies outside the vocabulary: ``mask_id >= vocab`` (design.md).

    Raises:
      ValueError: if ``mask_id`` is not an integer or lies inside ``[0, vocab)``.
    """
    if is_tracer(mask_id):
        return
    if isinstance(mask_id, bool) or not np.issubdtype(np.asarray(mask_id).dtype, np.integer) \
            or np.ndim(mask_id) != 0:
        raise ValueError(f"{name}: must be an integer scalar, got {mask_id!r}")
    if int(mask_id) < int(vocab):
        raise ValueError(f"{name}: must lie outside the vocabulary [0, {vocab}) (use mask_id = vocab), got {int(mask_id)}")


def check_shape(x, expected: Sequence[int | None], name: str) -> None:
    """Check ``x.shape`` against ``expected`` (``None`` entries match any size).

    Shapes are static under ``jit``, so this check also runs on tracers.

    Raises:
      ValueError: if the rank or a fixed dimension differs.
    """
    shape = tuple(np.shape(x))
    expected = tuple(expected)
    ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
    if not ok:
        pretty = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {pretty}, got {list(shape)}")


def check_tokens(x, num_states: int, name: str) -> None:
    """Check that integer states ``x`` lie in ``[0, num_states)``.

    Raises:
      ValueError: if ``x`` is not an integer array or has values out of range.
    """
    if not np.issubdtype(np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype, np.integer):
        raise ValueError(f"{name}: expected an integer array of states, got dtype {getattr(x, 'dtype', type(x))}")
    a = _concrete(x)
    if a is None or a.size == 0:
        return
    if a.min() < 0 or a.max() >= num_states:
        raise ValueError(f"{name}: states must lie in [0, {num_states}), found [{a.min()}, {a.max()}]")


def check_rate(rate, name: str = "rate", atol: float = 1e-6) -> None:
    """Check that jump rates (probabilities per step) lie in ``[0, 1]``.

    Raises:
      ValueError: if ``rate`` has NaN or values outside ``[0, 1]``.
    """
    a = _concrete(rate)
    if a is None or a.size == 0:
        return
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    if a.min() < -atol or a.max() > 1 + atol:
        raise ValueError(f"{name}: rates must lie in [0, 1], found [{a.min():.6g}, {a.max():.6g}]")
