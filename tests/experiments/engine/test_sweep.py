"""`dfm sweep` (experiments.engine.sweep): cell layout, overrides, stage-1 sharing and the summary
over seeds against an independent Student-t computation."""
import json

import numpy as np
import pytest
from scipy import stats

from experiments.engine import sweep
from experiments.text.config import load_config


def _report(dense: float, bayes: float) -> dict:
    return {"config": {"name": "tiny", "eval": {"parity_margin": 0.02}}, "schedule": "ar",
            "systems": [{"name": "dense", "kind": "dense", "loss": dense},
                        {"name": "ensemble/bayes", "kind": "ensemble", "router": "bayes", "loss": bayes,
                         "delta_vs_dense": {"mean": bayes - dense, "ci95": [bayes - dense - 0.01,
                                                                              bayes - dense + 0.01]}}]}


def test_cell_overrides_cap_top_k_and_set_the_seeds():
    config = load_config("tiny")              # eval.top_k = 2
    assert sweep.cell_overrides(3, 1, 40, config) == ["seed=3", "partition.seed=3", "partition.num_clusters=1",
                                                      "stage2.steps=40", "eval.top_k=1"]
    assert sweep.cell_overrides(0, 8, 40, config)[-1] == "eval.top_k=2"


def test_summary_is_the_t_interval_over_seeds(tmp_path):
    losses = {(2, 10): {0: (3.0, 3.05), 1: (3.1, 3.12), 2: (2.9, 2.99)},
              (4, 10): {0: (3.0, 2.97), 1: (3.1, 3.08), 2: (2.9, 2.91)}}
    reports = {cell: {s: _report(*v) for s, v in per_seed.items()} for cell, per_seed in losses.items()}
    out = sweep.summarize(tmp_path, [2, 4], [10], reports)
    for cell in out["cells"]:
        d = np.array([b - a for a, b in losses[(cell["k"], cell["budget"])].values()])
        got = cell["systems"]["ensemble/bayes"]["delta_vs_dense"]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert got["std"] == pytest.approx(d.std(ddof=1), abs=1e-12)
        assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-9)
    assert json.loads((tmp_path / "sweep.json").read_text())["clusters"] == [2, 4]
    md = (tmp_path / "sweep.md").read_text()
    assert "| - | - | 2 | 10 | - | - | ensemble/bayes" in md and "| - | - | 4 | 10 | - | - | ensemble/bayes" in md
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "cells" / "K4-steps10" / "summary.json").is_file()


def test_grid_errors(tmp_path):
    with pytest.raises(ValueError, match="clusters"):
        sweep.run_sweep([], [10], [0], tmp_path, lambda *a: {}, "base")
    with pytest.raises(ValueError, match="budgets"):
        sweep.run_sweep([2], [10, 10], [0], tmp_path, lambda *a: {}, "base")


def test_cells_of_a_seed_share_stage_1(tmp_path):
    """The first cell of each seed builds data and stage 1; the others receive copies of them."""
    calls = []

    def run_cell(seed, k, budget, where):
        calls.append((seed, k, budget, sorted(p.name for p in where.glob("*")) if where.exists() else []))
        (where / "data").mkdir(parents=True, exist_ok=True)
        (where / "data" / "summary.json").write_text(json.dumps({"seed": seed}))
        (where / "models" / "base").mkdir(parents=True, exist_ok=True)
        (where / "stages").mkdir(exist_ok=True)
        (where / "stages" / "base.json").write_text("{}")
        return _report(3.0 + seed, 3.0 + seed + 0.01 * k)

    sweep.run_sweep([1, 2], [5], [0, 1], tmp_path, run_cell, "base")
    assert [c[:3] for c in calls] == [(0, 1, 5), (0, 2, 5), (1, 1, 5), (1, 2, 5)]
    assert calls[0][3] == [] and calls[2][3] == []                    # first cell of a seed: built
    assert calls[1][3] == ["data", "models", "stages"]                # later cells: shared copies
    shared = json.loads((tmp_path / "seed-1" / "K2-steps5" / "data" / "summary.json").read_text())
    assert shared == {"seed": 1}                                      # from its own seed's first cell


# ---------------------------------------------------------------- the model-size axis (issue 26)
def test_sizes_and_budgets_parse():
    assert sweep.parse_size("s") == ("s", sweep.SIZES["s"])
    assert sweep.parse_size("xs:model.hidden_size=8, model.num_heads=2") == (
        "xs", ("model.hidden_size=8", "model.num_heads=2"))
    for bad in ("huge", "a b:model.x=1", "t:model.hidden_size"):
        with pytest.raises(ValueError):
            sweep.parse_size(bad)
    with pytest.raises(ValueError, match="repeats"):
        sweep.parse_sizes(["s", "s"])
    assert sweep.parse_budgets(["240", "60"], None) == {None: [60, 240]}
    assert sweep.parse_budgets(["60", "240", "s=60,2880", "l=30"], ["s", "m", "l"]) == {
        "s": [60, 2880], "m": [60, 240], "l": [30]}
    for tokens, sizes in ((["x=60"], ["s"]), (["0"], None), (["60", "60"], None), (["s=60"], ["s", "m"]),
                          (["6o"], None)):
        with pytest.raises(ValueError):
            sweep.parse_budgets(tokens, sizes)


def test_the_sizes_have_the_documented_parameter_counts():
    """~50k, ~300k, ~3M parameters on the sweep config (vocab 1024, tied): the counts the docs quote."""
    from dfm.models.flops import decoder_params
    from experiments.registry import load_job
    from experiments.text.modeling import decoder_config

    counts = {name: decoder_params(decoder_config(load_job("sweep", None, list(o))[1], 1024)).total
              for name, o in sweep.SIZES.items()}
    assert counts == {"s": 53_408, "m": 319_968, "l": 2_819_840}


def _scaled_report(dense, bayes, params, base_tokens, stage2_tokens, forward):
    rep = _report(dense, bayes)
    rep["compute"] = {"base_tokens": base_tokens, "dense_stage2_tokens": stage2_tokens,
                      "experts_stage2_tokens": stage2_tokens,
                      "flops": {"per_model": {"params": {"total": params, "non_embedding": params // 2},
                                              "forward": forward, "training": 3 * forward}, "counted": "c"}}
    for s, m in zip(rep["systems"], (1, 4)):
        s["inference_flops_per_token"], s["experts_evaluated"] = m * forward, m
    return rep


def test_cell_scale_needs_flops_and_tokens():
    rep = _scaled_report(3.0, 3.1, 1000, 2000, 3000, 10_000)
    assert sweep.cell_scale(rep)["tokens_per_param"] == 5.0
    assert sweep.cell_scale(_report(3.0, 3.1)) is None
    rep["compute"] = {"flops": rep["compute"]["flops"]}              # a multimodal report: FLOPs, no tokens
    assert sweep.cell_scale(rep) is None


def test_size_axis_shares_stage_1_per_size_and_dense_per_budget(tmp_path):
    calls = []

    def run_cell(seed, k, budget, where, size):
        calls.append((seed, size, budget, k, sorted(p.name for p in (where / "models").glob("*"))
                      if (where / "models").exists() else []))
        if not (where / "data").exists():
            (where / "data").mkdir(parents=True)
            (where / "data" / "summary.json").write_text(f"{seed} {size}")
        for stage in ("base", "dense", f"expert-{k}"):      # a finished (copied) stage is not re-run
            if (where / "models" / stage).exists():
                continue
            (where / "models" / stage).mkdir(parents=True)
            (where / "models" / stage / "w").write_text(f"{seed} {size} {budget} {k}")
            (where / "stages").mkdir(exist_ok=True)
            (where / "stages" / f"{stage}.json").write_text("{}")
        params = {"a": 1000, "b": 4000}[size]
        return _scaled_report(3.0, 3.0 + 0.01 * k - budget * 1e-4, params, 2000, 1000 * budget, 10 * params)

    out = sweep.run_sweep([1, 4], {"a": [10, 20], "b": [10]}, [0], tmp_path, run_cell, "base", log=lambda *a: None,
                          sizes={"a": ("model.hidden_size=8",), "b": ("model.hidden_size=16",)})
    assert [c[:4] for c in calls] == [(0, "a", 10, 1), (0, "a", 10, 4), (0, "a", 20, 1), (0, "a", 20, 4),
                                      (0, "b", 10, 1), (0, "b", 10, 4)]
    assert [c[4] for c in calls] == [[], ["base", "dense"], ["base"], ["base", "dense"], [], ["base", "dense"]]
    # the dense model of a (seed, size, budget) is the one its first K trained; stage 1 the size's first cell's
    assert (tmp_path / "seed-0" / "a-K4-steps20" / "models" / "dense" / "w").read_text() == "0 a 20 1"
    assert (tmp_path / "seed-0" / "a-K4-steps20" / "models" / "base" / "w").read_text() == "0 a 10 1"
    assert (tmp_path / "seed-0" / "b-K4-steps10" / "models" / "base" / "w").read_text() == "0 b 10 1"
    assert (tmp_path / "seed-0" / "b-K1-steps10" / "data" / "summary.json").read_text() == "0 a"   # one data stage
    cell = next(c for c in out["cells"] if (c["size"], c["k"], c["budget"]) == ("a", 4, 20))
    assert cell["scale"]["tokens_per_param"] == pytest.approx((2000 + 20_000) / 1000)
    assert cell["scale"]["stage2_tokens_per_param"] == pytest.approx(20.0)
    assert cell["scale"]["training_flops"]["dense"] == 22_000 * 3 * 10_000
    assert cell["systems"]["ensemble/bayes"]["inference_flops_per_token"] == 4 * 10_000
    assert out["size_overrides"] == {"a": ["model.hidden_size=8"], "b": ["model.hidden_size=16"]}
    md = (tmp_path / "sweep.md").read_text()
    assert "| a | 1,000 | 4 | 20 | 22 (20) | 0.00066 | ensemble/bayes (best) | 0.04 (4) |" in md
    assert "| b | 4,000 | 1 | 10 | 3 (2.5) |" in md and "## Crossover" in md
    assert (tmp_path / "regime.png").stat().st_size > 10_000 and not (tmp_path / "sweep.png").exists()
    assert {(r["size"], r["k"]) for r in out["crossover"]} == {("a", 1), ("a", 4), ("b", 1), ("b", 4)}


@pytest.mark.slow
def test_two_cell_slice_of_the_extended_sweep(tmp_path):
    """`dfm sweep --sizes`: one size, K in {1, 2}, one budget, one seed. The table's FLOPs and
    tokens per parameter against the exported dense model's own tensors, the shared dense model, the
    crossover section and the regime figure."""
    from safetensors.numpy import load_file

    from experiments.cli import main

    out = tmp_path / "sweep"
    short = ["base.steps=8", "base.checkpoint_every=8", "stage2.checkpoint_every=4", "eval.num_samples=0",
             "eval.bootstrap_resamples=300", "partition.random_control=false"]
    assert main(["sweep", "--config", "tiny", "--sizes", "a:model.hidden_size=16,model.intermediate_size=32",
                 "--clusters", "1", "2", "--budgets", "4", "--seeds", "1", "--out", str(out), "--quiet", *short]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [(c["size"], c["k"], c["budget"]) for c in result["cells"]] == [("a", 1, 4), ("a", 2, 4)]
    cells = [out / "seed-0" / f"a-K{k}-steps4" for k in (1, 2)]
    assert (cells[0] / "stages" / "dense.json").read_bytes() == (cells[1] / "stages" / "dense.json").read_bytes()
    # an independent count: the exported dense model's tensors and HF config
    hf = json.loads((cells[1] / "export" / "dense" / "config.json").read_text())
    tensors = load_file(cells[1] / "export" / "dense" / "model.safetensors")
    h, vocab, layers = hf["hidden_size"], hf["vocab_size"], hf["num_hidden_layers"]
    assert (h, hf["intermediate_size"]) == (16, 32)
    total = sum(t.size for t in tensors.values())
    non_embedding = total - sum(t.size for n, t in tensors.items() if "embed_tokens" in n or "lm_head" in n)
    forward = 2 * non_embedding + 2 * h * vocab + 4 * layers * 32 * h        # seq_len 32, heads x head_dim = h
    cell = result["cells"][1]
    assert cell["scale"]["params"] == total
    assert cell["scale"]["tokens_per_param"] == pytest.approx((8 + 4) * 8 * 32 / total)       # batch 8, seq 32
    assert cell["scale"]["training_flops"]["dense"] == (8 + 4) * 8 * 32 * 3 * forward
    flops = {n: s["inference_flops_per_token"] for n, s in cell["systems"].items()}
    assert flops["dense"] == flops["ensemble/centroid-top1"] == forward
    assert flops["ensemble/bayes"] == flops["ensemble/centroid-top2"] == 2 * forward
    md = (out / "sweep.md").read_text()
    header = "| size | params | K | stage-2 steps | tokens/param | training TFLOPs | system | inference MFLOPs/token"
    assert header in md
    tpp = f"{cell['scale']['tokens_per_param']:.3g} ({4 * 8 * 32 / total:.3g})"
    assert f"| a | {total:,} | 2 | 4 | {tpp} |" in md
    assert "ensemble/bayes" in md and f"| {2 * forward / 1e6:.3g} (2) |" in md
    assert "## Crossover" in md and "| a | 2 |" in md
    assert (out / "regime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (out / "sweep.png").exists()
    rep = json.loads((cells[1] / "report.json").read_text())
    assert {s["name"]: s["inference_flops_per_token"] for s in rep["systems"]} == flops


def test_cli_refuses_a_bad_size_or_budget_before_running(tmp_path, capsys):
    from experiments.cli import main

    out = tmp_path / "never"
    assert main(["sweep", "--config", "tiny", "--sizes", "huge", "--clusters", "1", "--budgets", "4",
                 "--out", str(out)]) == 2
    assert main(["sweep", "--config", "tiny", "--sizes", "s", "--clusters", "1", "--budgets", "m=4",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "size 'huge': unknown" in err and "'m' is not one of the sizes" in err and not out.exists()
