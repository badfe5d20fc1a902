"""`experiments.engine.regime`: the crossover finder on synthetic cell results with a known crossover
and with none, the best-router choice and the regime figure."""
import math
import random

import pytest

from experiments.engine import regime

M = 0.02


def _pts(rows):
    return [{"tokens_per_param": x, "mean": m, "ci95": ci} for x, m, ci in rows]


def _slope(xs, ys):
    """Least-squares slope of ys against log10(xs), by the textbook sums."""
    lx = [math.log10(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ys)) / sum((a - mx) ** 2 for a in lx)


def test_known_crossover_in_any_order():
    rows = [(1.0, 0.10, [0.08, 0.12]),        # worse
            (4.0, 0.05, [0.03, 0.07]),        # worse
            (16.0, 0.005, [-0.01, 0.015]),    # inside [-m, m]: parity
            (64.0, -0.03, [-0.045, -0.015])]  # entirely below 0: better (and at parity)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    out = regime.find_crossover(_pts(shuffled), M)
    assert out["parity_at"] == 16.0 and out["interval_at_parity"] == [-0.01, 0.015] and out["parity_holds_after"]
    assert out["better_at"] == 64.0 and out["interval_at_better"] == [-0.045, -0.015] and out["better_holds_after"]
    assert out["trend"]["first"] == 0.10 and out["trend"]["last"] == -0.03
    assert out["trend"]["slope_per_decade"] == pytest.approx(_slope([1, 4, 16, 64], [0.10, 0.05, 0.005, -0.03]))


def test_no_crossover_reports_the_trend():
    rows = [(0.5, 0.04, [0.03, 0.05]), (2.0, 0.11, [0.09, 0.13]), (8.0, 0.19, [0.17, 0.21])]
    out = regime.find_crossover(_pts(rows), M)
    assert out["parity_at"] is None and out["better_at"] is None
    assert out["parity_holds_after"] is None and out["interval_at_parity"] is None
    slope = out["trend"]["slope_per_decade"]
    assert slope == pytest.approx(_slope([0.5, 2, 8], [0.04, 0.11, 0.19])) and slope > 0   # the gap grows


def test_a_crossover_that_does_not_hold_and_the_edges():
    rows = [(1.0, 0.0, [-0.02, 0.02]),         # parity, margin inclusive
            (3.0, 0.03, [0.01, 0.05]),         # inconclusive: not parity
            (9.0, -0.05, [-0.07, -0.03])]      # better
    out = regime.find_crossover(_pts(rows), M)
    assert out["parity_at"] == 1.0 and out["parity_holds_after"] is False
    assert out["better_at"] == 9.0 and out["better_holds_after"] is True
    # a wide interval below and above the margin is not parity; a missing one is not either
    out = regime.find_crossover(_pts([(1.0, 0.0, [-0.03, 0.01]), (2.0, 0.0, None)]), M)
    assert out["parity_at"] is None and out["better_at"] is None
    one = regime.find_crossover(_pts([(5.0, -0.01, [-0.015, -0.005])]), M)
    assert one["better_at"] == 5.0 and one["trend"]["slope_per_decade"] is None


def test_higher_is_better_metric():
    rows = [(1.0, -0.05, [-0.08, -0.02]), (4.0, 0.03, [0.01, 0.05])]
    out = regime.find_crossover(_pts(rows), 0.01, higher_is_better=True)
    assert out["better_at"] == 4.0 and out["parity_at"] == 4.0
    assert regime.find_crossover(_pts(rows), 0.01)["better_at"] == 1.0          # as a loss: lower is better


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        regime.find_crossover([], M)
    with pytest.raises(ValueError, match="distinct"):
        regime.find_crossover(_pts([(1.0, 0.0, None), (1.0, 0.1, None)]), M)
    with pytest.raises(ValueError, match="positive"):
        regime.find_crossover(_pts([(0.0, 0.0, None)]), M)


def _sweep():
    """Two sizes, K 2 and 4, three budgets; in size "s" the K=2 ensemble reaches parity at the third."""
    cells = []
    for size, params in (("s", 50_000), ("l", 3_000_000)):
        for k in (2, 4):
            for i, steps in enumerate((60, 240, 960)):
                tpp = (300 + steps) * 1024 / params
                bayes = 0.1 - (0.05 * i if size == "s" and k == 2 else 0.0)
                systems = {"dense": {"delta_vs_dense": {"mean": 0.0, "ci95": [0.0, 0.0]}},
                           "ensemble/bayes": {"delta_vs_dense": {"mean": bayes, "ci95": [bayes - 0.01, bayes + 0.01]}},
                           "ensemble/centroid-top1": {"delta_vs_dense": {"mean": bayes + 0.02,
                                                                         "ci95": [bayes + 0.01, bayes + 0.03]}},
                           "ensemble/oracle": {"delta_vs_dense": {"mean": -1.0, "ci95": [-1.1, -0.9]}}}
                cells.append({"size": size, "k": k, "budget": steps, "systems": systems,
                              "scale": {"tokens_per_param": tpp, "params": params}})
    return {"config": "synthetic", "seeds": [0, 1, 2], "unit": "nats/token", "parity_margin": M, "cells": cells}


def test_regime_of_a_sweep_and_its_figure(tmp_path):
    sweep = _sweep()
    assert regime.best_router(sweep["cells"][0]["systems"]) == "ensemble/bayes"        # the oracle is no router
    assert regime.best_router(sweep["cells"][0]["systems"], higher_is_better=True) == "ensemble/centroid-top1"
    assert regime.best_router({"dense": {}}) is None
    rows = {(r["size"], r["k"]): r for r in regime.crossovers(sweep)}
    assert set(rows) == {("s", 2), ("s", 4), ("l", 2), ("l", 4)}
    assert rows[("s", 2)]["parity_at"] == pytest.approx((300 + 960) * 1024 / 50_000)
    assert rows[("s", 2)]["interval_at_parity"] == pytest.approx([-0.01, 0.01])
    assert all(rows[key]["parity_at"] is None for key in rows if key != ("s", 2))
    md = "\n".join(regime.crossover_markdown(list(rows.values()), "nats/token"))
    assert "| s | 2 | 25.8 [-0.0100, +0.0100] | none |" in md
    path = regime.plot_regime(sweep, tmp_path / "regime.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
