"""Where parity holds: ``dfm sweep`` runs the job over a grid of K (experts) x stage-2 budget x seeds.

Every cell is an ordinary run directory, ``<out>/seed-<s>/K<k>-steps<b>/``, run with the overrides
``seed=s partition.seed=s partition.num_clusters=k stage2.steps=b eval.top_k=min(top_k, k)``
(plus the user's). Compute is matched inside each cell as in every run (the K experts split
``stage2.steps`` steps of the same batch size; the dense model takes all of them), so a budget is
the stage-2 training sequences of dense and of the ensemble alike. Cells of one seed share the
data and stage 1 (neither depends on K or the budget; the data stage and stage 1 are copied from
the seed's first cell, checksum included, instead of being retrained).

Then, per (K, budget), `experiments.engine.seeds.summarize` over the seeds writes
``<out>/cells/K<k>-steps<b>/summary.{json,md}`` (mean ± sd over seeds, Student-t 95% interval of
system - dense, verdict against the parity margin), and the sweep writes ``<out>/sweep.json``,
``sweep.md`` (one row per cell and system) and ``sweep.png`` (Δ vs dense against K, one line per
budget, the t-intervals as error bars, the parity margin shaded).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.engine import seeds as multi
from experiments.engine.rundir import atomic_write_json, atomic_write_text

#: systems drawn in sweep.png (those present in the reports; the text job's names)
PLOTTED = ("ensemble/bayes", "ensemble/centroid-top1")


def cell_name(k: int, budget: int) -> str:
    return f"K{k}-steps{budget}"


def cell_dir(out: Path, seed: int, k: int, budget: int) -> Path:
    return Path(out) / f"seed-{seed}" / cell_name(k, budget)


def cell_overrides(seed: int, k: int, budget: int, config) -> list[str]:
    """The overrides of one cell (after the user's): seeds, K, stage-2 steps, top-k capped at K."""
    top_k = min(getattr(config.eval, "top_k", 1), k)
    return [*multi.seed_overrides(seed, config), f"partition.num_clusters={k}", f"stage2.steps={budget}",
            f"eval.top_k={top_k}"]


def share_stage1(source: Path, dest: Path, stage1: str) -> None:
    """Copy the data stage and the finished stage 1 of run `source` into run `dest` (what is
    already in `dest` is kept): ``data/``, ``tokenizer/``, ``stages/<stage1>.json``,
    ``models/<stage1>/`` and ``logs/<stage1>/``. The stage marker carries the model's checksum, so
    the copy is verified like any finished stage when `dest` runs."""
    source, dest = Path(source), Path(dest)
    for rel in ("data", "tokenizer", f"models/{stage1}", f"logs/{stage1}"):
        if (source / rel).is_dir() and not (dest / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source / rel, dest / rel)
    marker = Path("stages") / f"{stage1}.json"
    if (source / marker).is_file() and not (dest / marker).exists():
        (dest / marker).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / marker, dest / marker)


def run_sweep(clusters: Sequence[int], budgets: Sequence[int], seeds: Sequence[int], out: Path,
              run_cell: Callable[[int, int, int, Path], dict], stage1: str, log=print) -> dict:
    """Run `run_cell(seed, k, budget, directory)` (returns the cell's report dict) over the grid,
    sharing stage 1 within a seed, then write the summaries; returns the sweep dict.

    Raises:
      ValueError: an empty grid axis, or a repeated value in one.
    """
    for name, values in (("clusters", clusters), ("budgets", budgets), ("seeds", seeds)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name}: must be non-empty and without repeats, got {list(values)}")
    out = Path(out)
    reports: dict[tuple[int, int], dict[int, dict]] = {}
    for s in seeds:
        first = None
        for k in clusters:
            for b in budgets:
                where = cell_dir(out, s, k, b)
                if first is not None:
                    share_stage1(first, where, stage1)
                log(f"[sweep] seed {s}, K={k}, stage2.steps={b}: {where}")
                reports.setdefault((k, b), {})[s] = run_cell(s, k, b, where)
                first = first or where
    return summarize(out, clusters, budgets, reports)


def summarize(out: Path, clusters: Sequence[int], budgets: Sequence[int],
              reports: dict[tuple[int, int], dict[int, dict]]) -> dict:
    """Per-cell summaries over seeds, then ``sweep.json``, ``sweep.md`` and ``sweep.png`` in `out`."""
    out = Path(out)
    cells = []
    for k in clusters:
        for b in budgets:
            summary = multi.summarize(out / "cells" / cell_name(k, b), reports[(k, b)])
            cells.append({"k": k, "budget": b, "summary": summary})
    first = cells[0]["summary"]
    sweep = {"clusters": list(clusters), "budgets": list(budgets), "seeds": first["seeds"],
             "config": first.get("config"), "metric_key": first["metric_key"], "unit": first["unit"],
             "parity_margin": first["parity_margin"], "interval": first["interval"],
             "verdict_rule": first["verdict_rule"],
             "cells": [{"k": c["k"], "budget": c["budget"],
                        "systems": {s["name"]: {"delta_vs_dense": s["delta_vs_dense"],
                                                first["metric_key"]: s[first["metric_key"]]}
                                    for s in c["summary"]["systems"]}} for c in cells]}
    atomic_write_json(out / "sweep.json", sweep)
    atomic_write_text(out / "sweep.md", sweep_markdown(sweep))
    plot_sweep(sweep, out / "sweep.png")
    return sweep


def sweep_markdown(sweep: dict) -> str:
    """One row per (K, budget, system): Δ vs dense mean ± sd [t 95% CI over seeds] and verdict."""
    lines = [f"# Sweep of {sweep['config']}: K x stage-2 budget, seeds {sweep['seeds']}", "",
             (f"Δ = system - dense ({sweep['unit']}); {sweep['interval']}. Verdict {sweep['verdict_rule']} "
              f"Parity margin m = {sweep['parity_margin']}."), "",
             "| K | stage-2 steps | system | dense mean | Δ vs dense mean ± sd [95% CI] | verdict |",
             "|---:|---:|---|---:|---:|---|"]
    key = sweep["metric_key"]
    for cell in sweep["cells"]:
        dense = cell["systems"].get("dense", {}).get(key, {}).get("mean")
        for name, s in cell["systems"].items():
            if name in ("dense", "base") or name.startswith("random-"):
                continue
            d = s["delta_vs_dense"]
            ci = d.get("ci95")
            sd = "-" if d.get("std") is None else f"{d['std']:.4f}"
            interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
            lines.append(f"| {cell['k']} | {cell['budget']} | {name} | {_num(dense)} | {d['mean']:+.4f} ± {sd}"
                         f"{interval} | {d.get('verdict')} |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def plot_sweep(sweep: dict, path: Path) -> Path:
    """Δ vs dense against K (log2 axis), one panel per plotted system, one line per budget; error
    bars: the t 95% interval over seeds; the parity margin as a grey band."""
    from experiments.engine.plots import pyplot, save_figure

    plt = pyplot()
    names = [n for n in PLOTTED if any(n in c["systems"] for c in sweep["cells"])] or \
        sorted({n for c in sweep["cells"] for n in c["systems"] if n.startswith("ensemble/")})[:2]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.6 * max(1, len(names)), 3.6), squeeze=False)
    m = sweep["parity_margin"]
    for ax, name in zip(axes.flat, names):
        ax.axhspan(-m, m, color="0.85", label=f"parity margin ±{m}")
        ax.axhline(0, color="black", lw=0.8)
        for i, b in enumerate(sweep["budgets"]):
            pts = [(c["k"], c["systems"][name]["delta_vs_dense"]) for c in sweep["cells"]
                   if c["budget"] == b and name in c["systems"]]
            if not pts:
                continue
            ks = [k * (1.03 ** (i - (len(sweep["budgets"]) - 1) / 2)) for k, _ in pts]   # dodge the budgets
            mean = [d["mean"] for _, d in pts]
            err = [[d["mean"] - d["ci95"][0] if d.get("ci95") else 0 for _, d in pts],
                   [d["ci95"][1] - d["mean"] if d.get("ci95") else 0 for _, d in pts]]
            ax.errorbar(ks, mean, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=f"stage 2: {b} steps")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep["clusters"], [str(k) for k in sweep["clusters"]])
        ax.set_xlabel("K (experts)", fontsize=8)
        ax.set_ylabel(f"Δ vs dense ({sweep['unit']})", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(f"{sweep['config']}: ensemble - dense over seeds {sweep['seeds']} (below 0: ensemble better)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
