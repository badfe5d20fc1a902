"""`dfm run --seeds N`: the whole job per seed into sub-runs and one summary (experiments.engine.seeds)."""
import json

import pytest

from experiments.cli import main
from experiments.engine.config import ConfigError
from experiments.engine.seeds import summarize
from experiments.registry import load_job

SHORT = ["base.steps=8", "stage2.steps=4", "base.checkpoint_every=8", "stage2.checkpoint_every=4",
         "eval.num_samples=0", "eval.bootstrap_resamples=300"]


def _report(seed, dense, bayes, ci):
    return {"config": {"name": "t", "eval": {"parity_margin": 0.02}}, "schedule": "ar", "metric": "nll",
            "comparison": {"parity_margin": 0.02},
            "systems": [{"name": "dense", "loss": dense, "delta_vs_dense": {"mean": 0.0, "ci95": [0.0, 0.0]}},
                        {"name": "ensemble/bayes", "loss": bayes,
                         "delta_vs_dense": {"mean": bayes - dense, "ci95": ci, "verdict": "x"}}],
            "s11": {"dense_minus_oracle_gap": -0.05, "entropy_bound": {"nats_per_token": 0.01}}}


def test_summary_mean_sd_and_t_interval(tmp_path):
    reports = {0: _report(0, 5.0, 5.05, [0.03, 0.07]), 1: _report(1, 5.1, 5.13, [0.01, 0.05]),
               2: _report(2, 5.2, 5.24, [0.02, 0.06])}
    summary = summarize(tmp_path, reports)
    bayes = summary["systems"][1]
    assert bayes["loss"]["mean"] == pytest.approx(5.14)
    d = bayes["delta_vs_dense"]
    assert d["mean"] == pytest.approx(0.04) and d["std"] == pytest.approx(0.01)
    assert d["ci95"][0] == pytest.approx(0.04 - 4.302653 * 0.01 / 3 ** 0.5, abs=1e-5)
    assert d["seeds"] == [0, 1, 2] and [p["ci95"] for p in d["per_seed"]] == [[0.03, 0.07], [0.01, 0.05],
                                                                              [0.02, 0.06]]
    assert d["verdict"] == "inconclusive"            # the t-interval over 3 seeds reaches below the margin
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [0, 1, 2]
    assert "± 0.0100" in (tmp_path / "summary.md").read_text()
    one = summarize(tmp_path / "one", {3: reports[0]})
    assert one["systems"][1]["delta_vs_dense"]["ci95"] == [0.03, 0.07]
    assert one["systems"][1]["delta_vs_dense"]["verdict"] == "worse"


def _mllm_report(dense, top1, ci):
    """A multimodal report: exact match (higher is better), the metric named in "comparison"."""
    return {"config": {"name": "m", "eval": {"parity_margin": 0.01}}, "metric": "exact_match",
            "comparison": {"metric_key": "exact_match", "higher_is_better": True, "parity_margin": 0.01,
                           "unit": "exact match (fraction; 0.01 = 1 point)", "bootstrap_units": "test images"},
            "systems": [{"name": "dense", "exact_match": dense, "delta_vs_dense": {"mean": 0.0, "ci95": [0.0, 0.0]}},
                        {"name": "ensemble/centroid-top1", "exact_match": top1,
                         "delta_vs_dense": {"mean": top1 - dense, "ci95": ci, "verdict": "x"}}]}


def test_summary_of_a_higher_is_better_metric(tmp_path):
    """Exact match: the per-system metric is read from "exact_match", a positive Δ whose t-interval
    over seeds lies above 0 is 'better', and the summary names the metric and its unit."""
    reports = {0: _mllm_report(0.50, 0.53, [0.01, 0.05]), 1: _mllm_report(0.52, 0.56, [0.02, 0.06]),
               2: _mllm_report(0.51, 0.56, [0.03, 0.07])}
    summary = summarize(tmp_path, reports)
    assert summary["metric_key"] == "exact_match" and summary["higher_is_better"] is True
    top1 = summary["systems"][1]
    assert top1["exact_match"]["mean"] == pytest.approx(0.55) and "loss" not in top1
    d = top1["delta_vs_dense"]
    assert d["mean"] == pytest.approx(0.04) and d["std"] == pytest.approx(0.01)
    half = 4.302653 * 0.01 / 3 ** 0.5                      # t(0.975, 2) sd / sqrt(3)
    assert d["ci95"] == pytest.approx([0.04 - half, 0.04 + half], abs=1e-5)
    assert d["ci95"][0] > 0 and d["verdict"] == "better"
    assert summary["systems"][0]["delta_vs_dense"]["verdict"] == "reference"
    md = (tmp_path / "summary.md").read_text()
    assert "exact_match mean ± sd" in md and "positive: better than dense" in md and "schedule" not in md
    worse = summarize(tmp_path / "w", {0: _mllm_report(0.5, 0.4, [-0.14, -0.06])})
    assert worse["systems"][1]["delta_vs_dense"]["verdict"] == "worse"        # one seed: its bootstrap interval


def test_seeds_config_key():
    _, config = load_job("tiny", None, ["seeds=[0, 2]"])
    assert config.seeds == (0, 2)
    assert "seeds = [0, 2]" in config.to_toml()
    with pytest.raises(ConfigError, match="seeds"):
        load_job("tiny", None, ["seeds=[1, 1]"])


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--config", "tiny", "--seeds", "0"])


@pytest.mark.slow
def test_run_seeds_writes_sub_runs_and_a_summary(tmp_path):
    out = tmp_path / "seeds"
    assert main(["run", "--config", "tiny", "--seeds", "2", "--out", str(out), "--quiet", *SHORT]) == 0
    for s in (0, 1):
        resolved = (out / f"seed-{s}" / "resolved.toml").read_text()
        assert f"seed = {s}" in resolved
        rep = json.loads((out / f"seed-{s}" / "report.json").read_text())
        assert rep["config"]["seed"] == s and rep["config"]["partition"]["seed"] == s
        for system in rep["systems"]:
            d = system["delta_vs_dense"]
            assert d["seeds"] == [s] and d["std"] is None and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        assert "Δ vs dense ± sd [95% CI]" in (out / f"seed-{s}" / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    names = [s["name"] for s in rep["systems"]]
    assert [s["name"] for s in summary["systems"]] == names
    for system in summary["systems"]:
        d = system["delta_vs_dense"]
        assert {"mean", "std", "ci95", "seeds", "per_seed", "verdict"} <= set(d)
        assert d["std"] is not None and len(d["ci95"]) == 2 and len(d["per_seed"]) == 2
        assert system["loss"]["std"] is not None
    before = (out / "seed-0" / "stages" / "dense.json").stat().st_mtime
    assert main(["run", "--config", "tiny", "--seeds", "2", "--out", str(out), "--quiet", *SHORT]) == 0
    assert (out / "seed-0" / "stages" / "dense.json").stat().st_mtime == before     # resumed: nothing re-run
