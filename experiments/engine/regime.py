"""The regime map of a sweep with a model-size axis (`experiments.engine.sweep`): where, in tokens per
parameter, the decentralized ensemble reaches the compute-matched dense model.

A sweep cell is one (size, K, stage-2 budget) summarized over seeds: per system the mean of
``Δ = system - dense`` and its 95% interval (``ci95``; Student-t over >= 2 seeds, one seed's
paired bootstrap interval otherwise), and the cell's tokens per parameter (`sweep.cell_scale`:
the dense model's training tokens, stage 1 + stage 2, over its total parameter count).

- `best_router`: the ensemble of a cell with the best mean Δ among the deployable routers (every
  ``ensemble/*`` system but the oracle, which needs the true cluster). Choosing the best of a few
  routers on the same test documents that score them is a mild optimistic selection; the sweep
  table lists every router, so a fixed router can be read off instead.
- `find_crossover`: along tokens per parameter, the first budget where that interval is at parity
  and the first where it is better than dense, with whether it stays so at every larger budget,
  or, when neither occurs, the trend of the mean Δ (least-squares slope against log10 tokens per
  parameter).
- `plot_regime`: Δ vs dense against tokens per parameter (log axis), one panel per model size, one
  line per K (the best router of each cell), the intervals as error bars, the parity band shaded.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.engine.plots import pyplot, save_figure

NOT_ROUTERS = ("ensemble/oracle",)
PARITY_RULE = ("parity: the 95% interval of Δ lies inside [-m, m] or entirely on the ensemble's better side "
               "of 0 (the verdicts 'within margin' and 'better'); better: entirely on the better side of 0")


def best_router(systems: dict, higher_is_better: bool = False) -> str | None:
    """Name of the deployable ensemble with the best mean ``delta_vs_dense`` in `systems` (name ->
    ``{"delta_vs_dense": {"mean", ...}}``): lowest for a loss, highest when `higher_is_better`.
    None when the cell has no ensemble."""
    names = [n for n in systems if n.startswith("ensemble/") and n not in NOT_ROUTERS]
    if not names:
        return None
    sign = -1.0 if higher_is_better else 1.0
    return min(names, key=lambda n: (sign * systems[n]["delta_vs_dense"]["mean"], n))


def at_parity(ci: Sequence[float] | None, margin: float, higher_is_better: bool = False) -> bool:
    """The interval `ci` = [lo, hi] of Δ is inside [-margin, margin] or entirely better than 0."""
    if not ci or not all(map(math.isfinite, ci)):
        return False
    lo, hi = ci
    return (-margin <= lo and hi <= margin) or beats(ci, higher_is_better)


def beats(ci: Sequence[float] | None, higher_is_better: bool = False) -> bool:
    """The interval `ci` of Δ lies entirely on the better side of 0 (below for a loss)."""
    if not ci or not all(map(math.isfinite, ci)):
        return False
    return ci[0] > 0 if higher_is_better else ci[1] < 0


def find_crossover(points: Sequence[dict], margin: float, higher_is_better: bool = False) -> dict:
    """The crossover of one (size, K) along tokens per parameter.

    Args:
      points: one per budget: ``{"tokens_per_param": float, "mean": Δ mean, "ci95": [lo, hi] or
        None}`` (any order; Δ = ensemble - dense).
      margin: the parity margin m (the metric's unit).
      higher_is_better: the metric's direction (False: a loss, Δ < 0 is better).

    Returns:
      ``{"parity_at", "better_at"}``: the smallest tokens per parameter whose interval is at parity
      (`at_parity`) / better than dense (`beats`), or None; ``"parity_holds_after"`` /
      ``"better_holds_after"``: whether every larger budget measured is so too (None without a
      crossover); ``"interval_at_parity"`` / ``"interval_at_better"``: the intervals there; and
      ``"trend"``: ``{"slope_per_decade", "first", "last"}``, the least-squares slope of the mean Δ
      against log10(tokens per parameter) (None with one point) and the mean Δ at the smallest
      and largest tokens per parameter.

    Raises:
      ValueError: no points, or a tokens-per-parameter value that is not positive and finite, or
        repeated.
    """
    if not points:
        raise ValueError("points: need at least one (tokens per parameter, Δ) point")
    pts = sorted(points, key=lambda p: p["tokens_per_param"])
    x = [float(p["tokens_per_param"]) for p in pts]
    if not all(math.isfinite(v) and v > 0 for v in x) or len(set(x)) != len(x):
        raise ValueError(f"tokens_per_param: must be positive, finite and distinct, got {x}")
    out = {"rule": PARITY_RULE, "margin": margin}
    for key, test in (("parity", lambda ci: at_parity(ci, margin, higher_is_better)),
                      ("better", lambda ci: beats(ci, higher_is_better))):
        hits = [i for i, p in enumerate(pts) if test(p.get("ci95"))]
        first = hits[0] if hits else None
        out[f"{key}_at"] = None if first is None else x[first]
        out[f"interval_at_{key}"] = None if first is None else list(pts[first]["ci95"])
        out[f"{key}_holds_after"] = None if first is None else hits == list(range(first, len(pts)))
    means = np.asarray([p["mean"] for p in pts], float)
    slope = float(np.polyfit(np.log10(x), means, 1)[0]) if len(pts) > 1 else None
    out["trend"] = {"slope_per_decade": slope, "first": float(means[0]), "last": float(means[-1])}
    return out


def regime_points(sweep: dict) -> dict[tuple, list[dict]]:
    """``{(size, k): [point, ...]}`` of a sweep dict: per cell its best router's Δ over seeds and its
    tokens per parameter (cells without an ensemble or a scale are left out)."""
    higher = bool(sweep.get("higher_is_better", False))
    out: dict[tuple, list[dict]] = {}
    for cell in sweep["cells"]:
        name = cell.get("best_router") or best_router(cell["systems"], higher)
        scale = cell.get("scale") or {}
        if name is None or not scale.get("tokens_per_param"):
            continue
        d = cell["systems"][name]["delta_vs_dense"]
        out.setdefault((cell.get("size"), cell["k"]), []).append(
            {"tokens_per_param": scale["tokens_per_param"], "budget": cell["budget"], "router": name,
             "mean": d["mean"], "ci95": d.get("ci95")})
    return out


def crossovers(sweep: dict) -> list[dict]:
    """`find_crossover` of every (size, K) of a sweep dict: ``[{"size", "k", **crossover}]``."""
    higher = bool(sweep.get("higher_is_better", False))
    return [{"size": size, "k": k, **find_crossover(pts, sweep["parity_margin"], higher)}
            for (size, k), pts in regime_points(sweep).items()]


def crossover_markdown(rows: Sequence[dict], unit: str = "") -> list[str]:
    """Markdown lines: one row per (size, K) with the crossover points or the trend."""
    def at(row, key):
        if row[f"{key}_at"] is None:
            return "none"
        lo, hi = row[f"interval_at_{key}"]
        held = "" if row[f"{key}_holds_after"] else ", not held at larger budgets"
        return f"{row[f'{key}_at']:.3g} [{lo:+.4f}, {hi:+.4f}]{held}"

    lines = [f"| size | K | parity at tokens/param [95% CI] | better at tokens/param [95% CI] | "
             f"Δ at smallest → largest tokens/param | slope per decade{f' ({unit})' if unit else ''} |",
             "|---|---:|---|---|---|---:|"]
    for row in rows:
        tr = row["trend"]
        slope = "-" if tr["slope_per_decade"] is None else f"{tr['slope_per_decade']:+.4f}"
        lines.append(f"| {row['size'] or '-'} | {row['k']} | {at(row, 'parity')} | {at(row, 'better')} | "
                     f"{tr['first']:+.4f} → {tr['last']:+.4f} | {slope} |")
    return lines


def plot_regime(sweep: dict, path: Path) -> Path:
    """Δ vs dense (best router of each cell) against tokens per parameter, one panel per size, one
    line per K; error bars: the cells' 95% intervals; the parity band [-m, m] shaded grey."""
    plt = pyplot()
    points = regime_points(sweep)
    sizes = list(dict.fromkeys(size for size, _ in points)) or [None]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.4 * len(sizes), 3.6), squeeze=False, sharey=True)
    m = sweep["parity_margin"]
    params = {c.get("size"): (c.get("scale") or {}).get("params") for c in sweep["cells"]}
    for ax, size in zip(axes.flat, sizes):
        ax.axhspan(-m, m, color="0.85", label=f"parity band ±{m}")
        ax.axhline(0, color="black", lw=0.8)
        ks = sorted(k for s, k in points if s == size)
        for i, k in enumerate(ks):
            pts = sorted(points[(size, k)], key=lambda p: p["tokens_per_param"])
            dodge = 1.03 ** (i - (len(ks) - 1) / 2)            # K lines side by side at a budget
            x = [p["tokens_per_param"] * dodge for p in pts]
            mean = [p["mean"] for p in pts]
            err = [[p["mean"] - p["ci95"][0] if p.get("ci95") else 0 for p in pts],
                   [p["ci95"][1] - p["mean"] if p.get("ci95") else 0 for p in pts]]
            ax.errorbar(x, mean, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=f"K = {k}")
        ax.set_xscale("log")
        ticks = sorted({p["tokens_per_param"] for k in ks for p in points[(size, k)]})
        if ticks:                            # the cells' own values, and room for the K lines around them
            ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.set_xlabel("dense training tokens per parameter (stage 1 + 2)", fontsize=8)
        n = params.get(size)
        label = "" if not n else f": {n / 1e6:.3g}M parameters" if n >= 1e6 else f": {n / 1e3:.3g}k parameters"
        ax.set_title(f"size {size}{label}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7, which="both")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel(f"Δ vs dense, best router ({sweep.get('unit', '')})", fontsize=8)
    better = "above" if sweep.get("higher_is_better") else "below"
    fig.suptitle(f"{sweep.get('config')}: ensemble - compute-matched dense over seeds {sweep.get('seeds')} "
                 f"({better} 0: ensemble better)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
