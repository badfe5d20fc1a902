"""Fit the centroid router's temperature on held-out data, and say when the fit sits at a limit.

The centroid router's weights are `rho_k(x; T) = top_k(softmax(cos(x, c_k) / T))`
(`dfm.decentral.routers.centroid_weights`). Given held-out examples with each expert's
log-likelihood `log p_k(x_n)`, the best temperature maximizes the held-out log-likelihood of the
routed mixture (THEORY S8: the mixture is what the ensemble samples from):

    L(T) = sum_n log sum_k rho_k(x_n; T) p_k(x_n)

computed by the library's own router weights and mixture (`dfm.decentral.mixing`), in float64
(`jax.enable_x64`).

The two ends of the temperature axis are limits of the router, not numbers to report as if they
were an optimum:

- `T -> 0`: `softmax(cos / T)` tends to the top-1 indicator of the nearest centroid (ties share
  equally), so every row is routed to one expert whatever `top_k` is;
- `T -> inf`: it tends to the uniform weights over the top-k set (the k largest cosines; all K
  experts when `top_k` is None).

L is smooth in log T but not guaranteed unimodal, so the search is a grid over log T
(`GRID_PER_DECADE` points per decade over `bounds`, default `DEFAULT_BOUNDS = (1e-4, 1e4)`:
cosines lie in [-1, 1], so at `T = 1e-4` any two cosines that differ by more than `4e-3` give
weights in a ratio below `e^-40`, and at `T = 1e4` the weights are within `2e-4` (relative) of
uniform), followed by `scipy.optimize.minimize_scalar(method="bounded")` (Brent) on log T in the
bracket around the best grid point. When the best grid point is an end of the grid and no
interior point of its bracket does better, there is no interior maximum inside `bounds`: the fit
returns the bound itself and `fit_temperature_search` reports it "at bound", with the limit it
stands for (`TemperatureFit.describe`); the jobs' reports say so (`temperature_note`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dfm.decentral.mixing import mixture_token_log_probs
from dfm.decentral.routers import CentroidRouter, FixedRouter, apply_threshold, centroid_weights, top_k as top_k_weights

#: Default search interval of the temperature (see the module docstring for why it is wide enough).
DEFAULT_BOUNDS = (1e-4, 1e4)
#: Grid points per decade of T before the Brent refinement.
GRID_PER_DECADE = 10
#: Search intervals of earlier versions (1e-3, 1e2): `temperature_note` recognizes their bounds too,
#: so that a report written from an older run still says "at bound".
PREVIOUS_BOUNDS = ((1e-3, 1e2),)

LIMIT_ZERO = "T -> 0: the top-1 indicator of the nearest centroid"
LIMIT_INF = "T -> inf: uniform weights over the top-k experts"


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
    return _weights_log_likelihood(w, expert_loglik)


@jax.jit
def _weights_log_likelihood(weights, expert_loglik):
    scores = mixture_token_log_probs(FixedRouter(weights), expert_loglik.T[:, :, None])  # one "token" each
    return jnp.sum(scores.log_probs)


def limit_weights(cosines: Any, limit: str, *, top_k: int | None = None,
                  threshold: float | None = None) -> np.ndarray:
    """The router weights `[N, K]` (float64) in a limit of the temperature (module doc).

    Args:
      cosines: `[N, K]` cosine similarities.
      limit: "zero" (`T -> 0`: the top-1 indicator of the largest cosine; tied maxima share
        equally, then `top_k` and `threshold` as `centroid_weights` applies them) or "inf"
        (`T -> inf`: uniform over the top-k set of the cosines, ties kept at the lower index as
        `top_k` does, then `threshold`).

    Raises:
      ValueError: an unknown `limit`.
    """
    cos = np.asarray(cosines, dtype=np.float64)
    with jax.enable_x64(True):
        if limit == "zero":
            logits = np.where(cos == cos.max(axis=1, keepdims=True), 0.0, -np.inf)
            w = jax.nn.softmax(jnp.asarray(logits), axis=-1)
            if top_k is not None:
                w = top_k_weights(w, top_k)
        elif limit == "inf":
            keep = np.ones(cos.shape, bool)
            if top_k is not None:       # the top-k set of softmax(cos / T) is the top-k set of cos, for every T
                keep = np.asarray(top_k_weights(jax.nn.softmax(jnp.asarray(cos), axis=-1), top_k)) > 0
            w = jnp.asarray(keep / keep.sum(axis=1, keepdims=True))
        else:
            raise ValueError(f"limit must be 'zero' or 'inf', got {limit!r}")
        if threshold is not None:
            w = apply_threshold(w, threshold)
        return np.asarray(w, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    """Result of `fit_temperature_search`.

    Attributes:
      temperature: the fitted T (exactly a bound when `at_bound` is set).
      log_likelihood: L at `temperature` (nats, summed over the examples).
      bounds: the searched interval `(T_min, T_max)`.
      at_bound: None (an interior maximum), "lower" or "upper" (no interior maximum inside
        `bounds`: L is largest at that end of the grid).
      limit: when `at_bound` is set and the bound reaches the limit of that end (the weights there
        equal `limit_weights` to 1e-9, or L equals the limit's L to 1e-9 relative): `LIMIT_ZERO` or
        `LIMIT_INF`; else None (the bound cuts the search short of the limit).
      limit_log_likelihoods: `{"zero": L(T -> 0), "inf": L(T -> inf)}`.
      flat: L does not depend on T (e.g. `top_k=1` or one expert): the temperature is irrelevant.
    """

    temperature: float
    log_likelihood: float
    bounds: tuple[float, float]
    at_bound: str | None
    limit: str | None
    limit_log_likelihoods: dict
    flat: bool = False

    def describe(self) -> str:
        """One line for a report or a run log."""
        t = f"T = {self.temperature:.4g}"
        if self.flat:
            return f"{t}: L(T) does not depend on T (every routed row keeps one expert), the temperature is irrelevant"
        if self.at_bound is None:
            return (f"{t}: an interior maximum of the held-out mixture log-likelihood in "
                    f"[{self.bounds[0]:g}, {self.bounds[1]:g}]")
        side = "lower" if self.at_bound == "lower" else "upper"
        name = "zero" if self.at_bound == "lower" else "inf"
        text = (f"{t} is AT the {side} search bound ({self.bounds[0]:g}..{self.bounds[1]:g}): no interior maximum, "
                f"the held-out log-likelihood is largest at the {'T -> 0' if name == 'zero' else 'T -> inf'} end")
        if self.limit is not None:
            return text + f"; the router there is the limit {self.limit}"
        return text + (f", whose limit ({LIMIT_ZERO if name == 'zero' else LIMIT_INF}) the bound does not reach "
                       f"(L = {self.log_likelihood:.6g} at the bound, {self.limit_log_likelihoods[name]:.6g} in the "
                       "limit): widen `bounds`")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_inputs(cos: np.ndarray, ll: np.ndarray, bounds) -> tuple[float, float]:
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
    if not 0 < lo < hi or not math.isfinite(hi):
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max < inf, got {bounds}")
    return lo, hi


def fit_temperature_search(cosines: Any, expert_loglik: Any, *, top_k: int | None = None,
                           threshold: float | None = None, bounds: tuple[float, float] = DEFAULT_BOUNDS,
                           xatol: float = 1e-5) -> TemperatureFit:
    """Maximize the held-out mixture log-likelihood L(T) over `bounds` (module doc), with diagnostics.

    Args:
      cosines: `[N, K]` cosine similarities of held-out conditioning features to the centroids.
      expert_loglik: `[N, K]` `log p_k(x_n)` (nats; -inf allowed where an expert gives 0).
      top_k, threshold: the router's settings (top-k sets do not depend on T).
      bounds: `(T_min, T_max)`, 0 < T_min < T_max < inf. xatol: Brent tolerance on log T.

    Returns:
      a `TemperatureFit`: the temperature, L there, whether it is at a bound and which limit.

    Raises:
      ValueError: shapes differ or are not 2-D, NaN/+inf values, a row where every expert has
        log-likelihood -inf, or bad bounds.
    """
    cos = np.asarray(cosines, dtype=np.float64)
    ll = np.asarray(expert_loglik, dtype=np.float64)
    lo, hi = _check_inputs(cos, ll, bounds)

    def value(log_t: float) -> float:
        v = mixture_log_likelihood(cos, ll, float(np.exp(log_t)), top_k=top_k, threshold=threshold)
        return v if np.isfinite(v) else -np.inf

    with jax.enable_x64(True):
        ll_j = jnp.asarray(ll)
        limits = {name: float(_weights_log_likelihood(jnp.asarray(limit_weights(cos, name, top_k=top_k,
                                                                                threshold=threshold)), ll_j))
                  for name in ("zero", "inf")}
    points = max(3, int(math.ceil(GRID_PER_DECADE * math.log10(hi / lo))) + 1)
    grid = np.linspace(np.log(lo), np.log(hi), points)
    values = np.array([value(g) for g in grid])
    scale = max(1.0, float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0)))
    if np.isfinite(values).all() and values.max() - values.min() <= 1e-12 * scale:
        return TemperatureFit(1.0, float(values[0]), (lo, hi), None, None, limits, flat=True)
    i = int(np.argmax(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = scipy.optimize.minimize_scalar(lambda g: -value(g), bounds=(a, b), method="bounded",
                                         options={"xatol": xatol})
    best, best_value = (float(res.x), -float(res.fun)) if -res.fun > values[i] else (float(grid[i]), float(values[i]))
    at_bound = None
    if i in (0, grid.size - 1) and best_value <= values[i] + 1e-12 * scale:
        at_bound = "lower" if i == 0 else "upper"             # no interior point of the bracket does better
        best, best_value = float(grid[i]), float(values[i])
    temperature = lo if at_bound == "lower" else hi if at_bound == "upper" else float(np.exp(best))
    limit = None
    if at_bound is not None:
        name = "zero" if at_bound == "lower" else "inf"
        with jax.enable_x64(True):
            w = np.asarray(centroid_weights(jnp.asarray(cos), temperature, top_k, threshold))
        close = np.max(np.abs(w - limit_weights(cos, name, top_k=top_k, threshold=threshold))) <= 1e-9
        if close or abs(best_value - limits[name]) <= 1e-9 * scale:
            limit = LIMIT_ZERO if name == "zero" else LIMIT_INF
    return TemperatureFit(temperature, best_value, (lo, hi), at_bound, limit, limits)


def fit_temperature(cosines: Any, expert_loglik: Any, *, top_k: int | None = None,
                    threshold: float | None = None, bounds: tuple[float, float] = DEFAULT_BOUNDS,
                    xatol: float = 1e-5) -> float:
    """Temperature T in `bounds` maximizing the held-out mixture log-likelihood L(T) (module doc).

    `fit_temperature_search(...).temperature`: a float; a bound exactly when there is no interior
    maximum (call `fit_temperature_search` for the diagnosis, or `temperature_note` on the value).

    Raises:
      ValueError: as `fit_temperature_search`.
    """
    return fit_temperature_search(cosines, expert_loglik, top_k=top_k, threshold=threshold, bounds=bounds,
                                  xatol=xatol).temperature


def temperature_note(temperature: float, bounds: tuple[float, float] = DEFAULT_BOUNDS) -> str:
    """'' for a temperature strictly inside the search interval, else the words for a fit at a bound.

    For a report that has only the fitted value: a value equal (relative 1e-9) to an end of `bounds`
    (or of the intervals of earlier versions, `PREVIOUS_BOUNDS`) is a fit at that bound, which
    stands for the limit of the router (module doc).
    """
    t = float(temperature)
    for lo, hi in (tuple(bounds),) + PREVIOUS_BOUNDS:
        if math.isclose(t, lo, rel_tol=1e-9):
            return (f"at the lower search bound {lo:g}: no interior maximum, the held-out likelihood is largest "
                    f"toward the limit {LIMIT_ZERO}")
        if math.isclose(t, hi, rel_tol=1e-9):
            return (f"at the upper search bound {hi:g}: no interior maximum, the held-out likelihood is largest "
                    f"toward the limit {LIMIT_INF}")
    return ""


def fit_centroid_router(router: CentroidRouter, features_val: Any, expert_loglik_val: Any,
                        **kwargs) -> CentroidRouter:
    """A copy of `router` with the temperature maximizing the held-out mixture log-likelihood.

    A fit at a bound (no interior maximum) gives that bound; `temperature_note(router.temperature)`
    says so, `fit_temperature_search` gives the full diagnosis.

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
