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
- `weighted_balanced_assignment`: balance in WEIGHT (e.g. training sequences per document), each
  point kept whole. Equal-weight balance of whole points is NP-hard in general (it contains
  PARTITION), so this step is an LP rounding with a proven bound, not an exact optimum: the
  fractional problem (each cluster receives exactly W/K) is solved exactly; its vertex optimum
  splits at most K - 1 points, which are then placed whole (see the function's docstring).
"""
from __future__ import annotations

import itertools

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


#: `weighted_balanced_assignment` tries every placement of the split points when there are at most
#: this many (there are at most 2**(K-1)); above it, the tree rounding of its proof places them.
MAX_PLACEMENTS = 2**16
_SHARE_EPS = 1e-9  # an LP share x[n, k] below this is treated as 0


def check_point_weights(weights, num_points: int, name: str = "weights") -> np.ndarray:
    """Validate per-point weights `[N]` (e.g. training sequences per document) as float64.

    Raises:
      ValueError: (naming `name`) shape other than `[num_points]`, non-numeric (or bool) dtype,
        NaN/inf, a negative entry, or all entries zero.
    """
    arr = np.asarray(weights)
    if arr.shape != (num_points,):
        raise ValueError(f"{name} must have shape [{num_points}] (one weight per point), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric (int or float), got dtype {arr.dtype}")
    w = arr.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(f"{name} contains NaN or inf (index {int(bad[0])})")
    if (w < 0).any():
        i = int(np.argmin(w))
        raise ValueError(f"{name} must be >= 0, got {arr[i]} at index {i}")
    if w.sum() <= 0:
        raise ValueError(f"{name} are all zero: there is no weight to balance")
    return w


def weighted_balanced_assignment(cost: np.ndarray, weights, *, method: str = "auto",
                                 max_placements: int = MAX_PLACEMENTS) -> np.ndarray:
    """Minimum-cost assignment of WHOLE points to clusters with (near-)equal total weight.

    With `W = sum(weights)`, `T = W / K`, `w_max = max(weights)`, `W_k` the weight a cluster
    receives and `cost(labels) = sum_n cost[n, labels[n]]`:

    1. The fractional problem `min sum_{n,k} cost[n,k] x[n,k]` s.t. `sum_k x[n,k] = 1`,
       `sum_n weights[n] x[n,k] = T` for every k, `x >= 0` (a transportation LP in units of weight:
       source n supplies `weights[n]`, every cluster demands T) is solved exactly (HiGHS); call
       its optimum LP*. Its vertex solution's support is a forest, so at most K - 1 points are
       split between clusters (checked; an error otherwise).
    2. The other points keep their cluster. The split points are placed whole in clusters where
       they hold a share: over every placement (at most `2**(K-1)`; when more than
       `max_placements`, the tree rounding below instead) the one with, in order, fewest empty
       clusters, smallest `max_k |W_k - T|`, smallest cost, among those with every
       `|W_k - T| <= w_max`. Such a placement exists (tree rounding: root each tree of the
       forest at a cluster, go from the leaves up; each cluster k pulls up the shortest prefix of
       its child split points whose weight reaches `A_k - b_k`, where `A_k` is the weight those
       split points and its parent split point hold in k in the LP and `b_k` the largest of their
       weights; unpulled split points go to their cheapest child cluster. Whether or not the
       parent split point then comes to k, `|W_k - T| <= b_k`.)
    3. Points of zero weight do not count towards any W_k: each goes to its cheapest cluster.
    4. If a cluster is still empty (possible only when `w_max >= T`), the point (from a cluster
       with >= 2 points) whose move gives the smallest max deviation, then cost, is moved in;
       since `w_max >= T` this keeps every `|W_k - T| <= w_max`.

    Guarantees (the first two verified on return): every cluster has >= 1 point;
    `|W_k - T| <= w_max` for every k; and when `w_max < T` (then no placement within the bound
    leaves a cluster empty and step 4 never runs) moreover `max_k |W_k - T|` is at most the
    largest weight of a split point, `W_k = T` (up to float rounding) for every cluster holding
    no LP share of a split point, and `cost(labels) <= LP* + sum over split points of (max - min
    of its cost over its LP clusters) <= LP* + (K - 1) (max(cost) - min(cost))`, where LP* is at
    most the cost of any assignment giving every cluster exactly T. It is not the exact optimum
    of the integer problem (NP-hard: it contains PARTITION). When all weights are equal, weight
    balance is point-count balance and the exact `balanced_assignment(cost, method=method)` is
    returned.

    Args:
      cost: `[N, K]` float, cost of putting point n in cluster k (e.g. cosine distance).
      weights: `[N]` non-negative ints or floats with a positive sum (e.g. sequences per document).
      method: solver for the equal-weight case ("auto" | "lsa" | "lp", as `balanced_assignment`).
      max_placements: enumerate placements of the split points up to this many.

    Returns:
      labels `[N]` int64 in `[0, K)`.

    Raises:
      ValueError: K > N, bad `cost`, bad `weights` (names `weights`), or unknown `method`.
      RuntimeError: the LP solver failed or returned a non-vertex (never expected).
    """
    cost = _check_cost(cost)
    n, k = cost.shape
    balanced_sizes_bounds(n, k)
    w = check_point_weights(weights, n)
    if method not in ("auto", "lsa", "lp"):
        raise ValueError(f"method must be 'auto', 'lsa' or 'lp', got {method!r}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if (w == w[0]).all():
        return balanced_assignment(cost, method=method)
    target, w_max = w.sum() / k, float(w.max())
    labels = np.argmin(cost, axis=1).astype(np.int64)     # zero-weight points stay there
    pos = np.flatnonzero(w > 0)
    x, support = _fractional_balance(cost[pos], w[pos] / target)
    whole = support.sum(axis=1) == 1
    labels[pos[whole]] = np.argmax(x[whole], axis=1)
    rows = pos[~whole]                                     # the split points, at most K - 1
    if rows.size:
        fixed = np.ones(n, dtype=bool)
        fixed[rows] = False
        base_w = np.bincount(labels[fixed], weights=w[fixed], minlength=k)
        base_n = np.bincount(labels[fixed], minlength=k)
        supp = support[~whole]
        shares = x[~whole] * w[rows, None]
        labels[rows] = _place_split_points(cost[rows], w[rows], supp, shares, base_w, base_n,
                                           target, w_max, max_placements)
    _fill_empty_clusters(cost, w, labels, target)
    got = np.bincount(labels, weights=w, minlength=k)
    if np.abs(got - target).max() > w_max + 1e-9 * w.sum() or np.bincount(labels, minlength=k).min() == 0:
        raise RuntimeError(f"weighted assignment gave cluster weights {got.tolist()} (target {target}, "
                           f"bound {w_max}) or an empty cluster")  # guards the proof; never expected
    return labels


def _fractional_balance(cost: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertex optimum x `[P, K]` of the fractional problem (rows sum to 1, `share @ x == 1`) and
    its support (entries > `_SHARE_EPS`), checked to be a forest."""
    p, k = cost.shape
    idx = np.arange(p * k)
    point_rows = scipy.sparse.csr_matrix((np.ones(p * k), (np.repeat(np.arange(p), k), idx)), shape=(p, p * k))
    cluster_rows = scipy.sparse.csr_matrix((np.repeat(share, k), (np.tile(np.arange(k), p), idx)),
                                           shape=(k, p * k))[: k - 1]   # the last one is implied
    a_eq = scipy.sparse.vstack([point_rows, cluster_rows]).tocsr()
    for method in ("highs-ipm", "highs-ds"):   # interior point + crossover (a vertex); simplex
        res = scipy.optimize.linprog(cost.ravel(), A_eq=a_eq, b_eq=np.ones(p + k - 1), bounds=(0, None),
                                     method=method)
        if res.status != 0:
            raise RuntimeError(f"weighted balance LP failed: {res.message}")
        x = np.clip(res.x.reshape(p, k), 0.0, None)
        support = x > _SHARE_EPS
        if _is_forest(support[support.sum(axis=1) > 1]):
            return x, support
    raise RuntimeError("weighted balance LP returned a solution whose support is not a forest")


def _is_forest(support: np.ndarray) -> bool:
    """Whether the bipartite graph (rows, clusters; an edge per True entry) has no cycle."""
    s, k = support.shape
    parent = list(range(s + k))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, c in zip(*np.nonzero(support)):
        a, b = find(int(i)), find(s + int(c))
        if a == b:
            return False
        parent[a] = b
    return True


def _place_split_points(cost, w, supp, shares, base_w, base_n, target, w_max, max_placements):
    """Clusters `[S]` for the S split points (step 2 of `weighted_balanced_assignment`)."""
    s, k = supp.shape
    options = [np.flatnonzero(r) for r in supp]
    if int(np.prod([len(o) for o in options])) <= max_placements:
        combos = np.array(list(itertools.product(*options)), dtype=np.int64).reshape(-1, s)
        c = np.arange(combos.shape[0])
        got_w, got_n = np.tile(base_w, (c.size, 1)), np.tile(base_n, (c.size, 1))
        total = np.zeros(c.size)
        for j in range(s):
            got_w[c, combos[:, j]] += w[j]
            got_n[c, combos[:, j]] += 1
            total += cost[j, combos[:, j]]
        dev = np.abs(got_w - target).max(axis=1)
        ok = np.flatnonzero(dev <= w_max * (1 + 1e-12))
        if ok.size:
            best = ok[np.lexsort((total[ok], dev[ok], (got_n[ok] == 0).sum(axis=1)))[0]]
            return combos[best]
    return _tree_rounding(cost, w, options, shares, k)


def _tree_rounding(cost, w, options, shares, k):
    """The constructive placement of the proof in `weighted_balanced_assignment` (a forest)."""
    at_cluster = [[] for _ in range(k)]
    for i, opts in enumerate(options):
        for c in opts:
            at_cluster[c].append(i)
    dest = np.full(len(options), -1, dtype=np.int64)
    seen = np.zeros(k, dtype=bool)
    for root in range(k):
        if seen[root] or not at_cluster[root]:
            continue
        seen[root] = True
        order, parent, queue = [], {root: -1}, [root]
        while queue:                           # breadth first: parents before children
            c = queue.pop(0)
            order.append(c)
            for i in at_cluster[c]:
                if i == parent[c]:
                    continue
                for d in options[i]:
                    if d != c:
                        seen[d] = True
                        parent[d] = i
                        queue.append(d)
        for c in reversed(order):              # leaves first
            adjacent = at_cluster[c]
            need = sum(shares[i, c] for i in adjacent) - max(w[i] for i in adjacent)
            pulled = 0.0
            for i in adjacent:
                if i == parent[c]:
                    continue
                if pulled < need:
                    dest[i] = c
                    pulled += w[i]
                else:
                    down = [d for d in options[i] if d != c]
                    dest[i] = down[int(np.argmin(cost[i, down]))]
    return dest


def _fill_empty_clusters(cost, w, labels, target):
    """Step 4 of `weighted_balanced_assignment`: fill empty clusters, in place."""
    k = cost.shape[1]
    while True:
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            return
        e = int(empty[0])
        got = np.bincount(labels, weights=w, minlength=k)
        dev = np.abs(got - target)
        movable = np.flatnonzero(counts[labels] >= 2)
        src = labels[movable]
        others = np.array([np.delete(dev, [e, j]).max(initial=0.0) for j in range(k)])
        new_dev = np.maximum.reduce([others[src], np.abs(w[movable] - target),
                                     np.abs(got[src] - w[movable] - target)])
        extra = cost[movable, e] - cost[movable, src]
        labels[movable[np.lexsort((extra, new_dev))[0]]] = e
