"""Mixtures of experts on the tabular state space (THEORY S8-S13).

``q = sum_k w_k q_k``; expert k has path ``p_t^k``. The router is the posterior over experts
``rho_t(k | x) = w_k p_t^k(x) / sum_j w_j p_t^j(x)`` (rows of unreachable x: zeros).
"""
from __future__ import annotations

import numpy as np

from dfm.tabular import _validate as V


def mixture(weights, components) -> np.ndarray:
    """``sum_k w_k components[k]``; weights ``[K]``, components ``[K, ...]``. Raises ValueError on bad weights."""
    w = V.check_distribution("weights", weights)
    comp = np.asarray(components, dtype=np.float64)
    if comp.shape[0] != w.shape[0]:
        raise ValueError(f"components must have {w.shape[0]} rows (one per weight), got {comp.shape}")
    return np.tensordot(w, comp, axes=1)


def router(weights, expert_marginals) -> np.ndarray:
    """``rho(k | x) = w_k p^k(x) / sum_j w_j p^j(x)``, ``[M, K]`` from ``expert_marginals [K, M]`` (THEORY S8)."""
    w = V.check_distribution("weights", weights)
    p = np.asarray(expert_marginals, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != w.shape[0]:
        raise ValueError(f"expert_marginals must have shape [{w.shape[0]}, M], got {p.shape}")
    joint = (w[:, None] * p).T
    tot = joint.sum(1, keepdims=True)
    return np.where(tot > 0, joint / np.where(tot > 0, tot, 1.0), 0.0)


def route(rho, expert_values) -> np.ndarray:
    """``sum_k rho(k | x) values_k(x, ...)``: rho ``[M, K]``, expert_values ``[K, M, ...]`` -> ``[M, ...]``."""
    rho = np.asarray(rho, dtype=np.float64)
    vals = np.asarray(expert_values, dtype=np.float64)
    if vals.shape[:2] != (rho.shape[1], rho.shape[0]):
        raise ValueError(f"expert_values must start with [{rho.shape[1]}, {rho.shape[0]}], got {vals.shape}")
    return np.einsum("mk,km...->m...", rho, vals)


def top_k_renormalize(weights, k: int) -> np.ndarray:
    """Keep the k largest weights of each row ``[..., K]`` (ties: lower index first) and renormalize (THEORY S13)."""
    w = np.asarray(weights, dtype=np.float64)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= w.shape[-1]:
        raise ValueError(f"k must be an integer in [1, {w.shape[-1]}], got {k!r}")
    order = np.argsort(-w, axis=-1, kind="stable")[..., :k]
    keep = np.zeros(w.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    kept = np.where(keep, w, 0.0)
    tot = kept.sum(-1, keepdims=True)
    if np.any(tot <= 0):
        raise ValueError("weights must put positive mass on their top-k set")
    return kept / tot
