"""Spherical balanced k-means partitions of a data set (the paper's partition; c-BTM).

Features are L2-normalized, optionally centred by subtracting the global mean of the normalized
features (the paper's authors do this) and normalized again; distances are cosine distances
`1 - <x, c>` between unit vectors. Clusters are exactly balanced: every cluster gets
`floor(N/K)` or `ceil(N/K)` points, by an exact capacitated assignment (`dfm.decentral.balance`)
at every iteration, never a heuristic.

- `balanced_kmeans`: k-means++ initialization (numpy Generator), then alternate exact balanced
  assignment / normalized-mean centroid update until the mean cosine distance improves by less
  than `tol` or `max_iter` iterations. With `weights` (e.g. training sequences per document) it
  balances total weight instead of point counts (`balance.weighted_balanced_assignment`: an LP
  rounding with a proven bound, each point kept whole).
- `two_stage_balanced_kmeans`: scikit-learn (MiniBatch)KMeans into many fine clusters, then a
  balanced clustering of the fine centroids weighted by their counts, for large N.
- `assign` (nearest centroid) and `assign_balanced` (exactly balanced over the given batch) place
  new points; `Partition` stores centroids, mean and config and saves to one `.npz` file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from dfm.decentral.balance import (
    balanced_assignment,
    balanced_sizes_bounds,
    check_point_weights,
    transport,
    weighted_balanced_assignment,
)
from dfm.decentral.arguments import as_feature_matrix, check_positive_int
from dfm.io import atomic_path

_NORM_EPS = 1e-12


def normalize_rows(x: np.ndarray, name: str = "features") -> np.ndarray:
    """L2-normalize the rows of `x` `[N, D]`.

    Raises:
      ValueError: a row has zero (or < 1e-12) norm; the message names `name` and the rows.
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] <= _NORM_EPS
    if zero.any():
        rows = np.flatnonzero(zero)[:5].tolist()
        raise ValueError(f"{name} has zero-norm rows {rows}: cosine distance is undefined there")
    return x / norms


def spherical_features(features: Any, mean: np.ndarray | None, name: str = "features",
                       *, dim: int | None = None) -> np.ndarray:
    """The partition's feature map: normalize, subtract `mean` (if given), normalize again.

    Args:
      features: `[N, D]` raw features.
      mean: `[D]` mean of the normalized training features, or None (no centring).

    Returns:
      `[N, D]` float64 unit vectors.

    Raises:
      ValueError: bad shape, NaN/inf, or zero norm (before or after centring).
    """
    x = normalize_rows(as_feature_matrix(features, name, dim=dim), name)
    if mean is not None:
        x = normalize_rows(x - mean, f"{name} (after subtracting the partition mean)")
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
    """A fitted partition of feature space into K clusters.

    Attributes:
      centroids: `[K, D]` float64 unit vectors (in the centred, normalized feature space).
      mean: `[D]` float64 mean subtracted after the first normalization, or None.
      config: JSON-serializable dict: algorithm and hyperparameters (and run statistics).
      sizes: `[K]` int64 number of training points per cluster.
    """

    centroids: np.ndarray
    mean: np.ndarray | None
    config: dict
    sizes: np.ndarray

    def __post_init__(self):
        c = np.asarray(self.centroids, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] < 1:
            raise ValueError(f"centroids must be [K, D] with K >= 1, got shape {c.shape}")
        if self.mean is not None and np.shape(self.mean) != (c.shape[1],):
            raise ValueError(f"mean must have shape [{c.shape[1]}], got {np.shape(self.mean)}")
        if np.shape(self.sizes) != (c.shape[0],):
            raise ValueError(f"sizes must have shape [{c.shape[0]}], got {np.shape(self.sizes)}")
        object.__setattr__(self, "centroids", c)
        object.__setattr__(self, "sizes", np.asarray(self.sizes, dtype=np.int64))
        if self.mean is not None:
            object.__setattr__(self, "mean", np.asarray(self.mean, dtype=np.float64))

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def subset(self, clusters: Any) -> Partition:
        """The partition restricted to `clusters` (indices, in order): same feature map, those
        centroids. A `CentroidRouter` on it routes among those clusters only: its softmax over their
        cosines is the full router's softmax renormalised over them, and top-k picks among them
        (e.g. when an expert is lost).

        Raises:
          ValueError: no cluster, or an index outside [0, K) or repeated.
        """
        idx = np.asarray(clusters, dtype=np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= self.num_clusters or len(set(idx.tolist())) != idx.size:
            raise ValueError(f"clusters must be distinct indices in [0, {self.num_clusters}), got {idx.tolist()}")
        config = dict(self.config) | {"subset_of": self.num_clusters, "clusters": idx.tolist()}
        return Partition(self.centroids[idx], self.mean, config, self.sizes[idx])

    def transform(self, features: Any, name: str = "features") -> np.ndarray:
        """Map raw features `[N, D]` to the partition's unit sphere (see `spherical_features`)."""
        return spherical_features(features, self.mean, name, dim=self.dim)

    def cosine(self, features: Any, name: str = "features") -> np.ndarray:
        """Cosine similarity `[N, K]` of transformed features to the centroids."""
        return self.transform(features, name) @ self.centroids.T

    def save(self, path: str | os.PathLike) -> None:
        """Write the partition to ONE `.npz` file, atomically (temp file, then `os.replace`)."""
        path = os.fspath(path)
        arrays = {"centroids": self.centroids, "sizes": self.sizes,
                  "has_mean": np.array(self.mean is not None),
                  "mean": self.mean if self.mean is not None else np.zeros(0),
                  "config_json": np.array(json.dumps(self.config, sort_keys=True))}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        """Read a partition written by `save`."""
        with np.load(os.fspath(path), allow_pickle=False) as z:
            mean = z["mean"] if bool(z["has_mean"]) else None
            return cls(centroids=z["centroids"], mean=mean, config=json.loads(str(z["config_json"])),
                       sizes=z["sizes"])


def centroids_from_labels(x: np.ndarray, labels: np.ndarray, num_clusters: int,
                          previous: np.ndarray | None = None) -> np.ndarray:
    """Normalized mean direction `[K, D]` of the unit vectors `x` `[N, D]` in each cluster.

    A cluster whose members sum to ~0 keeps its `previous` centroid (when given).

    Raises:
      ValueError: a cluster is empty (names `labels` and the cluster), or its mean is zero and
        no previous centroid is given.
    """
    sizes = np.bincount(labels, minlength=num_clusters)
    if (sizes == 0).any():
        raise ValueError(f"labels leave cluster(s) {np.flatnonzero(sizes == 0).tolist()} empty")
    sums = np.zeros((num_clusters, x.shape[1]))
    np.add.at(sums, labels, x)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    degenerate = norms[:, 0] <= _NORM_EPS
    if degenerate.any() and previous is None:
        raise ValueError(f"labels give cluster(s) {np.flatnonzero(degenerate).tolist()} a zero mean")
    out = sums / np.where(degenerate[:, None], 1.0, norms)
    if degenerate.any():
        out[degenerate] = previous[degenerate]
    return out


def kmeans_plus_plus(x: np.ndarray, num_clusters: int, rng: np.random.Generator,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """k-means++ seeding on unit vectors with cosine distance (= half the squared Euclidean).

    Args:
      x: `[N, D]` unit vectors; weights: optional `[N]` non-negative point weights (counts).

    Returns:
      `[K, D]` initial centroids (rows of `x`). When fewer than K distinct directions remain,
      further seeds are drawn uniformly among the not-yet-chosen points.
    """
    n = x.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    chosen = [int(rng.choice(n, p=w / w.sum()))]
    dist = np.maximum(1.0 - x @ x[chosen[0]], 0.0)
    for _ in range(1, num_clusters):
        p = dist * w
        p[chosen] = 0.0
        if p.sum() <= 0:
            p = np.ones(n)
            p[chosen] = 0.0
        nxt = int(rng.choice(n, p=p / p.sum()))
        chosen.append(nxt)
        dist = np.minimum(dist, np.maximum(1.0 - x @ x[nxt], 0.0))
    return x[chosen].copy()


def _as_rng(rng: np.random.Generator | int) -> tuple[np.random.Generator, int | None]:
    if isinstance(rng, np.random.Generator):
        return rng, None
    seed = check_positive_int(rng, "rng", minimum=0)
    return np.random.default_rng(seed), seed


def _prepare(features: Any, num_clusters: int, subtract_mean: bool) -> tuple[np.ndarray, np.ndarray | None]:
    raw = as_feature_matrix(features, "features")
    check_positive_int(num_clusters, "num_clusters")
    if num_clusters > raw.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} is larger than the number of points in "
                         f"features ({raw.shape[0]})")
    x = normalize_rows(raw, "features")
    mean = x.mean(axis=0) if subtract_mean else None
    if mean is not None:
        x = normalize_rows(x - mean, "features (after subtracting the global mean)")
    return x, mean


def balanced_kmeans(features: Any, num_clusters: int, *, subtract_mean: bool = True,
                    max_iter: int = 100, tol: float = 1e-7, n_init: int = 1,
                    rng: np.random.Generator | int = 0, method: str = "auto",
                    weights: Any = None) -> tuple[Partition, np.ndarray]:
    """Spherical balanced k-means with exact balance (the paper's partition; c-BTM).

    Objective: minimize the mean cosine distance `1 - <x_n, c_{k(n)}>` subject to every cluster
    having `floor(N/K)` or `ceil(N/K)` points. Each iteration solves the balanced assignment for
    fixed centroids exactly (`balance.balanced_assignment`) and sets each centroid to its
    members' normalized mean (the exact minimizer for fixed labels), so the objective never
    increases. Stops when it decreases by less than `tol` (absolute, in mean cosine distance),
    when labels repeat, or after `max_iter` iterations. The best of `n_init` k-means++ starts
    (by objective) is returned.

    With `weights` `[N]` (e.g. training sequences or tokens per document) the balance is in
    weight, not points: each assignment step is `balance.weighted_balanced_assignment` (points
    kept whole; every cluster non-empty and its total weight `W_k` within `max(weights)` of
    `W / K`; total cosine distance at most `2 (K - 1)` above the optimum of the fractional problem
    with exactly equal weights unless `max(weights) >= W / K`, see there). The centroid update
    and the objective are unchanged (unweighted mean cosine distance over points). That step is
    not an exact minimizer, so the objective may rise; the loop then stops. The final
    `partition.config` gains `weighted: True`, `weight_total`, `weight_max`,
    `weight_per_cluster` (`[K]`; ints when `weights` has an int dtype, else floats) and
    `weight_max_deviation` (`max_k |W_k - W / K|`); without `weights` the config is as before.
    Weights all equal give exactly the labels of `weights=None`.

    Args:
      features: `[N, D]` raw features (e.g. CLIP image embeddings, tf-idf + SVD of text).
      num_clusters: K, 1 <= K <= N.
      subtract_mean: subtract the mean of the normalized features, then renormalize.
      max_iter, tol, n_init: iteration limit, convergence tolerance, number of restarts.
      rng: numpy Generator or integer seed for the k-means++ seeding.
      method: balanced-assignment solver, "auto" | "lsa" | "lp" (see `balance`).
      weights: None, or `[N]` non-negative ints or floats with a positive sum (zero-weight points
        go to their nearest centroid and do not count towards the balance).

    Returns:
      `(partition, labels)`; labels `[N]` int64, `partition.sizes == bincount(labels)` (points).

    Raises:
      ValueError: K > N, NaN/inf or zero-norm features (also after centring), bad ints, bad
        `weights` (wrong shape, NaN/inf, negative, all zero; the message names `weights`).
    """
    x, mean = _prepare(features, num_clusters, subtract_mean)
    check_positive_int(max_iter, "max_iter")
    check_positive_int(n_init, "n_init")
    w = None if weights is None else check_point_weights(weights, x.shape[0])
    gen, seed = _as_rng(rng)
    best = None
    for _ in range(n_init):
        run = _balanced_lloyd(x, kmeans_plus_plus(x, num_clusters, gen), max_iter, tol, method, w)
        if best is None or run[2] < best[2] - 1e-12:
            best = run
    centroids, labels, objective, iters, converged = best
    config = {"algorithm": "balanced_kmeans", "num_clusters": num_clusters,
              "subtract_mean": subtract_mean, "max_iter": max_iter, "tol": tol, "n_init": n_init,
              "seed": seed, "method": method, "num_points": int(x.shape[0]),
              "objective": objective, "iterations": iters, "converged": converged}
    if w is not None:
        config.update(_weight_report(weights, w, labels, num_clusters))
    sizes = np.bincount(labels, minlength=num_clusters)
    return Partition(centroids=centroids, mean=mean, config=config, sizes=sizes), labels


def _weight_report(raw: Any, w: np.ndarray, labels: np.ndarray, k: int) -> dict:
    per = np.bincount(labels, weights=w, minlength=k)
    integer = np.issubdtype(np.asarray(raw).dtype, np.integer)
    cast = (lambda v: int(np.rint(v))) if integer else float
    return {"weighted": True, "weight_total": cast(w.sum()), "weight_max": cast(w.max()),
            "weight_per_cluster": [cast(v) for v in per],
            "weight_max_deviation": float(np.abs(per - w.sum() / k).max())}


def _balanced_lloyd(x, centroids, max_iter, tol, method, weights=None):
    k = centroids.shape[0]
    prev_obj, prev_labels, converged, it = np.inf, None, False, 0
    for it in range(1, max_iter + 1):
        cost = 1.0 - x @ centroids.T
        if weights is None:
            labels = balanced_assignment(cost, method=method)
        else:
            labels = weighted_balanced_assignment(cost, weights, method=method)
        obj = float(cost[np.arange(x.shape[0]), labels].mean())
        centroids = centroids_from_labels(x, labels, k, previous=centroids)
        if (prev_labels is not None and np.array_equal(labels, prev_labels)) or prev_obj - obj < tol:
            converged = True
            break
        prev_obj, prev_labels = obj, labels
    final_obj = float(np.mean(1.0 - np.sum(x * centroids[labels], axis=1)))
    return centroids, labels, final_obj, it, converged


def two_stage_balanced_kmeans(features: Any, num_clusters: int, *, num_fine: int | None = None,
                              fine_algorithm: str = "minibatch", subtract_mean: bool = True,
                              max_iter: int = 100, tol: float = 1e-7,
                              rng: np.random.Generator | int = 0) -> tuple[Partition, np.ndarray]:
    """Two-stage balanced partition for large N.

    Stage 1: scikit-learn `MiniBatchKMeans` (or `KMeans`) on the normalized, centred features
    into `num_fine` fine clusters (default `min(N, 20 K)`); empty fine clusters are dropped.
    Stage 2: spherical balanced k-means of the fine centroids, each weighted by its count.

    How balance is measured: in POINTS, exactly. Stage 2's assignment is a transportation problem
    (`balance.transport`) in which fine cluster j supplies `count_j` points and each coarse
    cluster must receive `floor(N/K)` or `ceil(N/K)` of them; its vertex optimum splits at most
    K - 1 fine clusters between coarse clusters, and the points of a split fine cluster are then
    placed by an exact assignment with those capacities (by their own cosine distances). So every
    coarse cluster gets `floor(N/K)` or `ceil(N/K)` points, as in `balanced_kmeans`; the objective
    is approximate because stage 2 sees fine centroids, not points. Final centroids are the
    normalized means of the final point clusters.

    Args:
      features: `[N, D]`; num_clusters: K; num_fine: number of fine clusters (K <= num_fine <= N).
      fine_algorithm: "minibatch" (`MiniBatchKMeans`) or "kmeans" (`KMeans`).
      subtract_mean, max_iter, tol, rng: as in `balanced_kmeans` (rng also seeds scikit-learn).

    Returns:
      `(partition, labels)` as in `balanced_kmeans`.

    Raises:
      ValueError: K > N, bad features, bad `num_fine`/`fine_algorithm`, or fewer non-empty fine
        clusters than K.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x, mean = _prepare(features, num_clusters, subtract_mean)
    n = x.shape[0]
    gen, seed = _as_rng(rng)
    num_fine = min(n, 20 * num_clusters) if num_fine is None else num_fine
    check_positive_int(num_fine, "num_fine")
    if not num_clusters <= num_fine <= n:
        raise ValueError(f"num_fine must be in [num_clusters, N] = [{num_clusters}, {n}], got {num_fine}")
    sk_seed = int(gen.integers(2**31 - 1))
    if fine_algorithm == "minibatch":
        fine = MiniBatchKMeans(n_clusters=num_fine, random_state=sk_seed, n_init=3)
    elif fine_algorithm == "kmeans":
        fine = KMeans(n_clusters=num_fine, random_state=sk_seed, n_init=1)
    else:
        raise ValueError(f"fine_algorithm must be 'minibatch' or 'kmeans', got {fine_algorithm!r}")
    fine_labels = fine.fit_predict(x)
    counts = np.bincount(fine_labels, minlength=num_fine)
    keep = np.flatnonzero(counts > 0)
    if keep.size < num_clusters:
        raise ValueError(f"features give only {keep.size} non-empty fine clusters, fewer than "
                         f"num_clusters={num_clusters}")
    remap = np.full(num_fine, -1)
    remap[keep] = np.arange(keep.size)
    fine_labels, counts = remap[fine_labels], counts[keep]
    sums = np.zeros((keep.size, x.shape[1]))
    np.add.at(sums, fine_labels, x)
    fine_dirs = normalize_rows(sums, "fine-cluster means")
    lo, hi = balanced_sizes_bounds(n, num_clusters)
    lower, upper = np.full(num_clusters, lo), np.full(num_clusters, hi)

    centroids = kmeans_plus_plus(fine_dirs, num_clusters, gen, weights=counts)
    prev_obj, converged, it, flow = np.inf, False, 0, None
    for it in range(1, max_iter + 1):
        cost = 1.0 - fine_dirs @ centroids.T
        flow = transport(cost, counts, lower, upper)
        obj = float((flow * cost).sum() / n)
        new = flow.T @ sums  # [K, D] approximate sum of member points
        norms = np.linalg.norm(new, axis=1, keepdims=True)
        centroids = np.where(norms > _NORM_EPS, new / np.maximum(norms, _NORM_EPS), centroids)
        if prev_obj - obj < tol:
            converged = True
            break
        prev_obj = obj

    labels = np.empty(n, dtype=np.int64)
    for j in range(keep.size):
        members = np.flatnonzero(fine_labels == j)
        targets = np.flatnonzero(flow[j])
        if targets.size == 1:
            labels[members] = targets[0]
            continue
        cap = flow[j, targets]
        sub = transport(1.0 - x[members] @ centroids[targets].T, np.ones(members.size, np.int64), cap, cap)
        labels[members] = targets[np.argmax(sub, axis=1)]
    centroids = centroids_from_labels(x, labels, num_clusters, previous=centroids)
    objective = float(np.mean(1.0 - np.sum(x * centroids[labels], axis=1)))
    config = {"algorithm": "two_stage_balanced_kmeans", "num_clusters": num_clusters,
              "num_fine": int(num_fine), "fine_algorithm": fine_algorithm,
              "subtract_mean": subtract_mean, "max_iter": max_iter, "tol": tol, "seed": seed,
              "num_points": n, "objective": objective, "iterations": it, "converged": converged}
    sizes = np.bincount(labels, minlength=num_clusters)
    return Partition(centroids=centroids, mean=mean, config=config, sizes=sizes), labels


def assign(partition: Partition, features: Any) -> np.ndarray:
    """Nearest-centroid (largest cosine) cluster of each point: labels `[N]` int64.

    Ties go to the lowest cluster index. Not balanced (THEORY S12: for a partition that is a
    function of the conditioning input, this is the exact router).

    Raises:
      ValueError: bad features (shape, NaN/inf, zero norm).
    """
    return np.argmax(partition.cosine(features), axis=1).astype(np.int64)


def assign_balanced(partition: Partition, features: Any, *, method: str = "auto") -> np.ndarray:
    """Exactly balanced assignment of a batch of new points to the partition's clusters.

    Minimizes the total cosine distance subject to every cluster receiving `floor(N/K)` or
    `ceil(N/K)` of these N points (`balance.balanced_assignment`).

    Raises:
      ValueError: bad features, or fewer points than clusters.
    """
    cost = 1.0 - partition.cosine(features)
    if cost.shape[0] < partition.num_clusters:
        raise ValueError(f"features has {cost.shape[0]} points, fewer than the "
                         f"{partition.num_clusters} clusters needed for a balanced assignment")
    return balanced_assignment(cost, method=method)
