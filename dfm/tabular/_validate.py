"""Input validation for the tabular engine (numpy only; every error names the argument)."""
from __future__ import annotations

import numpy as np

ATOL = 1e-9  # tolerance for "sums to one" / "is nonnegative" on float64 inputs


def check_vocab_length(vocab, length=None) -> None:
    """Raise ValueError unless vocab (and length) are positive Python/numpy integers."""
    if not isinstance(vocab, (int, np.integer)) or isinstance(vocab, bool) or vocab < 1:
        raise ValueError(f"vocab must be a positive integer, got {vocab!r}")
    if length is not None and (
        not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1
    ):
        raise ValueError(f"length must be a positive integer, got {length!r}")


def check_distribution(name: str, p, size: int | None = None, axis: int = -1) -> np.ndarray:
    """Return p as float64 after checking: finite, >= 0, sums to 1 along axis, optional size."""
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be an array of probabilities, got a scalar")
    if size is not None and arr.shape[axis] != size:
        raise ValueError(f"{name} must have {size} entries along axis {axis}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if np.any(arr < -ATOL):
        raise ValueError(f"{name} must be nonnegative (min {arr.min():.3g})")
    sums = arr.sum(axis=axis)
    if np.any(np.abs(sums - 1.0) > 1e-6):
        raise ValueError(f"{name} must sum to 1 along axis {axis} (sums range {sums.min():.6g}..{sums.max():.6g})")
    return arr


def check_kappa(kappa) -> np.ndarray:
    """Return kappa [T + 1, length] as float64 after checking the schedule conventions (THEORY S4)."""
    arr = np.asarray(kappa, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"kappa must have shape [T + 1, length] with T >= 1, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("kappa must be finite")
    if np.any(arr[0] != 0.0) or np.any(arr[-1] != 1.0):
        raise ValueError("kappa must be exactly 0 at t = 0 and exactly 1 at t = T")
    if np.any(np.diff(arr, axis=0) < 0):
        raise ValueError("kappa must be nondecreasing in t")
    if np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("kappa must lie in [0, 1]")
    return arr


def check_step(t, num_steps: int, *, allow_last: bool = False) -> int:
    """Return t as int after checking 0 <= t < T (or <= T with allow_last)."""
    if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
        raise ValueError(f"t must be an integer step, got {t!r}")
    hi = num_steps if allow_last else num_steps - 1
    if not 0 <= t <= hi:
        raise ValueError(f"t must be in [0, {hi}], got {t}")
    return int(t)


def infer_length(size: int, vocab: int, name: str = "q") -> int:
    """Return L with vocab**L == size, else raise ValueError naming `name`."""
    length, n = 0, 1
    while n < size:
        n *= vocab
        length += 1
    if n != size or length == 0:
        raise ValueError(f"{name} must have vocab**length entries (vocab={vocab}), got {size}")
    return length
