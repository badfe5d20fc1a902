"""Fit the centroid router's temperature on held-out data.

The centroid router's weights are `rho_k(x; T) = top_k(softmax(cos(x, c_k) / T))`
(`dfm.decentral.routers.centroid_weights`). Given held-out examples with each expert's
log-likelihood `log p_k(x_n)`, the best temperature maximizes the held-out log-likelihood of the
routed mixture (THEORY S8: the mixture is what the ensemble samples from):

    L(T) = sum_n log sum_k rho_k(x_n; T) p_k(x_n)

computed by the library's own router weights and mixture (`dfm.decentral.mixing`), in float64
(`jax.enable_x64`). L is smooth in log T but not guaranteed unimodal, so the search is a grid
over log T (41 points over `bounds`) followed by `scipy.optimize.minimize_scalar(method="bounded")`
(Brent) on log T in the bracket around the best grid point.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dfm.decentral.mixing import mixture_token_log_probs
from dfm.decentral.routers import CentroidRouter, FixedRouter, centroid_weights


def mixture_log_likelihood(cosines: Any, expert_loglik: Any, temperature: float, *,
                           top_k: int | None = None, threshold: float | None = None) -> float:
    """`L(T) = sum_n log sum_k rho_k(x_n; T) exp(expert_loglik[n, k])`, float64 (module doc).

    Args:
      cosines: `[N, K]` cosine similarities to the centroids; expert_loglik: `[N, K]` nats.
      temperature: T > 0; top_k, threshold: the router's settings.
    """
    with jax.enable_x64(True):
        return float(_log_likelihood(jnp.asarray(cosines, jnp.float64), jnp.asarray(expert_loglik, jnp.float64),
                                     jnp.asarray(temperature, jnp.float64), top_k, threshold))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _log_likelihood(cosines, expert_loglik, temperature, top_k, threshold):
    w = centroid_weights(cosines, temperature, top_k, threshold)
    scores = mixture_token_log_probs(FixedRouter(w), expert_loglik.T[:, :, None])  # one "token" each
    return jnp.sum(scores.log_probs)


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
        value = mixture_log_likelihood(cos, ll, float(np.exp(log_t)), top_k=top_k, threshold=threshold)
        return -value if np.isfinite(value) else np.inf

    grid = np.linspace(np.log(lo), np.log(hi), 41)
    values = np.array([neg(g) for g in grid])
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = scipy.optimize.minimize_scalar(neg, bounds=(a, b), method="bounded", options={"xatol": xatol})
    best = float(res.x) if res.fun <= values[i] else float(grid[i])
    return float(np.exp(best))


def fit_centroid_router(router: CentroidRouter, features_val: Any, expert_loglik_val: Any,
                        **kwargs) -> CentroidRouter:
    """A copy of `router` with the temperature maximizing the held-out mixture log-likelihood.

    Args:
      router: the `CentroidRouter` (its top_k and threshold are kept).
      features_val: `[N, D]` conditioning features of held-out examples.
      expert_loglik_val: `[N, K]` each expert's log-likelihood `log p_k(x_n)` of them.
      kwargs: `bounds`, `xatol` of `fit_temperature`.

    Raises:
      ValueError: as `fit_temperature`, or features of the wrong dimension.
    """
    temperature = fit_temperature(router.similarities(features_val), expert_loglik_val,
                                  top_k=router.top_k, threshold=router.threshold, **kwargs)
    return dataclasses.replace(router, temperature=temperature)
