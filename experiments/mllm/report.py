"""Report of the multimodal job: report.json, report.md (per-task table of every system), plots.

Files in the run directory: ``report.json`` (with, per test question: every system's prediction,
the fixed routers' weights, its cluster and the Bayes filter's weights after the answer) /
``report.md``; ``plots/loss_curves.png``,
``plots/routing.png`` (mean router weight per expert for the test questions of each image source),
``plots/partition.png`` (train conversations per source and cluster), ``plots/examples.png`` (test
images with question, reference and each system's answer).
"""
from __future__ import annotations

import numpy as np

from experiments.engine.plots import loss_curves
from experiments.engine.rundir import atomic_write_json, atomic_write_text
from experiments.engine.stages import Context
from experiments.mllm import plots


def _types(systems: list[dict]) -> list[str]:
    return [t for t in systems[0]["scores"] if t != "all"]


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


def build_report(ctx: Context, results: dict) -> dict:
    systems = results["systems"]
    dense = next(s for s in systems if s["name"] == "dense")
    for s in systems:
        s["delta_exact_match_vs_dense"] = s["scores"]["all"]["exact_match"] - dense["scores"]["all"]["exact_match"]
    sources, routing = routing_by_source(results)
    return {
        "config": ctx.config.to_dict(), "systems": systems, "question_types": _types(systems),
        "num_test_questions": results["num_test_questions"], "num_val_questions": results["num_val_questions"],
        "temperature": results["temperature"], "priors": results["priors"],
        "skipped_experts": results.get("skipped_experts", []),
        "routing_by_source": {"sources": sources, "weights": routing},
        "train_clusters_by_source": results["train_clusters_by_source"],
        "partition": results["partition"], "data": results["data"],
        "stages": {n: {k: v for k, v in info.items() if k != "history"} for n, info in results["stages"].items()},
    }


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(rep: dict) -> str:
    types = rep["question_types"]
    lines = [f"# {rep['config']['name']}: dense vs decentralized LLaVA-style experts", "",
             f"{rep['num_test_questions']} test questions; K = {rep['config']['partition']['num_clusters']} experts "
             f"(spherical balanced k-means on stage-1 image features); top-k temperature fitted on "
             f"{rep['num_val_questions']} val questions: T = {rep['temperature']:.4g}.", "",
             *([f"**WARNING: expert(s) {rep['skipped_experts']} were skipped (lost); every ensemble routes among "
                "the remaining experts (renormalised routers) and the oracle is not reported.**", ""]
               if rep.get("skipped_experts") else []),
             "Exact match (%) per question type, VQA accuracy (%) and answer NLL (nats/token, teacher-forced "
             "reference answer); MME acc / acc+ (%) on the paired yes/no questions.", ""]
    head = ["system", "router"] + [f"EM {t}" for t in types] + ["EM all", "VQA acc", "MME acc", "MME acc+",
                                                                 "answer NLL", "Δ EM vs dense"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in rep["systems"]:
        sc = s["scores"]
        mme = sc.get("mme", {})
        cells = [s["name"], s["router"] or ""] + [_pct(sc[t]["exact_match"]) for t in types] + [
            _pct(sc["all"]["exact_match"]), _pct(sc["all"]["vqa_accuracy"]),
            _pct(mme.get("acc")) if mme else "—", _pct(mme.get("acc_plus")) if mme else "—",
            f"{s['answer_nll']:.4f}", f"{100 * s['delta_exact_match_vs_dense']:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The oracle (the test image's cluster) is the nearest centroid, so it equals centroid top-1 "
              "(THEORY S12). The Bayes filter (S9) starts at the priors w_k and is updated by each answer "
              "token: the experts model the answer given image and question, not the image.", ""]
    part = rep["partition"]
    lines += ["## Partition", "",
              f"Images per cluster {part['images_per_cluster']}, train conversations per cluster "
              f"{part['conversations_per_cluster']}, test images per cluster {part['test_images_per_cluster']}.", ""]
    comp = rep["train_clusters_by_source"]
    if comp:
        lines += ["| source | " + " | ".join(f"cluster {k}" for k in range(len(next(iter(comp.values()))))) + " |",
                  "|---|" + "---|" * len(next(iter(comp.values())))]
        lines += [f"| {src} | " + " | ".join(str(v) for v in counts) + " |" for src, counts in comp.items()]
    lines += ["", "## Routing (mean weight per expert, test questions by image source)", ""]
    r = rep["routing_by_source"]
    for name, rows in r["weights"].items():
        lines.append(f"- **{name}**: " + "; ".join(
            f"{src} [{', '.join(f'{x:.2f}' for x in row)}]" for src, row in zip(r["sources"], rows)))
    lines += ["", "## Stages", "", "| stage | steps | conversations | final loss | seconds |", "|---|---|---|---|---|"]
    for n, info in rep["stages"].items():
        lines.append(f"| {n} | {info['steps']} | {info['train_examples']} | {info['final_loss']:.4f} | "
                     f"{info['wall_time_s']:.1f} |")
    lines += ["", "Plots: `plots/loss_curves.png`, `plots/routing.png`, `plots/partition.png`, "
              "`plots/examples.png`.", "", "## Config", "", "```toml", rep.get("config_toml", "").rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(ctx: Context, results: dict, images_test: np.ndarray) -> dict:
    """Plots, report.json and report.md (each written atomically); returns the report dict."""
    rep = build_report(ctx, results)
    rep["config_toml"] = ctx.config.to_toml()
    run = ctx.run
    loss_curves(results["stages"], run.plots / "loss_curves.png", f"{ctx.config.name}: training loss",
                first="stage1")
    plots.routing_heatmaps(rep["routing_by_source"]["weights"], rep["routing_by_source"]["sources"],
                           run.plots / "routing.png")
    if rep["train_clusters_by_source"]:
        plots.composition(rep["train_clusters_by_source"], run.plots / "partition.png")
    n = min(ctx.config.eval.grid_examples, len(results["test_rows"]))
    if n:
        pick = np.linspace(0, len(results["test_rows"]) - 1, n).round().astype(int)
        rows = [results["test_rows"][i] for i in pick]
        imgs = images_test[[r["image"] for r in rows]]
        shown = {k: [v[i] for i in pick] for k, v in results["predictions"].items()
                 if k in ("dense", "ensemble/centroid-top1", "ensemble/bayes", "random-ensemble/bayes")}
        plots.example_grid(imgs, rows, shown, run.plots / "examples.png")
    per_question = {k: results[k] for k in ("predictions", "test_rows", "weights", "test_clusters",
                                            "bayes_weights_after_answer")}
    atomic_write_json(run.report_json, rep | per_question)
    atomic_write_text(run.report_md, markdown(rep))
    return rep


def print_summary(rep: dict) -> None:
    """Rich table: exact match / VQA accuracy / MME / answer NLL per system."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{rep['config']['name']}: {rep['num_test_questions']} test questions")
    for col in ("system", "EM %", "VQA %", "MME acc+", "answer NLL", "Δ EM vs dense"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for s in rep["systems"]:
        sc = s["scores"]
        mme = sc.get("mme", {})
        table.add_row(s["name"], _pct(sc["all"]["exact_match"]), _pct(sc["all"]["vqa_accuracy"]),
                      _pct(mme.get("acc_plus")) if mme else "—", f"{s['answer_nll']:.4f}",
                      f"{100 * s['delta_exact_match_vs_dense']:+.1f}")
    Console().print(table)
    if rep.get("skipped_experts"):
        Console().print(f"WARNING: expert(s) {rep['skipped_experts']} skipped; ensembles renormalised over the "
                        "remaining experts")
