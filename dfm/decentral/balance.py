"""Exact balanced assignment: points to clusters with sizes floor(N/K) or ceil(N/K).

The balanced step of balanced k-means (c-BTM, Gururangan et al. 2023; the paper's partition) is
a minimum-cost assignment with capacities. It is solved exactly, never by a greedy heuristic:

- `method="lsa"`: `scipy.optimize.linear_sum_assignment` on replicated centroids. Each cluster
  gets `floor(N/K)` "mandatory" slots, whose cost is lowered by a bonus `M > max(cost) - min(cost)`,
  plus (when K does not divide N) one "optional" slot at the true cost. Any assignment leaving a
  mandatory slot empty is strictly improved by moving a point from an optional slot into it, so
  every optimum fills all mandatory slots: exactly `N mod K` clusters receive `ceil(N/K)` points,
  and among such assignments the total true cost is minimal. Cost matrix `[N, K * ceil(N/K)]`:
  quadratic memory, used for N up to a few thousand.
- `method="lp"`: the same problem as a transportation linear program solved by HiGHS
  (`scipy.optimize.linprog`: interior point with crossover, dual simplex as fallback). The
  constraint matrix is the incidence matrix of a bipartite graph (totally unimodular) and the
  solver returns a vertex, so the solution is integral; it is rounded and verified. Memory is
  linear in N * K.
- `transport`: the LP with integer supplies (a group of `supply[m]` identical points), used by
  the two-stage partition (fine clusters as weighted points).
"""
from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse

#: `method="auto"` uses the assignment solver up to this many points, the LP above it.
LSA_MAX_POINTS = 2048


def balanced_sizes_bounds(num_points: int, num_clusters: int) -> tuple[int, int]:
    """Return `(floor(N/K), ceil(N/K))`, the allowed cluster sizes of an exactly balanced partition.

    Raises:
      ValueError: `num_clusters` < 1 or larger than `num_points`.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if num_clusters > num_points:
        raise ValueError(
            f"num_clusters={num_clusters} is larger than the number of points ({num_points})")
    return num_points // num_clusters, -(-num_points // num_clusters)


def _check_cost(cost: np.ndarray, name: str = "cost") -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_points, num_clusters], got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError(f"{name} contains NaN or inf")
    return cost


def balanced_assignment(cost: np.ndarray, *, method: str = "auto") -> np.ndarray:
    """Exactly balanced minimum-cost assignment of points to clusters.

    Args:
      cost: `[N, K]` float, cost of putting point n in cluster k (e.g. cosine distance).
      method: "lsa" (replicated-centroid `linear_sum_assignment`), "lp" (transportation LP,
        HiGHS), or "auto" (lsa for N <= `LSA_MAX_POINTS`, else lp). Both are exact; they can
        differ only in how ties between equal-cost assignments are broken.

    Returns:
      labels `[N]` int64 in `[0, K)`; every cluster has `floor(N/K)` or `ceil(N/K)` points and
      `sum_n cost[n, labels[n]]` is minimal among all such assignments.

    Raises:
      ValueError: K > N, bad `cost`, or unknown `method`.
    """
    cost = _check_cost(cost)
    n, k = cost.shape
    lo, hi = balanced_sizes_bounds(n, k)
    if method == "auto":
        method = "lsa" if n <= LSA_MAX_POINTS else "lp"
    if method == "lsa":
        labels = _assignment_lsa(cost, lo, hi)
    elif method == "lp":
        flow = transport(cost, np.ones(n, dtype=np.int64), np.full(k, lo), np.full(k, hi))
        labels = np.argmax(flow, axis=1).astype(np.int64)
    else:
        raise ValueError(f"method must be 'auto', 'lsa' or 'lp', got {method!r}")
    sizes = np.bincount(labels, minlength=k)
    if sizes.min() < lo or sizes.max() > hi:  # guards the solver; never expected to trigger
        raise RuntimeError(f"balanced assignment produced sizes {sizes.tolist()} outside [{lo}, {hi}]")
    return labels


def _assignment_lsa(cost: np.ndarray, lo: int, hi: int) -> np.ndarray:
    n, k = cost.shape
    bonus = float(cost.max() - cost.min()) + 1.0
    blocks = [np.tile(cost - bonus, (1, lo))]
    if hi > lo:
        blocks.append(cost)
    big = np.concatenate(blocks, axis=1)  # column c belongs to cluster c % k
    rows, cols = scipy.optimize.linear_sum_assignment(big)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols % k
    return labels


def transport(cost: np.ndarray, supply: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Integral minimum-cost transportation: send `supply[m]` units from source m to clusters.

    Solves `min sum_{m,k} cost[m,k] flow[m,k]` s.t. `sum_k flow[m,k] = supply[m]`,
    `lower[k] <= sum_m flow[m,k] <= upper[k]`, `flow >= 0`, exactly (HiGHS, vertex solution; the
    constraint matrix is totally unimodular, so the vertex solution is integral).

    Args:
      cost: `[M, K]` float.
      supply: `[M]` non-negative ints.
      lower, upper: `[K]` ints, per-cluster bounds on the received total.

    Returns:
      flow `[M, K]` int64.

    Raises:
      ValueError: inconsistent shapes, negative supply, or infeasible bounds.
    """
    cost = _check_cost(cost)
    m, k = cost.shape
    supply = np.asarray(supply)
    lower = np.asarray(lower)
    upper = np.asarray(upper)
    if supply.shape != (m,) or (supply < 0).any():
        raise ValueError(f"supply must be [{m}] non-negative ints, got shape {supply.shape}")
    if lower.shape != (k,) or upper.shape != (k,) or (lower > upper).any():
        raise ValueError(f"lower/upper must be [{k}] with lower <= upper")
    total = int(supply.sum())
    if lower.sum() > total or upper.sum() < total:
        raise ValueError(f"bounds infeasible: sum(lower)={lower.sum()}, sum(upper)={upper.sum()}, "
                         f"total supply={total}")
    idx = np.arange(m * k).reshape(m, k)  # variable flow[i, j] -> column i * k + j
    a_eq = scipy.sparse.csr_matrix(
        (np.ones(m * k), (np.repeat(np.arange(m), k), idx.ravel())), shape=(m, m * k))
    col = scipy.sparse.csr_matrix(
        (np.ones(m * k), (np.tile(np.arange(k), m), idx.ravel())), shape=(k, m * k))
    a_ub = scipy.sparse.vstack([col, -col]).tocsr()
    b_ub = np.concatenate([upper, -lower]).astype(np.float64)
    # Interior point + crossover (a vertex, fast); dual simplex if that vertex is not integral.
    for method in ("highs-ipm", "highs-ds"):
        res = scipy.optimize.linprog(
            cost.ravel(), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=supply.astype(np.float64),
            bounds=(0, None), method=method)
        if res.status != 0:
            raise RuntimeError(f"transportation LP failed: {res.message}")
        flow = np.rint(res.x).astype(np.int64).reshape(m, k)
        if (np.abs(res.x.reshape(m, k) - flow).max() <= 1e-6 and (flow.sum(axis=1) == supply).all()
                and (flow.sum(axis=0) >= lower).all() and (flow.sum(axis=0) <= upper).all()):
            return flow
    raise RuntimeError("transportation LP returned a non-integral or infeasible solution")
