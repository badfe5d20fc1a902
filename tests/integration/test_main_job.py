"""End-to-end text job on the tiny config: every reported loss recomputed independently from the
saved models, idempotence, resume, the masked schedule."""
import dataclasses
import json
import math
import shutil
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from tiny_models import assert_same_run, same_numbers

from experiments.cli import main
from experiments.engine import graph, pipeline, training
from experiments.text.config import ExperimentConfig, load_config
from experiments.text.task import TextTask

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TASK = TextTask()


QUIET = graph.RunOptions(progress=False, log=lambda *a: None)


def _open(config, out):
    """`config`'s run directory `out` and its data (the data stage when not yet done)."""
    run = pipeline.open_run(config, out)
    return run, TASK.prepare_data(config, run, log=QUIET.log)


def _model(config, run, data, stage):
    return training.load_stage_model(run, stage, lambda: TASK.new_model(config, data))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The data stage of the tiny config, built once and copied into each run directory."""
    root = tmp_path_factory.mktemp("data_source")
    _open(load_config("tiny"), root / "run")
    return root / "run"


def _seed_data(source, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("data", "tokenizer"):
        shutil.copytree(source / name, dest / name)


@pytest.fixture(scope="module")
def ar_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ar") / "run"
    _seed_data(data_dir, out)
    assert main(["run", "--config", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


def _token_log_probs(model, x1, bos_id):
    """Reference ``log p(x^j | x^{<j})`` ``[n, L]`` float64: one causal pass, numpy log-softmax."""
    inputs = np.concatenate([np.full((len(x1), 1), bos_id), x1[:, :-1]], axis=1)
    logits = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(inputs)), np.float64)
    logp = logits - logsumexp(logits, axis=-1, keepdims=True)
    return np.take_along_axis(logp, x1[..., None], axis=-1)[..., 0]


def test_every_reported_loss_recomputes_from_the_saved_models(ar_run):
    """dense and oracle from the models' own log-probs; the Bayes-filter ensemble by telescoping,
    per document `log sum_k w_k q_k(context) - log sum_k w_k q_k(context + scored)` (THEORY S9),
    independent of the online filter; centroid ensembles from their stored weights (THEORY S8)."""
    rep = json.loads((ar_run / "report.json").read_text())
    scores = np.load(ar_run / "scores.npz")
    config = load_config("tiny")
    run, data = _open(config, ar_run)
    x1, doc, context, labels = scores["x1"], scores["doc"], scores["context"], scores["labels"]
    scored = ~context
    k, n_tokens = config.partition.num_clusters, int(scored.sum()) * config.data.seq_len
    assert n_tokens == rep["eval"]["scored_tokens"] > 0
    lp = {name: _token_log_probs(_model(config, run, data, name), x1, data.bos_id)
          for name in ["dense", "base", *(f"expert-{i}" for i in range(k)), *(f"random-{i}" for i in range(k))]}
    by = {s["name"]: s for s in rep["systems"]}
    assert list(by) == ["dense", "base", "ensemble/bayes", "ensemble/centroid-top1", "ensemble/centroid-top2",
                        "ensemble/oracle", "random-ensemble/bayes"]

    def check(name, nll_seq):
        np.testing.assert_allclose(scores[f"nll/{name}"], nll_seq, rtol=2e-5, atol=1e-4, err_msg=name)
        assert by[name]["loss"] == pytest.approx(nll_seq.sum() / n_tokens, rel=2e-6), name
        assert by[name]["perplexity"] == pytest.approx(math.exp(by[name]["loss"]), rel=1e-12)
        assert by[name]["tokens"] == n_tokens

    for name in ("dense", "base"):
        check(name, -lp[name][scored].sum(axis=1))
    own = -np.stack([lp[f"expert-{i}"] for i in range(k)])[labels[doc][scored], np.flatnonzero(scored)].sum(axis=1)
    check("ensemble/oracle", own)
    for router in ("centroid-top1", "centroid-top2"):
        w = scores[f"weights/{router}"][doc[scored]]                                   # [n_scored, K]
        lp_e = np.stack([lp[f"expert-{i}"][scored] for i in range(k)])                 # [K, n_scored, L]
        with np.errstate(divide="ignore"):
            mix = logsumexp(np.log(w).T[:, :, None] + lp_e, axis=0)
        check(f"ensemble/{router}", -mix.sum(axis=1))
    for system, prefix, priors in (("ensemble/bayes", "expert", scores["priors"]),
                                   ("random-ensemble/bayes", "random", scores["random_priors"])):
        seq_ll = np.stack([lp[f"{prefix}-{i}"].sum(axis=1) for i in range(k)], axis=1)   # [n, K]
        total = 0.0
        for d in range(len(labels)):
            ctx_ll = seq_ll[(doc == d) & context].sum(axis=0)
            all_ll = seq_ll[doc == d].sum(axis=0)
            total += logsumexp(np.log(priors) + ctx_ll) - logsumexp(np.log(priors) + all_ll)
        assert by[system]["loss"] == pytest.approx(total / n_tokens, rel=2e-6), system
    # priors are the clusters' shares of the training sequences
    assignments = graph.load_assignments(run, k)
    counts = np.bincount(assignments.units["train"][data.sequences["train"].doc], minlength=k)
    np.testing.assert_allclose(scores["priors"], counts / counts.sum(), rtol=1e-12)
    # S11 terms: the weighted expert loss is the oracle's; the difference is what the report prints
    s11 = rep["s11"]
    assert s11["weighted_expert_loss"] == pytest.approx(own.sum() / n_tokens, rel=2e-6)
    assert s11["dense_loss"] == pytest.approx(by["dense"]["loss"], rel=1e-12)
    # training lowered the dense loss well below the uniform distribution's
    assert by["dense"]["loss"] < math.log(data.vocab_size) - 0.3
    for name, rows in rep["router_weights_by_true_cluster"].items():
        assert len(rows) == k
        for row in rows:
            if row is not None:
                assert len(row) == k and sum(row) == pytest.approx(1.0, abs=1e-5) and min(row) >= 0
    # compute matching
    comp = rep["compute"]
    assert comp["dense_stage2_tokens"] == comp["experts_stage2_tokens"] == (
        config.stage2.steps * config.stage2.batch_size * config.data.seq_len)
    assert sum(comp["expert_steps"].values()) == config.stage2.steps
    assert len(rep["samples"]["dense"]) == len(rep["samples"]["ensemble"]) == config.eval.num_samples
    assert all(isinstance(t, str) and t for t in rep["samples"]["dense"])


def test_run_dir_artifacts(ar_run):
    for rel in ("report.md", "resolved.toml", "plots/loss_curves.png", "plots/router_weights.png",
                "plots/cluster_sizes.png", "partition/partition.npz", "models/dense", "models/expert-0", "scores.npz",
                "checkpoints/base", "tokenizer/tokenizer.json"):
        assert (ar_run / rel).exists(), rel
    assert (ar_run / "plots/loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = ExperimentConfig.from_dict(tomllib.loads((ar_run / "resolved.toml").read_text()), name="tiny")
    assert resolved == load_config("tiny")
    md = (ar_run / "report.md").read_text()
    assert "| dense |" in md and "S11" in md and "ensemble/bayes" in md
    assert not list(ar_run.rglob("*.tmp")) and not list(ar_run.rglob(".*.tmp"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ar_run / "tokenizer"))
    text = "def partition(x):\n    return sorted(x)"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_rerun_skips_finished_stages(ar_run, capsys):
    before = (ar_run / "report.json").read_bytes()
    assert main(["run", "--config", "tiny", "--out", str(ar_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[base] already finished, skipped" in out and "[evaluate] already finished, skipped" in out
    assert (ar_run / "report.json").read_bytes() == before


def _params(run_dir):
    from flax import nnx

    config = load_config("tiny")
    run, data = _open(config, run_dir)
    model = _model(config, run, data, "base")
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_stopped_stage_resumes_to_identical_parameters(data_dir, tmp_path, capsys):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    for d in (interrupted, straight):
        _seed_data(data_dir, d)
    steps = load_config("tiny").base.steps
    assert main(["train", "--base", "--config", "tiny", "--out", str(interrupted), "--quiet",
                 "--stop-after", str(steps // 3)]) == 0
    assert "stopped at step" in capsys.readouterr().out
    assert not (interrupted / "stages" / "base.json").exists()
    assert main(["train", "--base", "--config", "tiny", "--out", str(interrupted), "--quiet"]) == 0
    assert main(["train", "--base", "--config", "tiny", "--out", str(straight), "--quiet"]) == 0
    a, b = _params(interrupted), _params(straight)
    assert a.keys() == b.keys() and len(a) > 3
    # bit-identical (on a GPU without --xla_gpu_deterministic_ops: to float rounding, tiny_models)
    for key in a:
        assert_same_run(a[key], b[key], err_msg=key)
    hist_a = json.loads((interrupted / "stages" / "base.json").read_text())["history"]
    hist_b = json.loads((straight / "stages" / "base.json").read_text())["history"]
    assert same_numbers(hist_a, hist_b)


def test_masked_schedule_end_to_end(data_dir, tmp_path):
    tiny = load_config("tiny")
    config = dataclasses.replace(
        tiny, name="tiny-masked", schedule="masked",
        partition=dataclasses.replace(tiny.partition, random_control=False),
        base=dataclasses.replace(tiny.base, steps=12), stage2=dataclasses.replace(tiny.stage2, steps=8))
    out = tmp_path / "masked"
    _seed_data(data_dir, out)
    rep = pipeline.run_all(TASK, config, pipeline.open_run(config, out), QUIET)
    assert rep["schedule"] == "masked" and rep["perplexity_is_upper_bound"] is True
    names = [s["name"] for s in rep["systems"]]
    assert "ensemble/learned" in names and "ensemble/bayes" not in names
    assert {s["tokens"] for s in rep["systems"]} == {rep["eval"]["scored_tokens"]}
    assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in rep["systems"])
    for row in rep["router_weights_by_true_cluster"]["learned"]:
        if row is not None:
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
    assert "UPPER BOUND" in (out / "report.md").read_text()
    assert len(rep["samples"]["ensemble"]) == config.eval.num_samples


def test_each_model_is_the_best_on_its_own_validation_documents(ar_run):
    """The engine's selection rule, recomputed from the saved models with an independent NLL: every
    stage's saved model has the validation loss its marker reports as kept, that loss is the lowest of
    its validation curve, and expert k's validation documents are those of cluster k (balanced in
    sequences: `[partition] balance = "examples"`)."""
    from dfm.train import load_model
    from experiments.text.data import load_data
    from experiments.text import modeling

    config = load_config("tiny")
    run = pipeline.open_run(config, ar_run)
    data = load_data(config, run, log=lambda *a: None)
    assignments = graph.load_assignments(run, config.partition.num_clusters)
    val = data.sequences["val"]
    chunks = val.chunk <= config.eval.max_scored_per_doc
    for stage in graph.training_stages(config, TASK.stage1):
        info = run.stage_info(stage)
        curve = [r["val_loss"] for r in info["validation"]]
        assert info["kept"] == "best" and info["best_val_loss"] == min(curve)
        assert info["validation"][curve.index(min(curve))]["step"] == info["best_step"]
        docs = np.flatnonzero(assignments.units["val"] == int(stage[-1])) if stage.startswith("expert-") else None
        rows = chunks & (np.isin(val.doc, docs) if docs is not None else True)
        model = load_model(lambda: modeling.new_model(config, data.vocab_size, config.seed), run.model(stage))
        nll = -_token_log_probs(model, val.tokens[rows], data.bos_id).mean()
        assert nll == pytest.approx(info["best_val_loss"], abs=2e-5), stage
    part = run.stage_info("partition")
    seqs = part["sequences_per_cluster"]
    assert part["balance"] == "examples" and max(seqs) - min(seqs) <= 2 * part["kmeans"]["weight_max"]


def test_per_cluster_table_covers_every_system(ar_run):
    """Each system's per-cluster losses average (token-weighted) to its reported loss; dense's equal the
    S11 column; the clusters' documents are the evaluated ones (the table's count)."""
    rep = json.loads((ar_run / "report.json").read_text())
    tokens = np.array([cl["tokens"] for cl in rep["clusters"]], float)
    assert tokens.sum() == rep["eval"]["scored_tokens"]
    assert sum(cl["documents"] for cl in rep["clusters"]) == rep["eval"]["documents"]
    for s in rep["systems"]:
        per = np.array([cl["systems"][s["name"]] or 0.0 for cl in rep["clusters"]])
        assert (per * tokens).sum() / tokens.sum() == pytest.approx(s["loss"], abs=1e-9), s["name"]
    for cl in rep["clusters"]:
        assert cl["systems"]["dense"] == pytest.approx(cl["dense_loss"], abs=1e-12)
    assert "random-ensemble/bayes" in rep["clusters"][0]["systems"]
    assert "Every system on each true cluster" in (ar_run / "report.md").read_text()
