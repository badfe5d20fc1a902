"""Report of the multimodal job: report.json, report.md (tables of every system), plots.

Files in the run directory: ``report.json`` (with, per test question: every system's prediction and
its exact match / VQA accuracy (``question_scores``), the fixed routers' weights, its cluster and the
Bayes filter's weights after the answer) / ``report.md``; ``plots/loss_curves.png``,
``plots/routing.png`` (mean router weight per expert for the test questions of each image source),
``plots/partition.png`` (train conversations per source and cluster), ``plots/examples.png`` (test
images with question, reference and each system's answer).

Intervals (`dense_comparison`, with `experiments.engine.intervals.unit_bootstrap`): every system
gets ``exact_match`` (its mean), ``intervals`` (95% intervals of its exact match, VQA accuracy and
exact match per question type) and ``delta_vs_dense = {"mean", "std", "ci95", "seeds", "verdict",
"margin", ...}``: its exact match minus dense's (a fraction: 0.01 = 1 point) with the paired
percentile bootstrap interval and the parity verdict (higher is better) against ``eval.parity_margin``
(``std`` is null for one seed; ``dfm run --seeds N`` gives the spread over seeds,
`experiments.engine.seeds`). The bootstrap resamples test images, each with all its questions (a
test image carries several questions, whose scores are correlated): with one question per image it
is the plain bootstrap over questions. Every statistic is recomputable from ``question_scores``
and ``test_rows[*].image``.
"""
from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from dfm.decentral.temperature import temperature_note
from dfm.models.flops import COUNTED, SOURCE, experts_evaluated, flops_per_token, image_flops
from experiments.engine.intervals import VERDICT_RULE_HIGHER, unit_bootstrap, verdict
from experiments.engine.plots import loss_curves
from experiments.engine.rundir import RunDir, atomic_write_json, atomic_write_text
from experiments.mllm import plots
from experiments.mllm.config import STAGE1, MultimodalExperimentConfig, frozen_prefixes
from experiments.mllm.modeling import model_config

METRIC = "exact_match"


def _types(systems: list[dict]) -> list[str]:
    """The question types of the scores (``all`` and the per-benchmark ``by_task`` entry left out)."""
    return [t for t in systems[0]["scores"] if t not in ("all", "by_task")]


def benchmark_lines(systems: list[dict]) -> list[str]:
    """report.md's table of the per-record metrics (records with a ``task`` / ``metric`` field, e.g.
    written by ``dfm data convert``): one row per system, one column per task, the task's score (%),
    its metric and n in the header; [] when no system has ``scores.by_task``."""
    tasks = list((systems[0]["scores"].get("by_task") or {}))
    if not tasks:
        return []
    first = systems[0]["scores"]["by_task"]
    head = [f"{t} ({first[t]['metric']}, n={first[t]['n']})" for t in tasks]
    lines = ["", "### Benchmarks: each record scored by its own metric (%)", "",
             "| system | " + " | ".join(head) + " |", "|---|" + "---:|" * len(tasks)]
    for s in systems:
        by = s["scores"].get("by_task") or {}
        lines.append(f"| {s['name']} | " + " | ".join(_pct(by[t]["score"]) if t in by else "—" for t in tasks) + " |")
    return lines


def routing_by_source(results: dict) -> tuple[list[str], dict]:
    """Mean router weights `[sources, K]` of the test questions, per router."""
    sources = sorted({r["source"] or "?" for r in results["test_rows"]})
    src = np.asarray([r["source"] or "?" for r in results["test_rows"]])
    out = {}
    named = dict(results["weights"])
    named["bayes (after the answer)"] = results["bayes_weights_after_answer"]
    for name, w in named.items():
        w = np.asarray(w, float)
        out[name] = [w[src == s].mean(axis=0).tolist() if (src == s).any() else [float("nan")] * w.shape[1]
                     for s in sources]
    return sources, out


def dense_comparison(results: dict, seed: int, margin: float, resamples: int) -> dict:
    """Add ``exact_match``, ``intervals`` and ``delta_vs_dense`` to every system of `results` (in
    place; see the module docstring) from ``results["question_scores"]`` and the test rows' images;
    returns the report's ``comparison`` entry (metric, margin, statistic, verdict rule).

    Raises:
      KeyError: a system without question scores, or no "dense" system.
    """
    rows, scores = results["test_rows"], results["question_scores"]
    unit = np.asarray([r["image"] for r in rows])
    qtype = np.asarray([r["question_type"] for r in rows])
    dense = np.asarray(scores["dense"][METRIC], np.float64)

    def interval(values, mask=None, reference=None):
        m = np.ones(len(values), bool) if mask is None else mask
        return unit_bootstrap(values[m], unit[m], None if reference is None else reference[m],
                              resamples=resamples, seed=seed)

    for system in results["systems"]:
        name = system["name"]
        em, vqa = (np.asarray(scores[name][k], np.float64) for k in (METRIC, "vqa_accuracy"))
        by_type = {}
        for t in sorted(set(qtype.tolist())):
            b = interval(em, qtype == t)
            by_type[t] = {"n": b["items"], "exact_match": b["mean"], "ci95": b["ci95"]}
        ivs = {k: interval(v) for k, v in ((METRIC, em), ("vqa_accuracy", vqa))}
        system[METRIC] = ivs[METRIC]["mean"]
        system["intervals"] = {k: {"mean": b["mean"], "ci95": b["ci95"]} for k, b in ivs.items()}
        system["intervals"]["exact_match_by_type"] = by_type
        d = interval(em, reference=dense)
        lo, hi = d["ci95"]
        system["delta_vs_dense"] = {
            "mean": d["mean"], "std": None, "ci95": [lo, hi], "seeds": [seed],
            "verdict": "reference" if name == "dense" else verdict(lo, hi, margin, higher_is_better=True),
            "margin": margin, "resamples": resamples, "units": d["units"], "questions": d["items"],
            "metric": METRIC}
    units = len(set(unit.tolist()))
    return {"metric_key": METRIC, "higher_is_better": True, "unit": "exact match (fraction; 0.01 = 1 point)",
            "bootstrap_units": "test images",
            "statistic": f"system - dense exact match; 95% paired percentile bootstrap over the {units} test images "
                         f"({len(rows)} questions; an image's questions resampled together; {resamples} "
                         f"resamples, seed {seed})",
            "parity_margin": margin, "verdict_rule": VERDICT_RULE_HIGHER}


def flops_entry(config, results: dict) -> dict:
    """Inference FLOPs of every system (`dfm.models.flops`; added in place to ``results["systems"]``)
    and the report's ``compute["flops"]``. Per system: ``experts_evaluated`` (1 for dense, stage 1,
    centroid top-1 and the oracle, k for top-k, K for the Bayes filter and the random control),
    ``inference_flops_per_token``: that many decoder forwards per LLM position (text and image
    positions alike, attention over ``data.max_length`` positions), and
    ``inference_flops_per_image``: the vision tower (once when stage 2 freezes it, as the experts
    then share it; else once per expert run) plus the projector per expert run."""
    d = results["data"]
    mc = model_config(config, int(d["vocab_size"]), int(d["image_token_id"]))
    text, img = flops_per_token(mc.text, config.data.max_length), image_flops(mc)
    shared_tower = "vision_tower" in frozen_prefixes(config.stage2.train)
    k = config.partition.num_clusters
    available = k - len(results.get("skipped_experts") or [])
    for s in results["systems"]:
        m = experts_evaluated(s["name"], max(1, k if s["name"].startswith("random-") else available),
                              config.eval.top_k)
        s["experts_evaluated"] = m
        s["inference_flops_per_token"] = m * text.forward
        s["inference_flops_per_image"] = (1 if shared_tower else m) * img.tower + m * img.projector
    return {"counted": COUNTED + "; per image: the vision tower up to the feature layer (2 x its parameters per "
                                 "position + attention; shared by the experts when stage 2 freezes it) and the "
                                 "projector (2 x its parameters per image token) of each expert run",
            "source": SOURCE, "per_model": text.to_dict(), "per_image": img.to_dict(), "shared_tower": shared_tower}


def build_report(config: MultimodalExperimentConfig, results: dict) -> dict:
    """Assemble report.json's contents (without the per-question lists) from the evaluation results."""
    systems, c = results["systems"], config
    dense = next(s for s in systems if s["name"] == "dense")
    for s in systems:
        s["delta_exact_match_vs_dense"] = s["scores"]["all"]["exact_match"] - dense["scores"]["all"]["exact_match"]
    comparison = dense_comparison(results, c.seed, c.eval.parity_margin, c.eval.bootstrap_resamples)
    flops = flops_entry(c, results)
    sources, routing = routing_by_source(results)
    return {
        "config": c.to_dict(), "metric": METRIC, "comparison": comparison, "systems": systems,
        "compute": {"flops": flops},
        "question_types": _types(systems),
        "num_test_questions": results["num_test_questions"], "num_val_questions": results["num_val_questions"],
        "num_test_images": len({r["image"] for r in results["test_rows"]}),
        "temperature": results["temperature"], "priors": results["priors"],
        "skipped_experts": results.get("skipped_experts", []),
        "routing_by_source": {"sources": sources, "weights": routing},
        "train_clusters_by_source": results["train_clusters_by_source"],
        "partition": results["partition"], "data": results["data"],
        "stages": {n: {k: v for k, v in info.items() if k != "history"} for n, info in results["stages"].items()},
    }


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _ci(ci, signed=False) -> str:
    if not ci:
        return ""
    f = "{:+.1f}" if signed else "{:.1f}"
    return f" [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def pct_ci(mean, ci) -> str:
    """``52.3 [48.1, 56.4]``: a fraction and its interval in percent (points)."""
    return _pct(mean) + _ci(ci)


def delta_text(system: dict) -> str:
    """``+1.2 ± - [-0.8, +3.1]``: Δ EM vs dense in points, ± sd over seeds (- for one seed) and the 95%
    interval; the plain difference for a report without intervals."""
    d = system.get("delta_vs_dense")
    if not d:
        return f"{100 * system.get('delta_exact_match_vs_dense', float('nan')):+.1f}"
    sd = "-" if d.get("std") is None else f"{100 * d['std']:.1f}"
    return f"{100 * d['mean']:+.1f} ± {sd}" + _ci(d.get("ci95"), signed=True)


def temperature_text(temperature: float) -> str:
    """`T = ...`, with the note of `dfm.decentral.temperature.temperature_note` when the fit sits at a
    search bound (no interior maximum; the limit of the router it stands for)."""
    note = temperature_note(temperature)
    return f"T = {temperature:.4g}" + (f", {note}" if note else " (an interior maximum)")


def flops_text(system: dict) -> str:
    """``0.929 (1); 3.6``: MFLOPs per LLM position (models run); MFLOPs per image (- when absent)."""
    f = system.get("inference_flops_per_token")
    if f is None:
        return "-"
    return f"{f / 1e6:.3g} ({system.get('experts_evaluated', '?')}); {system['inference_flops_per_image'] / 1e6:.3g}"


def markdown(rep: dict) -> str:
    """report.md text."""
    types = rep["question_types"]
    comp = rep.get("comparison") or {}
    lines = [f"# {rep['config']['name']}: dense vs decentralized LLaVA-style experts", "",
             (f"{rep['num_test_questions']} test questions on {rep.get('num_test_images', '?')} test images; "
              f"K = {rep['config']['partition']['num_clusters']} experts "
              f"(spherical balanced k-means on stage-1 image features); top-k temperature fitted on "
              f"{rep['num_val_questions']} val questions: {temperature_text(rep['temperature'])}."), "",
             *([(f"**WARNING: expert(s) {rep['skipped_experts']} were skipped (lost); every ensemble routes "
                 "among the remaining experts (renormalised routers) and the oracle is not reported.**"), ""]
               if rep.get("skipped_experts") else []),
             ("Exact match (EM, %) and VQA accuracy (%) with 95% intervals, MME acc / acc+ (%) on the paired "
              "yes/no questions, answer NLL (nats/token, teacher-forced reference answer), and the EM difference "
              "with dense in points with its interval and the parity verdict."), ""]
    head = ["system", "router", "EM % [95% CI]", "VQA acc % [95% CI]", "MME acc", "MME acc+", "answer NLL",
            "inference MFLOPs/position (models); /image", "Δ EM vs dense ± sd [95% CI]", "vs dense"]
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for s in rep["systems"]:
        sc, iv = s["scores"], s.get("intervals") or {}
        mme = sc.get("mme", {})
        cells = [s["name"], s["router"] or "", pct_ci(sc["all"]["exact_match"], iv.get(METRIC, {}).get("ci95")),
                 pct_ci(sc["all"]["vqa_accuracy"], iv.get("vqa_accuracy", {}).get("ci95")),
                 _pct(mme.get("acc")) if mme else "—", _pct(mme.get("acc_plus")) if mme else "—",
                 f"{s['answer_nll']:.4f}", flops_text(s), delta_text(s),
                 (s.get("delta_vs_dense") or {}).get("verdict", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    if comp:
        lines += ["", (f"Δ = system - dense in EM points (positive: better than dense); ± sd over seeds (- for "
                       f"one seed); intervals: {comp['statistic']}. Verdict {comp['verdict_rule']} Margin m = "
                       f"{100 * comp['parity_margin']:g} EM point(s).")]
    flops = (rep.get("compute") or {}).get("flops")
    if flops:
        lines += ["", "Inference MFLOPs per LLM position (text and image positions) and per image: "
                      f"{flops['counted']}."]
    counts = {t: rep["systems"][0]["scores"][t]["n"] for t in types}
    lines += ["", "### Exact match (%) per question type [95% CI]", "",
              "| system | " + " | ".join(f"{t} (n={counts[t]})" for t in types) + " |",
              "|---|" + "---:|" * len(types)]
    for s in rep["systems"]:
        by = (s.get("intervals") or {}).get("exact_match_by_type", {})
        lines.append(f"| {s['name']} | " + " | ".join(
            pct_ci(s["scores"][t]["exact_match"], (by.get(t) or {}).get("ci95")) for t in types) + " |")
    lines += benchmark_lines(rep["systems"])
    lines += ["", ("The oracle (the test image's cluster) is the nearest centroid, so it equals centroid top-1 "
                   "(THEORY S12). The Bayes filter (S9) starts at the priors w_k and is updated by each answer "
                   "token: the experts model the answer given image and question, not the image."), ""]
    part = rep["partition"]
    lines += ["## Partition", "",
              (f"Images per cluster {part['images_per_cluster']}, train conversations per cluster "
               f"{part['conversations_per_cluster']}, test images per cluster {part['test_images_per_cluster']}."),
              ""]
    comp_src = rep["train_clusters_by_source"]
    if comp_src:
        k = len(next(iter(comp_src.values())))
        lines += ["| source | " + " | ".join(f"cluster {j}" for j in range(k)) + " |", "|---|" + "---|" * k]
        lines += [f"| {src} | " + " | ".join(str(v) for v in row) + " |" for src, row in comp_src.items()]
    lines += ["", "## Routing (mean weight per expert, test questions by image source)", ""]
    r = rep["routing_by_source"]
    for name, rows in r["weights"].items():
        lines.append(f"- **{name}**: " + "; ".join(
            f"{src} [{', '.join(f'{x:.2f}' for x in row)}]" for src, row in zip(r["sources"], rows)))
    lines += ["", "## Stages", "",
              "Each stage keeps its best-validation checkpoint (answer loss on its own validation images: all of "
              "them for stage 1, dense and the random control, cluster k's for expert k); the test questions are "
              "read only by the evaluation.", "",
              "| stage | steps trained | step kept | validation loss (kept) | conversations | final training loss "
              "| seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n, info in rep["stages"].items():
        kept = info.get("best_step") if info.get("kept") == "best" else info["steps"]
        val = info.get("best_val_loss") if info.get("kept") == "best" else None
        lines.append(f"| {n} | {info['steps']} | {kept} | {'-' if val is None else f'{val:.4f}'} | "
                     f"{info['train_examples']} | {info['final_loss']:.4f} | {info['wall_time_s']:.1f} |")
    lines += ["", ("Plots: `plots/loss_curves.png`, `plots/routing.png`, `plots/partition.png`, "
                   "`plots/examples.png`."), "", "## Config", "", "```toml", rep.get("config_toml", "").rstrip(),
              "```", ""]
    return "\n".join(lines)


def write_report(config: MultimodalExperimentConfig, run: RunDir, results: dict, images_test: np.ndarray) -> dict:
    """Plots, report.json and report.md (each written atomically); returns the report dict."""
    rep = build_report(config, results)
    rep["config_toml"] = config.to_toml()
    loss_curves(results["stages"], run.plots / "loss_curves.png",
                f"{config.name}: training loss (lines), validation loss (dots; star: the kept step)",
                first=STAGE1)
    plots.routing_heatmaps(rep["routing_by_source"]["weights"], rep["routing_by_source"]["sources"],
                           run.plots / "routing.png")
    if rep["train_clusters_by_source"]:
        plots.composition(rep["train_clusters_by_source"], run.plots / "partition.png")
    n = min(config.eval.grid_examples, len(results["test_rows"]))
    if n:
        pick = np.linspace(0, len(results["test_rows"]) - 1, n).round().astype(int)
        rows = [results["test_rows"][i] for i in pick]
        imgs = images_test[[r["image"] for r in rows]]
        shown = {k: [v[i] for i in pick] for k, v in results["predictions"].items()
                 if k in ("dense", "ensemble/centroid-top1", "ensemble/bayes", "random-ensemble/bayes")}
        plots.example_grid(imgs, rows, shown, run.plots / "examples.png")
    per_question = {k: results[k] for k in ("predictions", "question_scores", "test_rows", "weights",
                                            "test_clusters", "bayes_weights_after_answer")}
    atomic_write_json(run.report_json, rep | per_question)
    atomic_write_text(run.report_md, markdown(rep))
    return rep


def print_summary(rep: dict) -> None:
    """Rich table: exact match / VQA accuracy / answer NLL per system, Δ EM vs dense and the verdict."""
    table = Table(title=f"{rep['config']['name']}: {rep['num_test_questions']} test questions")
    for col in ("system", "EM % [95% CI]", "VQA %", "answer NLL", "Δ EM vs dense [95% CI]", "verdict"):
        table.add_column(col, justify="left" if col in ("system", "verdict") else "right")
    for s in rep["systems"]:
        sc = s["scores"]
        ci = ((s.get("intervals") or {}).get(METRIC) or {}).get("ci95")
        table.add_row(s["name"], pct_ci(sc["all"]["exact_match"], ci), _pct(sc["all"]["vqa_accuracy"]),
                      f"{s['answer_nll']:.4f}", delta_text(s).replace(" ± -", ""),
                      (s.get("delta_vs_dense") or {}).get("verdict", "-"))
    Console().print(table)
    Console().print(f"top-k router temperature fitted on val: {temperature_text(rep['temperature'])}", highlight=False)
    if rep.get("skipped_experts"):
        Console().print(f"WARNING: expert(s) {rep['skipped_experts']} skipped; ensembles renormalised over the "
                        "remaining experts")
