"""Where parity holds: ``dfm sweep`` runs the job over a grid of model size x K (experts) x stage-2
budget x seeds.

Every cell is an ordinary run directory, ``<out>/seed-<s>/[<size>-]K<k>-steps<b>/``, run with the
overrides (after the user's) of its size (`SIZES`, or ``NAME:KEY=VALUE,...``; none without
``--sizes``), then ``seed=s partition.seed=s partition.num_clusters=k stage2.steps=b
eval.top_k=min(top_k, k)``. Compute is matched inside each cell as in every run (the K experts
split ``stage2.steps`` steps of the same batch size; the dense model takes all of them), so a
budget is the stage-2 training tokens of dense and of the ensemble alike, and (same architecture)
their training FLOPs. Cells of one seed share the data stage, cells of one seed and size stage 1
(it depends on neither K nor the budget), and cells of one seed, size and budget the dense model
(it does not depend on K: all train sequences, all validation documents, the same batch order):
each is copied from the first cell that built it, checksum included, instead of being rebuilt.

Then, per (size, K, budget), `experiments.engine.seeds.summarize` over the seeds writes
``<out>/cells/<cell>/summary.{json,md}`` (mean ± sd over seeds, Student-t 95% interval of
system - dense, verdict against the parity margin), and the sweep writes ``<out>/sweep.json``,
``sweep.md`` (one row per cell and system, with the cell's parameters, tokens per parameter,
training FLOPs and each system's inference FLOPs per token, `cell_scale`, then the crossover of
every (size, K), `experiments.engine.regime`), ``regime.png`` (Δ vs dense against tokens per
parameter, one panel per size, one line per K) and, for a sweep without sizes, ``sweep.png`` (Δ vs
dense against K, one line per budget, the t-intervals as error bars, the parity margin shaded).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.engine import regime
from experiments.engine import seeds as multi
from experiments.engine.plots import pyplot, save_figure
from experiments.engine.rundir import atomic_write_json, atomic_write_text

#: systems drawn in sweep.png (those present in the reports; the text job's names)
PLOTTED = ("ensemble/bayes", "ensemble/centroid-top1")

#: decoder sizes of ``dfm sweep --sizes`` (text job), as ``[model]`` overrides. With the `sweep`
#: config's vocabulary of 1024 and tied embeddings (`dfm.models.flops.decoder_params`): s 53,408
#: parameters (20,640 non-embedding), m 319,968 (221,664; the `sweep` config's own model),
#: l 2,819,840 (2,557,696).
SIZES = {
    "s": ("model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2"),
    "m": ("model.hidden_size=96", "model.intermediate_size=256", "model.num_layers=2", "model.num_heads=4"),
    "l": ("model.hidden_size=256", "model.intermediate_size=768", "model.num_layers=3", "model.num_heads=4"),
}


def parse_size(spec: str) -> tuple[str, tuple[str, ...]]:
    """``NAME`` (one of `SIZES`) or ``NAME:KEY=VALUE,KEY=VALUE`` -> (name, overrides).

    Raises:
      ValueError: an unknown name without overrides, a name that is not a plain word, or an
        override without ``=``.
    """
    name, _, rest = spec.partition(":")
    if not name or not name.replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"size {spec!r}: the name must be a plain word (letters, digits, _ or .)")
    if not rest:
        if name not in SIZES:
            raise ValueError(f"size {name!r}: unknown; known sizes {', '.join(SIZES)}, or give NAME:KEY=VALUE,...")
        return name, SIZES[name]
    overrides = tuple(o.strip() for o in rest.split(",") if o.strip())
    if not overrides or not all("=" in o for o in overrides):
        raise ValueError(f"size {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, overrides


def parse_sizes(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """`parse_size` of each spec: ``{name: overrides}`` in the given order.

    Raises:
      ValueError: as `parse_size`, or a name given twice.
    """
    sizes = [parse_size(spec) for spec in specs]
    names = [name for name, _ in sizes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"sizes: must be non-empty and without repeats, got {names}")
    return dict(sizes)


def parse_budgets(tokens: Sequence[str | int], sizes: Sequence[str] | None) -> dict:
    """Stage-2 budgets per size: each token is ``STEPS`` (every size) or ``SIZE=STEPS,STEPS,...``
    (that size only, replacing the common list). Returns ``{size: [steps, ...]}`` (key None
    without sizes), each list sorted.

    Raises:
      ValueError: a step count that is not a positive int, a repeat, a size not in `sizes`, or a
        size left without budgets.
    """
    common, own = [], {}
    for token in map(str, tokens):
        name, eq, values = token.rpartition("=")
        if eq and (sizes is None or name not in sizes):
            raise ValueError(f"budgets {token!r}: {name!r} is not one of the sizes {list(sizes or [])}")
        target = own.setdefault(name, []) if eq else common
        for v in values.split(","):
            if not v.strip().isdigit() or int(v) < 1:
                raise ValueError(f"budgets {token!r}: steps must be positive ints, got {v!r}")
            target.append(int(v))
    out = {}
    for size in (sizes or [None]):
        steps = own.get(size, common)
        if not steps or len(set(steps)) != len(steps):
            raise ValueError(f"budgets of size {size}: must be non-empty and without repeats, got {steps}")
        out[size] = sorted(steps)
    return out


def cell_name(k: int, budget: int, size: str | None = None) -> str:
    return f"K{k}-steps{budget}" if size is None else f"{size}-K{k}-steps{budget}"


def cell_dir(out: Path, seed: int, k: int, budget: int, size: str | None = None) -> Path:
    return Path(out) / f"seed-{seed}" / cell_name(k, budget, size)


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
    share_stages(source, dest, (stage1,), with_data=True)


def share_stages(source: Path, dest: Path, names: Sequence[str], with_data: bool = False) -> None:
    """Copy the finished training stages `names` of run `source` into run `dest` (``models/<s>/``,
    ``logs/<s>/``, ``stages/<s>.json``; with `with_data` also ``data/`` and ``tokenizer/``);
    what is already in `dest`, and what `source` lacks, is left alone."""
    source, dest = Path(source), Path(dest)
    dirs = [*(("data", "tokenizer") if with_data else ()),
            *(f"{kind}/{n}" for n in names for kind in ("models", "logs"))]
    for rel in dirs:
        if (source / rel).is_dir() and not (dest / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source / rel, dest / rel)
    for n in names:
        marker = Path("stages") / f"{n}.json"
        if (source / marker).is_file() and not (dest / marker).exists():
            (dest / marker).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / marker, dest / marker)


def run_sweep(clusters: Sequence[int], budgets, seeds: Sequence[int], out: Path, run_cell: Callable[..., dict],
              stage1: str, log=print, sizes: Sequence[str] | None = None, share_dense: bool = True) -> dict:
    """Run `run_cell` over the grid, sharing the data stage within a seed, stage 1 within a (seed,
    size) and, with `share_dense`, the dense model within a (seed, size, budget); then write the
    summaries; returns the sweep dict.

    Args:
      clusters: the K values. seeds: the seeds.
      budgets: stage-2 steps, a list for every size or ``{size: [steps, ...]}`` (`parse_budgets`;
        key None without sizes).
      run_cell: ``run_cell(seed, k, budget, directory)`` without sizes, ``run_cell(seed, k, budget,
        directory, size)`` with them; returns the cell's report dict.
      stage1: the task's stage-1 name.
      sizes: size names, or ``{name: overrides}`` (`parse_sizes`; recorded in sweep.json); None: no
        size axis (the cells' old layout).

    Raises:
      ValueError: an empty grid axis, or a repeated value in one.
    """
    names = None if sizes is None else list(sizes)
    budgets = budgets if isinstance(budgets, dict) else {size: list(budgets) for size in (names or [None])}
    for name, values in (("clusters", clusters), ("seeds", seeds), ("sizes", names or [None]),
                         *((f"budgets of size {sz}", b) for sz, b in budgets.items())):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name}: must be non-empty and without repeats, got {list(values)}")
    out = Path(out)
    reports: dict[tuple, dict[int, dict]] = {}
    for s in seeds:
        seed_first = None                       # the data stage depends on neither size, K nor budget
        for size in (names or [None]):
            first = None
            for b in budgets[size]:
                dense_from = None
                for k in clusters:
                    where = cell_dir(out, s, k, b, size)
                    if first is not None:
                        share_stage1(first, where, stage1)
                    elif seed_first is not None:
                        share_stages(seed_first, where, (), with_data=True)
                    seed_first = seed_first or where
                    if share_dense and dense_from is not None:
                        share_stages(dense_from, where, ("dense",))
                    what = "" if size is None else f"size {size}, "
                    log(f"[sweep] seed {s}, {what}K={k}, stage2.steps={b}: {where}")
                    args = (s, k, b, where) if size is None else (s, k, b, where, size)
                    reports.setdefault((size, k, b), {})[s] = run_cell(*args)
                    first = first or where
                    dense_from = dense_from or where
    return summarize(out, clusters, budgets, reports, sizes=sizes)


def cell_scale(report: dict) -> dict | None:
    """A cell's scale from one of its reports (`experiments.text.report` ``compute``): ``params``
    (the decoder's total parameters, embeddings included), ``non_embedding_params``, tokens of
    stage 1 and of stage 2 (dense's; the experts' sum is the same), ``tokens_per_param`` (dense's
    training tokens, stage 1 + 2, over ``params``: Chinchilla's convention, compute-optimal ~20),
    ``stage2_tokens_per_param``, ``forward_flops_per_token`` (one model, `dfm.models.flops`) and
    ``training_flops`` of dense and of the ensemble (stage 1 + stage 2 tokens x 3 x forward). None
    for a report without FLOPs or token counts (the multimodal job's counts no training tokens)."""
    comp = report.get("compute") or {}
    flops = comp.get("flops")
    if not flops or not all(k in comp for k in ("base_tokens", "dense_stage2_tokens", "experts_stage2_tokens")):
        return None
    model = flops["per_model"]
    params, base, dense, experts = (model["params"]["total"], comp["base_tokens"], comp["dense_stage2_tokens"],
                                    comp["experts_stage2_tokens"])
    return {"params": params, "non_embedding_params": model["params"]["non_embedding"],
            "stage1_tokens": base, "stage2_tokens": dense, "tokens_per_param": (base + dense) / params,
            "stage2_tokens_per_param": dense / params, "forward_flops_per_token": model["forward"],
            "training_flops": {"dense": (base + dense) * model["training"],
                               "ensemble": (base + experts) * model["training"]},
            "counted": flops.get("counted")}


def summarize(out: Path, clusters: Sequence[int], budgets, reports: dict, sizes: Sequence[str] | None = None) -> dict:
    """Per-cell summaries over seeds, then ``sweep.json``, ``sweep.md``, ``regime.png`` and (without
    sizes) ``sweep.png`` in `out`.

    Args:
      budgets: a list of steps, or ``{size: [steps, ...]}``.
      reports: ``{(size, k, budget): {seed: report}}`` (``(k, budget)`` keys are accepted without sizes).
    """
    out = Path(out)
    overrides = dict(sizes) if isinstance(sizes, dict) else {s: SIZES.get(s) for s in (sizes or [])}
    sizes = None if sizes is None else list(sizes)
    budgets = budgets if isinstance(budgets, dict) else {size: list(budgets) for size in (sizes or [None])}
    reports = {(key if len(key) == 3 else (None, *key)): per_seed for key, per_seed in reports.items()}
    cells = []
    for size in (sizes or [None]):
        for k in clusters:
            for b in budgets[size]:
                per_seed = reports[(size, k, b)]
                summary = multi.summarize(out / "cells" / cell_name(k, b, size), per_seed)
                cells.append({"size": size, "k": k, "budget": b, "summary": summary,
                              "report": per_seed[min(per_seed)]})
    first = cells[0]["summary"]
    higher = bool(first.get("higher_is_better", False))
    sweep = {"clusters": list(clusters), "sizes": None if sizes is None else list(sizes),
             "size_overrides": None if sizes is None else {s: list(overrides.get(s) or ()) for s in sizes},
             "budgets": budgets[None] if sizes is None else {s: budgets[s] for s in sizes},
             "seeds": first["seeds"], "config": first.get("config"), "metric_key": first["metric_key"],
             "higher_is_better": higher, "unit": first["unit"],
             "parity_margin": first["parity_margin"], "interval": first["interval"],
             "verdict_rule": first["verdict_rule"], "cells": []}
    for c in cells:
        costs = {s["name"]: s for s in c["report"]["systems"]}
        systems = {s["name"]: {"delta_vs_dense": s["delta_vs_dense"], first["metric_key"]: s[first["metric_key"]],
                               "inference_flops_per_token": costs.get(s["name"], {}).get("inference_flops_per_token"),
                               "experts_evaluated": costs.get(s["name"], {}).get("experts_evaluated")}
                   for s in c["summary"]["systems"]}
        sweep["cells"].append({"size": c["size"], "k": c["k"], "budget": c["budget"], "scale": cell_scale(c["report"]),
                               "best_router": regime.best_router(systems, higher), "systems": systems})
    sweep["crossover"] = regime.crossovers(sweep)
    atomic_write_json(out / "sweep.json", sweep)
    atomic_write_text(out / "sweep.md", sweep_markdown(sweep))
    regime.plot_regime(sweep, out / "regime.png")
    if sizes is None:
        plot_sweep(sweep, out / "sweep.png")
    return sweep


def sweep_markdown(sweep: dict) -> str:
    """One row per (size, K, budget, system): the cell's scale (parameters, tokens per parameter,
    training FLOPs of each side), the system's inference FLOPs per token, Δ vs dense mean ± sd
    [t 95% CI over seeds] and verdict; then the crossover table of every (size, K)."""
    axes = "size x K x stage-2 budget" if sweep.get("sizes") else "K x stage-2 budget"
    lines = [f"# Sweep of {sweep['config']}: {axes}, seeds {sweep['seeds']}", "",
             (f"Δ = system - dense ({sweep['unit']}); {sweep['interval']}. Verdict {sweep['verdict_rule']} "
              f"Parity margin m = {sweep['parity_margin']}."), "",
             ("Tokens/param: the dense model's training tokens (stage 1 + stage 2) over its parameters "
              "(embeddings included; stage 2 alone in parentheses). Training TFLOPs: stage 1 + stage 2, dense = "
              "ensemble (equal tokens, same architecture). Inference MFLOPs/token: the system's, models run in "
              "parentheses. " + next((f"FLOPs counted: {c['scale']['counted']}." for c in sweep["cells"]
                                      if c.get("scale") and c["scale"].get("counted")), "")), "",
             "| size | params | K | stage-2 steps | tokens/param | training TFLOPs | system | inference MFLOPs/token "
             "| dense mean | Δ vs dense mean ± sd [95% CI] | verdict |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    key = sweep["metric_key"]
    for cell in sweep["cells"]:
        dense = cell["systems"].get("dense", {})
        sc = cell.get("scale") or {}
        params = f"{sc['params']:,}" if sc else "-"
        tpp = f"{sc['tokens_per_param']:.3g} ({sc['stage2_tokens_per_param']:.3g})" if sc else "-"
        tflops = f"{sc['training_flops']['dense'] / 1e12:.3g}" if sc else "-"
        for name, s in cell["systems"].items():
            if name == "base" or name.startswith("random-"):
                continue
            d = s["delta_vs_dense"]
            ci = d.get("ci95")
            sd = "-" if d.get("std") is None else f"{d['std']:.4f}"
            interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
            delta = "reference" if name == "dense" else f"{d['mean']:+.4f} ± {sd}{interval}"
            star = " (best)" if name == cell.get("best_router") else ""
            lines.append(f"| {cell.get('size') or '-'} | {params} | {cell['k']} | {cell['budget']} | {tpp} | "
                         f"{tflops} | "
                         f"{name}{star} | {_mflops(s)} | "
                         f"{_num(dense.get(key, {}).get('mean'))} | {delta} | "
                         f"{'reference' if name == 'dense' else d.get('verdict')} |")
    if sweep.get("crossover"):
        lines += ["", "## Crossover (best deployable router of each cell; the oracle excluded)", "",
                  regime.PARITY_RULE + ". Tokens per parameter as above; Δ trend: least-squares slope of the "
                  "mean Δ against log10(tokens per parameter).", "",
                  *regime.crossover_markdown(sweep["crossover"], sweep["unit"])]
    return "\n".join(lines) + "\n"


def _mflops(system: dict) -> str:
    """``0.292 (4)``: inference MFLOPs per token and the models run (- when the report has none)."""
    flops = system.get("inference_flops_per_token")
    if flops is None:
        return "-"
    m = system.get("experts_evaluated")
    return f"{flops / 1e6:.3g}" + ("" if m is None else f" ({m})")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def plot_sweep(sweep: dict, path: Path) -> Path:
    """Δ vs dense against K (log2 axis), one panel per plotted system, one line per budget; error
    bars: the t 95% interval over seeds; the parity margin as a grey band."""
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
