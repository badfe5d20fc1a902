"""Argument checks shared by the decentralization modules.

Every helper raises `ValueError` naming the argument and what was wrong. Checks that look at
values run only on concrete arrays: inside `jax.jit` (tracers) they are skipped, as the design
contract requires (docs/design.md, "Bad input").
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dfm.checks import is_tracer


def is_concrete(x: Any) -> bool:
    """True when `x` holds concrete values (not a jax tracer under `jit`/`vmap`/`scan`)."""
    return not is_tracer(x)


def as_feature_matrix(features: Any, name: str = "features", *, dim: int | None = None) -> np.ndarray:
    """Validate a feature matrix and return it as float64 numpy `[num_points, dim]`.

    Raises:
      ValueError: `features` is not 2-D, is empty, has the wrong width, or holds NaN/inf.
    """
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_points, dim], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, expected {dim}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf values (rows {rows}{'...' if bad.sum() > 5 else ''})")
    return arr


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return `value` as an int, raising ValueError unless it is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_weights(weights: Any, num_experts: int | None = None, name: str = "weights", *,
                  atol: float = 1e-4) -> None:
    """Validate router weights `[batch, K]`: 2-D, width K, and (when concrete) finite,
    non-negative rows summing to 1 within `atol`.

    Raises:
      ValueError: wrong rank, width different from `num_experts`, or invalid values.
    """
    shape = np.shape(weights)
    if len(shape) != 2:
        raise ValueError(f"{name} must have shape [batch, num_experts], got shape {shape}")
    if num_experts is not None and shape[1] != num_experts:
        raise ValueError(f"{name} has width {shape[1]} but there are {num_experts} experts")
    if not is_concrete(weights):
        return
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (w < 0).any():
        raise ValueError(f"{name} contains negative entries (min {w.min():.3g})")
    sums = w.sum(axis=1)
    if w.shape[0] and np.abs(sums - 1.0).max() > atol:
        raise ValueError(f"{name} rows must sum to 1, got sums in [{sums.min():.6g}, {sums.max():.6g}]")
