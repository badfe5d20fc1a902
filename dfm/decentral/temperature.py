"""Fit the centroid router's temperature on held-out data (float64 numpy + scipy).

The centroid router's weights are `rho_k(x; T) = top_k(softmax(cos(x, c_k) / T))`. Given held-out
examples with each expert's log-likelihood `log p_k(x_n)`, the best temperature maximizes the
held-out log-likelihood of the routed mixture (THEORY S8: the mixture is what the ensemble
samples from):

    L(T) = sum_n log sum_k rho_k(x_n; T) p_k(x_n).

L is smooth in log T but not guaranteed unimodal, so the search is a grid over log T (41 points
over `bounds`) followed by `scipy.optimize.minimize_scalar(method="bounded")` (Brent) on log T in
the bracket around the best grid point.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.optimize
import scipy.special


def centroid_weights_np(cosines: np.ndarray, temperature: float, top_k: int | None = None,
                        threshold: float | None = None) -> np.ndarray:
    """float64 numpy twin of `routers.centroid_weights` (same top-k tie rule: lower index kept)."""
    z = cosines / temperature
    w = np.exp(z - z.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    num = w.shape[1]
    if top_k is not None and top_k < num:
        order = np.argsort(-cosines, axis=1, kind="stable")[:, :top_k]
        keep = np.zeros_like(w, dtype=bool)
        np.put_along_axis(keep, order, True, axis=1)
        w = np.where(keep, w, 0.0)
        w /= w.sum(axis=1, keepdims=True)
    if threshold is not None:
        keep = (w >= threshold)
        keep[np.arange(w.shape[0]), np.argmax(w, axis=1)] = True
        w = np.where(keep, w, 0.0)
        w /= w.sum(axis=1, keepdims=True)
    return w


def mixture_log_likelihood(weights: np.ndarray, expert_loglik: np.ndarray) -> float:
    """`sum_n log sum_k weights[n, k] exp(expert_loglik[n, k])` in float64 (log-sum-exp)."""
    with np.errstate(divide="ignore"):
        return float(scipy.special.logsumexp(np.log(weights) + expert_loglik, axis=1).sum())


def fit_temperature(cosines: Any, expert_loglik: Any, *, top_k: int | None = None,
                    threshold: float | None = None, bounds: tuple[float, float] = (1e-3, 1e2),
                    xatol: float = 1e-5) -> float:
    """Temperature T in `bounds` maximizing the held-out mixture log-likelihood L(T) (module doc).

    Args:
      cosines: `[N, K]` cosine similarities of held-out conditioning features to the centroids.
      expert_loglik: `[N, K]` `log p_k(x_n)` (nats; -inf allowed where an expert gives 0).
      top_k, threshold: the router's settings (top-k sets do not depend on T).
      bounds: `(T_min, T_max)`, 0 < T_min < T_max. xatol: Brent tolerance on log T.

    Returns:
      the fitted temperature (float).

    Raises:
      ValueError: shapes differ or are not 2-D, NaN/+inf values, a row where every expert has
        log-likelihood -inf, or bad bounds.
    """
    cos = np.asarray(cosines, dtype=np.float64)
    ll = np.asarray(expert_loglik, dtype=np.float64)
    if cos.ndim != 2 or cos.shape[0] == 0:
        raise ValueError(f"cosines must be 2-D [N, K] and non-empty, got shape {cos.shape}")
    if ll.shape != cos.shape:
        raise ValueError(f"expert_loglik has shape {ll.shape}, expected {cos.shape} (one column per expert)")
    if not np.isfinite(cos).all():
        raise ValueError("cosines contains NaN or inf")
    if np.isnan(ll).any() or np.isposinf(ll).any():
        raise ValueError("expert_loglik contains NaN or +inf")
    if np.isneginf(ll).all(axis=1).any():
        raise ValueError("expert_loglik has rows where every expert has log-likelihood -inf")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max, got {bounds}")

    def neg(log_t: float) -> float:
        value = mixture_log_likelihood(centroid_weights_np(cos, np.exp(log_t), top_k, threshold), ll)
        return -value if np.isfinite(value) else np.inf

    grid = np.linspace(np.log(lo), np.log(hi), 41)
    values = np.array([neg(g) for g in grid])
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = scipy.optimize.minimize_scalar(neg, bounds=(a, b), method="bounded", options={"xatol": xatol})
    best = float(res.x) if res.fun <= values[i] else float(grid[i])
    return float(np.exp(best))
