"""A job repeated over seeds: ``dfm run --seeds N`` (or a config's ``seeds = [...]``).

For each seed s the complete job runs into ``<out>/seed-<s>/`` with the overrides ``seed=s`` and
``partition.seed=s`` (model initialization, batch order, the featurizer, k-means and the random
partition all change), each sub-run an ordinary run directory (resumable: a finished stage, and so
a finished sub-run, is skipped). Then `summarize` writes ``<out>/summary.json`` and
``<out>/summary.md``:

- per system: its metric over seeds: mean, sample sd (ddof 1), per seed values. The metric is the
  report's ``comparison.metric_key`` (default ``"loss"``: the text job's nats/token; the multimodal
  job's ``"exact_match"``), read from each system's entry of that name, with
  ``comparison.higher_is_better`` (default false) deciding the direction of the verdicts and
  ``comparison.unit`` / ``comparison.bootstrap_units`` the wording of the summary;
- ``delta_vs_dense`` = system - dense per seed, ``{"mean", "std", "ci95", "seeds", "per_seed",
  "verdict"}``: ``ci95`` is the Student-t 95% interval of the mean of the per-seed differences
  (>= 2 seeds; with one seed it is that seed's bootstrap interval), ``per_seed`` each seed's
  difference with its paired bootstrap interval over test units (the sub-run's report.json),
  and ``verdict`` is `experiments.engine.intervals.verdict` of ``ci95`` with the config's parity
  margin. The t-interval treats the seeds as independent replicates of the whole job, so it covers
  the variation of training and partition, not only of the test documents.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.engine.intervals import (
    VERDICT_RULE,
    VERDICT_RULE_HIGHER,
    t_interval,
    verdict,
)
from experiments.engine.rundir import atomic_write_json, atomic_write_text, read_json


def seed_overrides(seed: int, config) -> list[str]:
    """The overrides of seed `seed`: the job seed and, where the config has one, the partition seed."""
    out = [f"seed={seed}"]
    if hasattr(getattr(config, "partition", None), "seed"):
        out.append(f"partition.seed={seed}")
    return out


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def run_seeds(seeds: Sequence[int], out: Path, run_one: Callable[[int, Path], dict], log=print) -> dict:
    """Run `run_one(seed, sub_run_directory)` for every seed (it returns the sub-run's report dict),
    then write the summary; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for s in seeds:
        log(f"[seeds] seed {s}: {seed_dir(out, s)}")
        reports[s] = run_one(s, seed_dir(out, s))
    return summarize(out, reports)


def summarize(out: Path, reports: dict | None = None, seeds: Sequence[int] | None = None) -> dict:
    """Write ``summary.json`` / ``summary.md`` in `out` from the sub-runs' reports (`reports`
    ``{seed: report dict}``, or read from ``seed-<s>/report.json`` for `seeds`)."""
    out = Path(out)
    if reports is None:
        reports = {s: read_json(seed_dir(out, s) / "report.json") for s in seeds}
    seeds = sorted(reports)
    first = reports[seeds[0]]
    comparison = first.get("comparison") or {}
    margin = comparison.get("parity_margin")
    if margin is None:
        margin = (first.get("config", {}).get("eval") or {}).get("parity_margin", 0.02)
    key = comparison.get("metric_key", "loss")
    higher = bool(comparison.get("higher_is_better", False))
    unit = comparison.get("unit", "nats/token")
    units = comparison.get("bootstrap_units", "test documents")
    names = [s["name"] for s in first["systems"]]
    systems = []
    for name in names:
        rows = {}
        for s in seeds:
            by_name = {x["name"]: x for x in reports[s]["systems"]}
            if name in by_name and "dense" in by_name and key in by_name[name] and key in by_name["dense"]:
                rows[s] = (by_name[name], by_name["dense"])
        if not rows:
            continue
        used = sorted(rows)
        losses = [rows[s][0][key] for s in used]
        loss_mean, loss_sd, _ = t_interval(losses)
        per_seed = []
        for s in used:
            system, dense = rows[s]
            d = system.get("delta_vs_dense") or {}
            per_seed.append({"seed": s, "delta": d.get("mean", system[key] - dense[key]),
                             "ci95": d.get("ci95"), "verdict": d.get("verdict")})
        deltas = [p["delta"] for p in per_seed]
        d_mean, d_sd, d_ci = t_interval(deltas)
        if d_ci is None:
            d_ci = per_seed[0]["ci95"]
        if name == "dense":
            call = "reference"
        elif d_ci is None or not all(map(math.isfinite, d_ci)):
            call = "inconclusive"
        else:
            call = verdict(d_ci[0], d_ci[1], margin, higher_is_better=higher)
        systems.append({
            "name": name, "kind": rows[used[0]][0].get("kind"), "router": rows[used[0]][0].get("router"),
            key: {"mean": loss_mean, "std": loss_sd, "per_seed": dict(zip(map(str, used), losses))},
            "delta_vs_dense": {"mean": d_mean, "std": d_sd, "ci95": d_ci, "seeds": used, "per_seed": per_seed,
                               "verdict": call},
        })
    summary = {
        "config": first.get("config", {}).get("name"),
        "schedule": first.get("schedule"),
        "metric": first.get("metric"),
        "metric_key": key, "higher_is_better": higher, "unit": unit,
        "seeds": seeds,
        "runs": {str(s): str(seed_dir(out, s)) for s in seeds},
        "parity_margin": margin,
        "interval": (f"ci95: Student-t 95% interval of the mean over seeds of (system - dense), {unit} "
                     f"(>= 2 seeds; one seed: its paired bootstrap interval over {units}); per_seed[*].ci95: "
                     f"each seed's paired bootstrap interval over {units}"),
        "verdict_rule": VERDICT_RULE_HIGHER if higher else VERDICT_RULE,
        "systems": systems,
        "s11": [_s11(reports[s]) for s in seeds],
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    return summary


def _s11(rep: dict) -> dict | None:
    s11 = rep.get("s11")
    if not s11:
        return None
    return {"gap": s11.get("dense_minus_oracle_gap", s11.get("dense_minus_weighted_expert_loss")),
            "entropy_bound_per_token": (s11.get("entropy_bound") or {}).get("nats_per_token")}


def _num(x, signed=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _ci(ci):
    return "-" if not ci else f"[{_num(ci[0], True)}, {_num(ci[1], True)}]"


HEADER = ("| system | {key} mean ± sd | Δ vs dense mean ± sd [95% CI over seeds] | per-seed Δ [bootstrap 95% CI] "
          "| verdict |")


def summary_markdown(summary: dict) -> str:
    """summary.md: one row per system, mean ± sd over seeds, intervals and the verdict."""
    n = len(summary["seeds"])
    key, unit = summary.get("metric_key", "loss"), summary.get("unit", "nats/token")
    runs = ", ".join(f"`{p}`" for p in summary["runs"].values())
    schedule = f" ({summary['schedule']} schedule)" if summary.get("schedule") else ""
    lines = [f"# `{summary['config']}` over {n} seed(s) {summary['seeds']}{schedule}", "",
             f"Sub-runs: {runs}. Each seed varies the job seed and the partition seed.", "",
             HEADER.format(key=key),
             "|---|---:|---:|---|---|"]
    for s in summary["systems"]:
        d, loss = s["delta_vs_dense"], s[key]
        per = "; ".join(f"s{p['seed']}: {_num(p['delta'], True)} {_ci(p['ci95'])}" for p in d["per_seed"])
        lines.append(f"| {s['name']} | {_num(loss['mean'])} ± {_num(loss['std'])} | "
                     f"{_num(d['mean'], True)} ± {_num(d['std'])} {_ci(d['ci95'])} | {per} | {d['verdict']} |")
    better = "positive" if summary.get("higher_is_better") else "negative"
    lines += ["", f"Δ = system - dense in {unit} ({better}: better than dense). {summary['interval']}.",
              f"Verdict {summary['verdict_rule']} Margin m = {summary['parity_margin']} ({unit}).", ""]
    gaps = [x for x in summary["s11"] if x]
    if gaps:
        lines += ["S11 per seed: dense - oracle gap (estimates I(X; K) only for well-trained models) / plug-in "
                  "upper bound H(K) per token: "
                  + "; ".join(f"s{s}: {_num(x['gap'], True)} / {_num(x['entropy_bound_per_token'])}"
                              for s, x in zip(summary["seeds"], summary["s11"]) if x), ""]
    return "\n".join(lines)
