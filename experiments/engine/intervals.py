"""Statistics of a comparison with the dense baseline: paired bootstrap intervals over test units
(documents), the parity verdict against a declared margin, and a t-interval over seeds.

All differences are ``system - dense`` in nats per token (lower loss is better, so a negative
difference means the system beats dense). These are reporting statistics of the experiments, not
DFM math: numpy and scipy only.

Paired bootstrap (`paired_bootstrap`): the point estimate is the ratio
``sum_d (a_d - b_d) / sum_d n_d`` over the test documents d (``a_d``, ``b_d``: the two systems'
NLL sums on document d's scored tokens, ``n_d`` its scored tokens), which equals the difference of
the two reported losses. Each resample draws D documents with replacement (the same documents for
both systems: paired) and recomputes the ratio; the 95% interval is the 2.5 / 97.5 percentiles of
the resampled ratios (percentile bootstrap).

Verdict (`verdict`) from an interval [lo, hi] of ``system - dense`` and the margin m >= 0:
``better`` if hi < 0; ``worse`` if lo > m; ``within margin`` if -m <= lo and hi <= m;
otherwise ``inconclusive`` (the interval is too wide to decide). The point estimate is not used.
For a score where higher is better (exact match), ``verdict(..., higher_is_better=True)`` is the
same rule applied to the negated interval: ``better`` if lo > 0; ``worse`` if hi < -m.

Means of per-item scores (`unit_bootstrap`): items (e.g. test questions) grouped into independent
units (e.g. test images, several questions each); the same percentile bootstrap resamples units, so
the interval accounts for the correlation of the items of one unit (one item per unit: the plain
bootstrap over items).
"""
from __future__ import annotations

import math

import numpy as np

VERDICTS = ("better", "worse", "within margin", "inconclusive")
VERDICT_RULE = ("from the 95% interval [lo, hi] of (system - dense) in nats/token and the parity margin m: "
                "'better' if hi < 0; 'worse' if lo > m; 'within margin' if -m <= lo and hi <= m; otherwise "
                "'inconclusive'. The point estimate is not used.")
VERDICT_RULE_HIGHER = ("from the 95% interval [lo, hi] of (system - dense) of a score where higher is better "
                       "and the parity margin m: 'better' if lo > 0; 'worse' if hi < -m; 'within margin' if "
                       "-m <= lo and hi <= m; otherwise 'inconclusive'. The point estimate is not used.")


def per_unit_sums(values: np.ndarray, unit: np.ndarray, num_units: int) -> np.ndarray:
    """Sums of `values` ``[n]`` per unit (``unit [n]`` in ``[0, num_units)``): ``[num_units]`` float64."""
    return np.bincount(np.asarray(unit, np.int64), weights=np.asarray(values, np.float64), minlength=num_units)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, *, resamples: int = 2000,
                     seed: int = 0, level: float = 0.95, chunk: int = 256) -> dict:
    """Paired percentile bootstrap over units of ``sum(a - b) / sum(tokens)``.

    Args:
      a, b: ``[D]`` per-unit loss sums (nats) of the two systems on the same tokens.
      tokens: ``[D]`` scored tokens per unit (> 0 in total).
      resamples: bootstrap resamples (each draws D units with replacement).
      seed: seed of `np.random.default_rng`.
      level: coverage of the interval.

    Returns:
      ``{"mean": point estimate, "ci95": [lo, hi], "resamples": B, "units": D}``.
    """
    a, b, tokens = (np.asarray(x, np.float64) for x in (a, b, tokens))
    if not (a.shape == b.shape == tokens.shape) or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: a, b, tokens must be 1-D of the same length >= 1, got "
                         f"{a.shape}, {b.shape}, {tokens.shape}")
    if tokens.sum() <= 0:
        raise ValueError("paired_bootstrap: no scored tokens")
    diff = a - b
    point = float(diff.sum() / tokens.sum())
    rng = np.random.default_rng(seed)
    n = len(diff)
    stats = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = diff[idx].sum(axis=1) / np.maximum(tokens[idx].sum(axis=1), 1e-300)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return {"mean": point, "ci95": [float(lo), float(hi)], "resamples": int(resamples), "units": int(n)}


def verdict(lo: float, hi: float, margin: float, higher_is_better: bool = False) -> str:
    """Parity verdict of an interval [lo, hi] of ``system - dense`` (see the module docstring);
    `higher_is_better`: the difference is of a score (exact match), not a loss.

    Raises:
      ValueError: a negative margin or lo > hi.
    """
    if margin < 0:
        raise ValueError(f"verdict: the margin must be >= 0, got {margin}")
    if lo > hi:
        raise ValueError(f"verdict: empty interval [{lo}, {hi}]")
    if higher_is_better:
        lo, hi = -hi, -lo
    if hi < 0:
        return "better"
    if lo > margin:
        return "worse"
    if -margin <= lo and hi <= margin:
        return "within margin"
    return "inconclusive"


def unit_bootstrap(values, unit, reference=None, *, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Percentile bootstrap over units of the mean of per-item `values` (paired: of ``values -
    reference``).

    Args:
      values: ``[n]`` per-item scores (e.g. exact match 0 / 1 per test question).
      unit: ``[n]`` the unit of each item (any hashable ids; e.g. the question's test image);
        each resample draws U units with replacement, all items of a drawn unit together.
      reference: optional ``[n]`` scores of the reference system on the same items (dense).
      resamples, seed, level: as in `paired_bootstrap` (which this calls with per-unit sums and
        item counts).

    Returns:
      ``{"mean": mean of values (- reference), "ci95": [lo, hi], "resamples": B, "units": U,
      "items": n}``.

    Raises:
      ValueError: empty or mismatched inputs (named).
    """
    values = np.asarray(values, np.float64)
    ref = np.zeros_like(values) if reference is None else np.asarray(reference, np.float64)
    unit = np.asarray(unit)
    if values.ndim != 1 or len(values) == 0 or ref.shape != values.shape or unit.shape != values.shape:
        raise ValueError(f"unit_bootstrap: values, reference, unit must be 1-D of the same length >= 1, got "
                         f"{values.shape}, {ref.shape}, {unit.shape}")
    _, index = np.unique(unit, return_inverse=True)
    num = int(index.max()) + 1
    out = paired_bootstrap(per_unit_sums(values, index, num), per_unit_sums(ref, index, num),
                           per_unit_sums(np.ones_like(values), index, num), resamples=resamples, seed=seed,
                           level=level)
    return out | {"items": len(values)}


def t_interval(values, level: float = 0.95) -> tuple[float, float | None, list | None]:
    """Mean, sample standard deviation (ddof 1) and Student-t interval of the mean of `values`
    (None for sd / interval with fewer than 2 values)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None, None
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, len(x) - 1)) * sd / math.sqrt(len(x))
    return mean, sd, [mean - half, mean + half]


def partition_entropy(labels: np.ndarray, num_clusters: int) -> float:
    """Plug-in entropy H(K) = -sum_k p_k log p_k (nats) of the cluster shares of `labels`; for a
    deterministic partition (K a function of the unit) it bounds I(X; K) <= H(K)."""
    p = np.bincount(np.asarray(labels, np.int64), minlength=num_clusters).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())
