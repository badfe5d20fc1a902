"""End-to-end main job on the tiny config: report structure and sanity, idempotence, resume."""
import dataclasses
import json
import math
import shutil
import tomllib

import numpy as np
import pytest

from dfm.cli import main
from experiments import scoring, stages
from experiments.config import from_dict, load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The data stage of the tiny config, built once and copied into each run directory."""
    root = tmp_path_factory.mktemp("data_source")
    ctx = stages.open_context(load_config("tiny"), root / "run", progress=False, log=lambda *a: None)
    stages.data_summary(ctx)
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


def test_report_structure_and_sane_values(ar_run):
    rep = json.loads((ar_run / "report.json").read_text())
    config = load_config("tiny")
    k = config.partition.num_clusters
    names = [s["name"] for s in rep["systems"]]
    assert names == ["dense", "base", "ensemble/bayes", "ensemble/centroid-top1", "ensemble/centroid-top2",
                     "ensemble/oracle", "random-ensemble/bayes"]
    tokens = {s["tokens"] for s in rep["systems"]}
    assert tokens == {rep["eval"]["scored_tokens"]} and rep["eval"]["scored_tokens"] > 0
    assert rep["eval"]["scored_tokens"] == rep["eval"]["scored_sequences"] * config.data.seq_len
    for s in rep["systems"]:
        assert math.isfinite(s["loss"]) and 0 < s["loss"] < math.log(config.data.vocab_size) + 1
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]))
        assert s["train_wall_time_s"] > 0 and s["eval_wall_time_s"] >= 0
    # training lowered the loss below the uniform distribution's
    dense = rep["systems"][0]
    assert dense["loss"] < math.log(config.data.vocab_size) - 0.3
    # S11: difference = dense - weighted expert loss; the weighted expert loss is the oracle's loss
    s11 = rep["s11"]
    assert s11["mutual_information"] == pytest.approx(s11["dense_loss"] - s11["weighted_expert_loss"], abs=1e-12)
    assert s11["dense_loss"] == pytest.approx(dense["loss"], rel=1e-9)
    oracle = next(s for s in rep["systems"] if s["name"] == "ensemble/oracle")
    assert s11["weighted_expert_loss"] == pytest.approx(oracle["loss"], rel=1e-6)
    assert sum(s11["cluster_weights"]) == pytest.approx(1.0)
    assert sum(c["tokens"] for c in rep["clusters"]) == rep["eval"]["scored_tokens"]
    # router weights: K x K, rows (clusters with test documents) sum to 1
    for name, rows in rep["router_weights_by_true_cluster"].items():
        assert len(rows) == k
        for row in rows:
            if row is not None:
                assert len(row) == k and sum(row) == pytest.approx(1.0, abs=1e-5) and min(row) >= 0
    assert all(r is not None for r in rep["router_weights_by_true_cluster"]["oracle"])  # both clusters evaluated
    # compute matching
    comp = rep["compute"]
    assert comp["dense_stage2_tokens"] == comp["experts_stage2_tokens"] > 0
    assert sum(comp["expert_steps"].values()) == config.stage2.steps
    # samples decoded to text, fixed count
    assert len(rep["samples"]["dense"]) == len(rep["samples"]["ensemble"]) == config.eval.num_samples
    assert all(isinstance(t, str) and t for t in rep["samples"]["dense"])
    # data sizes
    for split in ("train", "val", "test"):
        assert rep["data"]["documents"][split] > 0 and rep["data"]["tokens"][split] > 0


def test_run_dir_artifacts(ar_run):
    for rel in ("report.md", "resolved.toml", "plots/loss_curves.png", "plots/router_weights.png",
                "plots/cluster_sizes.png", "partition/partition.npz", "models/dense", "models/expert-0",
                "checkpoints/base", "tokenizer/tokenizer.json"):
        assert (ar_run / rel).exists(), rel
    assert (ar_run / "plots/loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = from_dict(tomllib.loads((ar_run / "resolved.toml").read_text()), name="tiny")
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


def test_bayes_filter_matches_sequence_mixture():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(5), size=(3, 12))[..., 0])  # [K=3, T=12] token log-probs
    priors = np.array([0.5, 0.3, 0.2])
    mix, rho = scoring.bayes_filter_doc(lp, priors)
    # telescoping: sum of online mixture log-probs = log sum_k w_k prod_t p_k (THEORY S9)
    total = np.log(np.sum(priors * np.exp(lp.sum(axis=1))))
    assert mix.sum() == pytest.approx(total, abs=1e-5)
    np.testing.assert_allclose(rho.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(rho[0], priors, atol=1e-6)


def _params(run_dir):
    ctx = stages.open_context(load_config("tiny"), run_dir, progress=False, log=lambda *a: None)
    from flax import nnx

    model = stages.load_stage_model(ctx, "base")
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
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    hist_a = json.loads((interrupted / "stages" / "base.json").read_text())["history"]
    hist_b = json.loads((straight / "stages" / "base.json").read_text())["history"]
    assert hist_a == hist_b


def test_masked_schedule_end_to_end(data_dir, tmp_path):
    tiny = load_config("tiny")
    config = dataclasses.replace(
        tiny, name="tiny-masked", schedule="masked",
        partition=dataclasses.replace(tiny.partition, random_control=False),
        base=dataclasses.replace(tiny.base, steps=12), stage2=dataclasses.replace(tiny.stage2, steps=8))
    out = tmp_path / "masked"
    _seed_data(data_dir, out)
    ctx = stages.open_context(config, out, progress=False, log=lambda *a: None)
    rep = stages.run_all(ctx)
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
