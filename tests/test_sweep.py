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
    assert "| 2 | 10 | ensemble/bayes |" in md and "| 4 | 10 | ensemble/bayes |" in md
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
