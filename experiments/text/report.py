"""The run's report: report.json (everything), report.md (a paper-style table + samples), plots,
scores.npz (the scored test sequences and every system's per-sequence loss, so anyone can
recompute), and a short summary table printed with rich.

scores.npz: ``x1 [n, L]`` every chunk of the evaluated test documents, ``doc [n]`` its document,
``context [n]`` True for the context chunk (not scored), ``labels [D]`` each document's true
cluster, ``priors`` / ``random_priors [K]``, ``nll/<system> [n_scored]`` nats per scored sequence
(in the order of ``x1[~context]``), ``weights/<router> [D, K]`` per-document router weights (the
Bayes filter's: averaged over the document's scored tokens), and the per-document scores the
intervals are computed from: ``doc_tokens [D]`` scored tokens of each document and
``doc_nll/<system> [D]`` each system's NLL sum (nats) over them.

Comparison with dense (`dense_comparison`): every system gets ``delta_vs_dense = {"mean", "std",
"ci95", "seeds", "verdict", "margin"}``: the difference of its loss and dense's (nats/token), the
paired bootstrap 95% interval over test documents (`experiments.engine.intervals`) and the parity
verdict from that interval and ``eval.parity_margin``; ``std`` is null for one seed (a multi-seed
run's summary.json has the spread over seeds, `experiments.engine.seeds`).
"""
from __future__ import annotations

import math

import numpy as np
from rich.console import Console
from rich.table import Table

from dfm.decentral.temperature import temperature_note
from dfm.models.flops import COUNTED, SOURCE, experts_evaluated, flops_per_token
from experiments.engine.intervals import (
    VERDICT_RULE,
    paired_bootstrap,
    per_unit_sums,
    verdict,
)
from experiments.engine.plots import loss_curves
from experiments.engine.rundir import (
    atomic_save_npz,
    atomic_write_json,
    atomic_write_text,
)
from experiments.engine.rundir import RunDir
from experiments.text import plots
from experiments.text.config import STAGE1, ExperimentConfig
from experiments.text.modeling import decoder_config, router_config

TOKEN_COUNTING = (
    "Training tokens = optimizer steps x batch_size x seq_len (every position of a sequence is a "
    "target of the loss; the BOS the causal model reads is not counted). Stage 2 is "
    "compute-matched: the dense model runs stage2.steps steps; the K experts split the same "
    "number of steps (proportionally to their clusters' sequence counts) at the same batch size "
    "and sequence length, so both see the same number of training tokens.")


def dense_comparison(results: dict, seq_len: int, seed: int, margin: float, resamples: int) -> None:
    """Add ``delta_vs_dense`` to every system of `results` (in place) and the per-document scores
    ``doc_tokens`` / ``doc_nll/<system>`` to its arrays (see the module docstring)."""
    arrays = results["arrays"]
    scored = ~np.asarray(arrays["context"], bool)
    doc = np.asarray(arrays["doc"], np.int64)[scored]
    num_docs = len(arrays["labels"])
    tokens = per_unit_sums(np.full(len(doc), float(seq_len)), doc, num_docs)
    arrays["doc_tokens"] = tokens
    per_doc = {}
    for system in results["systems"]:
        per_doc[system["name"]] = per_unit_sums(arrays[f"nll/{system['name']}"], doc, num_docs)
        arrays[f"doc_nll/{system['name']}"] = per_doc[system["name"]]
    dense = per_doc["dense"]
    for system in results["systems"]:
        boot = paired_bootstrap(per_doc[system["name"]], dense, tokens, resamples=resamples, seed=seed)
        lo, hi = boot["ci95"]
        system["delta_vs_dense"] = {
            "mean": boot["mean"], "std": None, "ci95": [lo, hi], "seeds": [seed],
            "verdict": "reference" if system["name"] == "dense" else verdict(lo, hi, margin),
            "margin": margin, "resamples": resamples, "documents": num_docs}


def flops_entry(config, vocab: int, systems: list[dict], num_experts: int, num_random: int,
                stage_tokens: dict[str, int]) -> dict:
    """FLOPs of the run (`dfm.models.flops`; what is counted: `dfm.models.flops.COUNTED`): adds to every
    system of `systems` (in place) ``experts_evaluated`` (models run per token: 1 for dense, base,
    centroid top-1 and the oracle, k for top-k, K for the Bayes filter and the random control) and
    ``inference_flops_per_token`` (that many forward passes of one model, plus the learned router's
    trunk for ``ensemble/learned``), and returns the report's ``compute["flops"]``: the per-model
    counts and the training FLOPs (tokens x 3 x forward) of each entry of `stage_tokens`."""
    seq_len = config.data.seq_len
    model = flops_per_token(decoder_config(config, vocab), seq_len)
    router = None
    for system in systems:
        k = num_random if system["name"].startswith("random-") else num_experts
        m = experts_evaluated(system["name"], max(1, k), config.eval.top_k)
        system["experts_evaluated"] = m
        system["inference_flops_per_token"] = m * model.forward
        if system["name"] == "ensemble/learned":    # its trunk runs on every token too (no vocab logits)
            router = flops_per_token(router_config(config, vocab), seq_len)
            system["inference_flops_per_token"] += router.forward - router.logits
    return {"counted": COUNTED, "source": SOURCE, "per_model": model.to_dict(),
            "learned_router_per_token": None if router is None else router.forward - router.logits,
            "training_flops": {name: tokens * model.training for name, tokens in stage_tokens.items()}}


def build_report(config: ExperimentConfig, run: RunDir, results: dict, stage_names: list[str]) -> dict:
    """Assemble report.json's contents from the evaluation results and the markers of the run's
    training stages `stage_names`."""
    c = config
    if "arrays" in results and not all("delta_vs_dense" in s for s in results["systems"]):
        dense_comparison(results, c.data.seq_len, c.seed, c.eval.parity_margin, c.eval.bootstrap_resamples)
    stages = {s: run.stage_info(s) for s in stage_names}
    experts = [s for s in stages if s.startswith("expert-")]
    randoms = [s for s in stages if s.startswith("random-")]
    compute = {
        "token_counting": TOKEN_COUNTING,
        "base_tokens": stages["base"]["train_tokens"],
        "dense_stage2_tokens": stages["dense"]["train_tokens"],
        "experts_stage2_tokens": sum(stages[e]["train_tokens"] for e in experts),
        "expert_steps": {e: stages[e]["steps"] for e in experts},
        "random_expert_steps": {e: stages[e]["steps"] for e in randoms},
    }
    compute["flops"] = flops_entry(c, results["data"]["vocab_size"], results["systems"], len(experts), len(randoms),
                                   {"base": compute["base_tokens"], "dense_stage2": compute["dense_stage2_tokens"],
                                    "experts_stage2": compute["experts_stage2_tokens"]})
    partition = run.stage_info("partition")
    return {
        "config": c.to_dict(),
        "schedule": results["schedule"],
        "metric": results["metric"],
        "perplexity_is_upper_bound": results["perplexity_is_upper_bound"],
        "data": results["data"],
        "partition": {k: v for k, v in partition.items() if k != "stage"},
        "compute": compute,
        "stages": {s: {k: v for k, v in info.items() if k not in ("history", "stage")} for s, info in stages.items()},
        "eval": results["eval"],
        "systems": results["systems"],
        "comparison": {"statistic": "system - dense, nats per scored token; 95% paired percentile bootstrap over "
                                    f"the {results['eval']['documents']} test documents "
                                    f"({c.eval.bootstrap_resamples} resamples, seed {c.seed})",
                       "parity_margin": c.eval.parity_margin, "verdict_rule": VERDICT_RULE},
        "clusters": results["clusters"],
        "s11": results["s11"],
        "router_weights_by_true_cluster": results["router_weights_by_true_cluster"],
        "samples": results["samples"],
        "masked_context_use": results.get("masked_context_use"),
        "wall_time_s": {"training": sum(i["wall_time_s"] for i in stages.values()),
                        "partition": partition["wall_time_s"], "evaluation": results["eval"]["wall_time_s"]},
        "plots": ["plots/loss_curves.png", "plots/router_weights.png", "plots/cluster_sizes.png"],
    }


def _fmt(x, digits=4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown(rep: dict) -> str:
    """report.md text."""
    c, d = rep["config"], rep["data"]
    masked = rep["schedule"] == "masked"
    metric = "DFM loss (ELBO, nats/token)" if masked else "NLL (nats/token)"
    dense = next(s for s in rep["systems"] if s["name"] == "dense")
    src, tk = d.get("corpus") or {"source": "stdlib"}, d.get("tokenizer") or {"kind": "bpe"}
    what = {"stdlib": f"Python {d['python']} standard-library documentation (pydoc topics + module docstrings)",
            "stdlib+python": f"Python {d['python']} standard-library documentation and module source code",
            }.get(src.get("kind", src.get("source", "stdlib")), f"`{src.get('path', src.get('source'))}`")
    tok = "byte-level BPE" if tk.get("kind") == "bpe" else f"tokenizer of `{tk.get('init_from')}`"
    lines = [
        f"# Dense vs decentralized experts: `{c['name']}` ({rep['schedule']} schedule)",
        "",
        f"Corpus: {what}, "
        f"fingerprint `{d['fingerprint']}`. Documents train/val/test: "
        f"{d['documents']['train']}/{d['documents']['val']}/{d['documents']['test']}; tokens "
        f"{d['tokens']['train']:,}/{d['tokens']['val']:,}/{d['tokens']['test']:,} ({tok}, vocab {d['vocab_size']}).",
        f"K = {c['partition']['num_clusters']} experts; held-out: {rep['eval']['documents']} test documents, "
        f"{rep['eval']['scored_tokens']:,} scored tokens (first chunk of each document is context only).",
        "",
    ]
    skipped = rep["eval"].get("skipped_experts") or []
    if skipped:
        lines += [f"**WARNING: expert(s) {skipped} were skipped (lost); every ensemble routes among the remaining "
                  "experts (renormalised routers) and the oracle is not reported.**", ""]
    if masked:
        lines += ["**Masked schedule: the loss is the DFM loss, an ELBO (THEORY S5(e)); its perplexity is an "
                  "UPPER BOUND on the sampler's perplexity, not an exact perplexity.**", ""]
    comparison = rep.get("comparison")
    lines += [f"| system | router | tokens | {metric} | perplexity{' (bound)' if masked else ''} | "
              f"Δ vs dense ± sd [95% CI] | vs dense | inference MFLOPs/token (models run) | "
              f"train s (incl. base) | eval s |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for s in rep["systems"]:
        lines.append(f"| {s['name']} | {s['router'] or '-'} | {s['tokens']:,} | {_fmt(s['loss'])} | "
                     f"{_fmt(s['perplexity'], 2)} | {delta_text(s, dense)} | "
                     f"{(s.get('delta_vs_dense') or {}).get('verdict', '-')} | {flops_text(s)} | "
                     f"{s['train_wall_time_s']:.1f} | {s['eval_wall_time_s']:.1f} |")
    lines += ["", "Δ = system - dense (nats/token; negative: better than dense); ± sd over seeds (- for one seed); "
                  + (f"[CI]: {comparison['statistic']}. Verdict {comparison['verdict_rule']} "
                     f"Margin m = {comparison['parity_margin']} nats/token. " if comparison else "")
                  + "train s: training wall time of every stage the system uses, INCLUDING the shared base "
                    "(stage 1) for every system but base itself. Inference MFLOPs/token: "
                    + (rep["compute"].get("flops") or {}).get("counted", "-") + "."]
    lines += ["", temperature_line(rep)]
    s11 = rep["s11"]
    gap = s11.get("dense_minus_oracle_gap", s11.get("dense_minus_weighted_expert_loss"))
    bound = s11.get("entropy_bound") or {}
    lines += ["", "## THEORY S11 terms (nats per scored token)", "",
              f"- dense loss: {_fmt(s11['dense_loss'])}",
              f"- sum_k w_k (expert k's loss on its own cluster) = oracle ensemble loss: "
              f"{_fmt(s11['weighted_expert_loss'])} "
              f"(w = {', '.join(f'{w:.3f}' for w in s11['cluster_weights'])})",
              f"- dense - oracle gap: {_fmt(gap)} (estimates I(X; K) only when all models are well trained; "
              "at the optimum it is I(X; K) >= 0, THEORY S11; a negative gap means the models are not there)",
              f"- plug-in upper bound I(X; K) <= H(K) of the partition: {_fmt(bound.get('nats_per_token'))} "
              f"nats/token (H(K) = {_fmt(bound.get('nats_per_sequence'))} nats per scored sequence, each "
              "sequence an independent model input; cluster shares of the evaluated test documents). An upper "
              "bound, not an estimate: a gap above it means the models are not at the optimum either",
              "", "| cluster | test documents | scored tokens | expert k on cluster k: loss (ppl) | "
                  "dense on the same tokens: loss (ppl) |",
              "|---:|---:|---:|---:|---:|"]
    for cl in rep["clusters"]:
        lines.append(f"| {cl['cluster']} | {cl['documents']} | {cl['tokens']:,} | "
                     f"{_fmt(cl['expert_loss'])} ({_fmt(cl.get('expert_perplexity'), 2)}) | "
                     f"{_fmt(cl['dense_loss'])} ({_fmt(cl.get('dense_perplexity'), 2)}) |")
    names = list(rep["clusters"][0].get("systems") or {}) if rep["clusters"] else []
    if names:
        lines += ["", "Every system on each true cluster's scored test tokens (nats/token; the evaluated test "
                      "documents, as in the table above and plots/cluster_sizes.png):", "",
                  "| cluster | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for cl in rep["clusters"]:
            lines.append(f"| {cl['cluster']} | " + " | ".join(_fmt(cl["systems"].get(n)) for n in names) + " |")
    cu = rep.get("masked_context_use")
    if cu:
        lines += ["", "Context use of the dense denoiser (cross-entropy on masked positions, nats): "
                  f"all masked {cu['all_masked']:.4f}, half masked {cu['half_masked']:.4f}, "
                  f"10% masked {cu['tenth_masked']:.4f}. Equal values mean the denoiser does not yet use "
                  "context (it predicts the unigram distribution)."]
    comp = rep["compute"]
    lines += ["", "## Compute", "", comp["token_counting"], "",
              f"- base: {comp['base_tokens']:,} tokens; dense stage 2: {comp['dense_stage2_tokens']:,}; "
              f"experts stage 2 (sum): {comp['experts_stage2_tokens']:,}",
              f"- expert steps: {comp['expert_steps']}",
              *flops_lines(comp.get("flops")),
              f"- wall time: training {rep['wall_time_s']['training']:.1f} s, evaluation "
              f"{rep['wall_time_s']['evaluation']:.1f} s", ""]
    lines += selection_lines(rep["stages"])
    lines += ["## Router weights by true cluster", "",
              "Mean weight (columns: experts) over test documents of each true cluster (rows).", ""]
    for name, rows in rep["router_weights_by_true_cluster"].items():
        lines.append(f"- {name}: " + "; ".join(
            "-" if r is None else "[" + ", ".join(f"{v:.2f}" for v in r) + "]" for r in rows))
    samples = rep["samples"]
    if samples.get("dense"):
        lines += ["", f"## Samples (seed {samples['seed']}, temperature {samples['temperature']}; "
                      f"ensemble router: {samples['router']})", ""]
        for label in ("dense", "ensemble"):
            for i, text in enumerate(samples[label]):
                lines += [f"**{label} {i}**", "", "```text", text.replace("```", "'''"), "```", ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in rep["plots"]]
    return "\n".join(lines) + "\n"


def flops_text(system: dict) -> str:
    """``1.25 (1)``: a system's inference MFLOPs per token and the models it runs (- when absent)."""
    f = system.get("inference_flops_per_token")
    return "-" if f is None else f"{f / 1e6:.3g} ({system.get('experts_evaluated', '?')})"


def flops_lines(flops: dict | None) -> list[str]:
    """The Compute section's FLOPs lines (markdown list items; [] for a report without them)."""
    if not flops:
        return []
    m, t = flops["per_model"], flops["training_flops"]
    return [f"- one model: {m['params']['total']:,} parameters ({m['params']['non_embedding']:,} non-embedding); "
            f"forward {m['forward'] / 1e6:.4g} MFLOPs/token (2N {m['non_embedding']:,} + logits {m['logits']:,} + "
            f"attention {m['attention']:,} over {m['context']} keys), training {m['training'] / 1e6:.4g} MFLOPs/token",
            "- training FLOPs (tokens x 3 x forward): " + "; ".join(f"{k} {v:.3e}" for k, v in t.items())
            + " (dense and the experts together: equal tokens, equal FLOPs)"]


def temperature_line(rep: dict) -> str:
    """The fitted temperature of the top-k centroid router, and whether the fit sits at a search bound
    (`dfm.decentral.temperature.temperature_note`: no interior maximum, the limit it stands for)."""
    ev = rep["eval"]
    t = ev.get("centroid_topk_temperature")
    if t is None:
        return "Top-k centroid router temperature: not fitted."
    note = temperature_note(t)
    return (f"Top-{ev.get('top_k')} centroid router temperature fitted on val: T = {t:.4g}"
            + (f", {note}." if note else " (an interior maximum of the val mixture likelihood)."))


def selection_lines(stages: dict) -> list[str]:
    """The "Model selection" section: per training stage the step kept and its validation loss
    (markdown lines; [] when no stage validated)."""
    rows = [(name, info) for name, info in stages.items() if info.get("best_step") is not None]
    if not rows:
        return []
    lines = ["## Model selection (validation only)", "",
             "Each model is selected on its own validation documents (stage 1, dense and the random control: "
             "all of them; expert k: those of cluster k), never on test. Compute is counted for every step "
             "trained, whichever step is kept.", "",
             "| stage | steps trained | step kept | validation loss at kept step | validation loss at last step |",
             "|---|---:|---:|---:|---:|"]
    for name, info in rows:
        last = (info.get("validation") or [{}])[-1].get("val_loss")
        best = info.get("kept") == "best"
        kept, kept_loss = (info["best_step"], info["best_val_loss"]) if best else (info["steps"], last)
        lines.append(f"| {name} | {info['steps']} | {kept} | {_fmt(kept_loss)} | {_fmt(last)} |")
    return lines + [""]


def delta_text(system: dict, dense: dict) -> str:
    """``+0.0490 ± 0.0100 [+0.0240, +0.0730]`` (± - for one seed; the plain difference without intervals)."""
    d = system.get("delta_vs_dense")
    if not d:
        return f"{system['loss'] - dense['loss']:+.4f}"
    sd = "-" if d.get("std") is None else f"{d['std']:.4f}"
    ci = d.get("ci95")
    return f"{d['mean']:+.4f} ± {sd}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def write_report(config: ExperimentConfig, run: RunDir, results: dict, stage_names: list[str]) -> dict:
    """Write plots, report.json and report.md (atomically); returns the report dict."""
    rep = build_report(config, run, results, stage_names)
    stages = {s: run.stage_info(s) for s in stage_names}
    loss_curves(stages, run.plots / "loss_curves.png",
                f"{config.name}: training loss (lines), validation loss (dots; star: the kept step)", first=STAGE1)
    plots.router_heatmaps(rep["router_weights_by_true_cluster"], run.plots / "router_weights.png")
    plots.cluster_sizes(rep["partition"], run.plots / "cluster_sizes.png",
                        evaluated=[cl["documents"] for cl in rep["clusters"]])
    atomic_save_npz(run.root / "scores.npz", **results["arrays"])
    atomic_write_json(run.report_json, rep)
    atomic_write_text(run.report_md, markdown(rep))
    return rep


def print_summary(rep: dict) -> None:
    """A short rich table of the systems (loss, perplexity, Δ vs dense) and the S11 terms."""
    masked = rep["schedule"] == "masked"
    table = Table(title=f"{rep['config']['name']} ({rep['schedule']}): {rep['eval']['scored_tokens']:,} held-out tokens"
                        + (" - ELBO, perplexity is an upper bound" if masked else ""))
    for col in ("system", "loss", "ppl", "Δ vs dense ± sd [95% CI]", "verdict", "MFLOPs/token (models)"):
        table.add_column(col, justify="left" if col in ("system", "verdict") else "right")
    dense_system = next(s for s in rep["systems"] if s["name"] == "dense")
    for s in rep["systems"]:
        table.add_row(s["name"], _fmt(s["loss"]), _fmt(s["perplexity"], 2), delta_text(s, dense_system),
                      (s.get("delta_vs_dense") or {}).get("verdict", "-"), flops_text(s))
    console = Console()
    console.print(table)
    if rep["eval"].get("skipped_experts"):
        console.print(f"WARNING: expert(s) {rep['eval']['skipped_experts']} skipped; ensembles renormalised over "
                      "the remaining experts")
    console.print(temperature_line(rep), highlight=False)
    s11 = rep["s11"]
    gap = s11.get("dense_minus_oracle_gap", s11.get("dense_minus_weighted_expert_loss"))
    bound = (s11.get("entropy_bound") or {}).get("nats_per_token")
    console.print(f"S11: dense {s11['dense_loss']:.4f} - oracle (experts on own clusters) "
                  f"{s11['weighted_expert_loss']:.4f} = gap {gap:.4f} nats/token (an I(X;K) estimate only for "
                  f"well-trained models); plug-in bound I(X;K) <= H(K) = "
                  f"{'-' if bound is None else f'{bound:.4f}'} nats/token")
