"""Random test distributions, schedules, couplings and Markov kernels (numpy Generator only).

Three kinds of distributions exercise the edge cases of the exact engine:
``dirichlet`` (generic, full support), ``sparse`` (exact zeros, so some states are unreachable)
and ``peaked`` (one atom carries almost all the mass).
"""
from __future__ import annotations

import numpy as np

KINDS = ("dirichlet", "sparse", "peaked")


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _check_size(size) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def random_distribution(rng, size: int, *, kind: str = "dirichlet") -> np.ndarray:
    """A random probability vector ``[size]`` (float64, sums to 1).

    kind: ``"dirichlet"`` (flat Dirichlet), ``"sparse"`` (Dirichlet with a random subset of
    entries set to exactly 0, at least one kept), ``"peaked"`` (one entry ``>= 0.9``).

    Raises:
      ValueError: rng not a Generator, size not a positive int, unknown kind.
    """
    _check_rng(rng)
    size = _check_size(size)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = rng.dirichlet(np.ones(size))
    if kind == "sparse" and size > 1:
        n_zero = int(rng.integers(1, size))
        p[rng.choice(size, size=n_zero, replace=False)] = 0.0
        if p.sum() == 0.0:  # pragma: no cover - dirichlet entries are a.s. positive
            p[rng.integers(size)] = 1.0
    elif kind == "peaked":
        eps = 10.0 ** rng.uniform(-4, -1)
        p = eps * p
        p[rng.integers(size)] += 1.0 - eps
    return p / p.sum()


def random_kind(rng) -> str:
    """One of :data:`KINDS`, uniformly."""
    _check_rng(rng)
    return KINDS[int(rng.integers(len(KINDS)))]


def random_kappa(rng, num_steps: int, length: int, *, p_snap: float = 0.3) -> np.ndarray:
    """A random per-position schedule ``kappa [T + 1, length]`` (THEORY S4 conventions).

    Each column is nondecreasing with exact ``kappa[0] = 0`` and ``kappa[T] = 1``; interior values
    are sorted uniforms, each snapped to exactly 0 or 1 with probability ``p_snap`` (so positions
    can be fully revealed early, or stay masked until late, and some steps have rate 0 or 1).
    """
    _check_rng(rng)
    num_steps, length = _check_size(num_steps), _check_size(length)
    inner = rng.uniform(size=(num_steps - 1, length))
    snap = rng.uniform(size=inner.shape) < p_snap
    inner = np.where(snap, np.round(rng.uniform(size=inner.shape)), inner)
    inner = np.sort(inner, axis=0)
    return np.concatenate([np.zeros((1, length)), inner, np.ones((1, length))], axis=0)


def random_coupling(rng, q, source_size: int | None = None, *, kind: str = "dirichlet") -> np.ndarray:
    """A random coupling ``pi [S0, D]`` of a source and the data law: ``pi.sum(0) == q`` exactly.

    ``pi[:, x1] = q[x1] * c[:, x1]`` with random conditionals ``c[:, x1] = pi(x0 | x1)``.
    """
    _check_rng(rng)
    q = np.asarray(q, dtype=np.float64)
    s0 = q.shape[0] if source_size is None else _check_size(source_size)
    cond = np.stack([random_distribution(rng, s0, kind=kind) for _ in range(q.shape[0])], axis=1)
    return cond * q[None, :]


def random_markov_kernel(rng, size: int, *, kind: str = "dirichlet") -> np.ndarray:
    """A random column-stochastic kernel ``K [size (y), size (x)]``: each column a random distribution
    of the given kind (vectorized version of :func:`random_distribution`)."""
    _check_rng(rng)
    size = _check_size(size)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    k = rng.dirichlet(np.ones(size), size=size).T
    if kind == "sparse" and size > 1:
        zero = rng.uniform(size=(size, size)) < rng.uniform(size=(1, size))
        keep = rng.integers(size, size=size)
        zero[keep, np.arange(size)] = False
        k = np.where(zero, 0.0, k)
    elif kind == "peaked":
        eps = 10.0 ** rng.uniform(-4, -1, size=(1, size))
        k = eps * k
        k[rng.integers(size, size=size), np.arange(size)] += 1.0 - eps[0]
    return k / k.sum(0, keepdims=True)
