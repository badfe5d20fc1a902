"""Tests of proofs_check: every THEORY row passes on a few cases, the JSON/CLI contract, and that a
deliberately wrong formula makes a row FAIL (exit status 1)."""
import json

import numpy as np
import pytest

import dfm.tabular as tb
import proofs_check
from proofs_check import symbolic

CASES = 12


@pytest.fixture(scope="module")
def rows():
    return proofs_check.run_checks(cases=CASES, seed=1, library=False)


ROWS = ["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S7.law", "S8", "S8.avail", "S9", "S9.decode", "S10", "S11", "S12",
        "S13"]


def test_every_statement_passes(rows):
    assert [r.id for r in rows] == ROWS
    assert proofs_check.STATEMENTS == tuple(f"S{i}" for i in range(1, 14))
    for r in rows:
        assert r.passed, (r.id, r.failures)
        assert r.max_error <= 1e-12
        assert r.cases == CASES
        assert r.tolerance == 1e-12
    methods = {r.id: r.method for r in rows}
    assert methods["S3"] == "both" and methods["S5"] == "both"


def test_library_cross_checks_pass_in_float64():
    assert proofs_check.LIBRARY_ROWS == tuple(ROWS)
    rows = proofs_check.run_checks(cases=4, seed=2, library=True)
    assert [r.id for r in rows] == ROWS
    for r in rows:
        assert r.method.endswith("+ library"), (r.id, r.method)
        assert r.passed, (r.id, r.failures)
        assert r.max_error <= 1e-12
        assert r.cases == 4
        assert any(line.startswith("library") for line in r.extra), (r.id, r.extra)
    by_id = {r.id: r for r in rows}
    assert by_id["S3"].method == "both + library" and by_id["S5"].method == "both + library"


def test_library_randomness_does_not_change_the_cases():
    """The library checks draw from their own Generator: the enumeration sees the same cases either way."""
    for sid in ("S4", "S7", "S12"):
        off = proofs_check.CHECKS[sid](np.random.default_rng([0, 1]), 3)
        on = proofs_check.CHECKS[sid](np.random.default_rng([0, 1]), 3, library=True)
        assert off.max_error == on.max_error or on.max_error <= 1e-12, sid
        if sid == "S12":
            assert off.extra[0] == on.extra[0]  # same partitions (same empty-cluster count)


@pytest.mark.parametrize("error, available", [
    (SyntaxError("simulated syntax error in dfm"), True),
    (ModuleNotFoundError("No module named 'dfm.decentral.x'", name="dfm.decentral.x"), True),
    (ModuleNotFoundError("No module named 'jax'", name="jax"), False),
])
def test_only_a_missing_dependency_skips_the_library(monkeypatch, error, available):
    """A missing third-party module skips the library checks; an error in dfm itself does not (the rows then
    run the library and FAIL with the error)."""
    import builtins

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "dfm.decentral":
            raise error
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    ok, reason = proofs_check.library.available()
    assert ok is available and (reason == "") is available


def test_wrong_library_velocity_makes_s4_fail(monkeypatch):
    import dfm.velocities

    real = dfm.velocities.posterior_to_velocity
    monkeypatch.setattr(dfm.velocities, "posterior_to_velocity", lambda *a, **k: 1.001 * real(*a, **k))
    proofs_check.library.JITTED.clear()
    row = proofs_check.s4_s5.check_s4(np.random.default_rng(0), 4, library=True)
    proofs_check.library.JITTED.clear()
    assert not row.passed


def test_rate_and_information_extras_are_reported(rows):
    by_id = {r.id: r for r in rows}
    assert any("measured" in line and "fitted slope" in line for line in by_id["S6"].extra)
    assert any("measured" in line and "fitted slope" in line for line in by_id["S7"].extra)
    assert any("I(X;K)" in line for line in by_id["S11"].extra)


def test_s7_per_step_differences_match_the_closed_forms(rows):
    """The measured per-step differences of S7 (row data) against closed forms: 0 for kappa = t; h^2 / (1 - (1-2h)^2)
    at the second-to-last step for t^2 (the bound is attained there); for the cosine the largest difference tends to
    1/4 and the sum over steps to pi^2/6 - 1 (the differences at step T - j tend to 1/j^2, j >= 2)."""
    per = {r.id: r for r in rows}["S7"].data["per_step"]
    steps = per["cosine"]["steps"]
    assert max(per["kappa=t"]["max_abs_diff"]) < 1e-15
    for T, d in zip(steps, per["kappa=t^2"]["max_abs_diff"]):
        h, t = 1.0 / T, 1.0 - 2.0 / T
        assert abs(d - h**2 / (1.0 - t**2)) < 1e-12 if T > 2 else d == 0.25
    cos = dict(zip(steps, per["cosine"]["max_abs_diff"]))
    assert abs(cos[512] - 0.25) < 1e-3 and abs(cos[8] - 0.2081) < 1e-3 and abs(cos[32] - 0.2470) < 1e-3
    total = dict(zip(steps, per["cosine"]["sum_abs_diff"]))
    assert abs(total[512] - (np.pi**2 / 6 - 1)) < 0.01 and abs(total[8] - 0.395) < 1e-3


def test_the_old_s7_claim_fails_the_row(monkeypatch):
    """'The two rates differ by O(h^2) per step' (a bound h^2 max|kappa''| / 2, without 1 / (1 - kappa(t_s))) is
    false for the cosine and for t^2: the S7 row FAILs with it."""
    from proofs_check import s6_s7, schedulers

    def old_claim(name, num_steps):
        sch, h = schedulers.SCHEDULERS[name], 1.0 / num_steps
        t = schedulers.grid(num_steps)[:-1]
        bound = h**2 * sch.d2_max(t, t + h) / 2.0
        bound[-1] = 0.0
        return bound

    monkeypatch.setattr(s6_s7, "rate_difference_bound", old_claim)
    row = s6_s7.check_s7(np.random.default_rng(0), 2)
    assert not row.passed
    assert any("per-step rate bound" in f for f in row.failures)
    assert row.max_error > 0.24          # the cosine at T = 512: |r - e| = 0.25 against a bound of ~1e-5


def test_reveal_decomposition_by_hand():
    """Two positions, step laws a = [[1/2, 1/4], [1/2, 3/4]]: P(same step) = 1/2 * 1/4 + 1/2 * 3/4 = 1/2; the
    ordered partitions ({0}, {1}), ({1}, {0}), ({0, 1}) have probabilities 3/8, 1/8, 1/2."""
    from proofs_check import reveal

    a = np.array([[0.5, 0.25], [0.5, 0.75]])
    probs = {blocks: reveal.partition_probability(a, blocks) for blocks in reveal.ordered_partitions(2)}
    assert probs == {((0,), (1,)): 0.375, ((1,), (0,)): 0.125, ((0, 1),): 0.5}
    assert reveal.collision_probability(a, 2) == 0.5 and reveal.pairwise_bound(a) == 0.5
    q = np.array([0.5, 0.0, 0.0, 0.5])          # two perfectly correlated bits
    law, eps, nu_mass = reveal.decomposed_law(q, 2, 2, a)
    np.testing.assert_allclose(law, [0.375, 0.125, 0.125, 0.375])   # half the time: independent halves
    assert eps == 0.5 and nu_mass == 0.5
    assert reveal.tv_on_support(law[[0, 3]], q[[0, 3]]) == 0.25
    np.testing.assert_allclose(reveal.step_law(np.array([[0.5, 0.25], [1.0, 1.0]])), a)


def test_row_ids_and_seeds():
    assert proofs_check.row_seed("S7") == [7] and proofs_check.row_seed("S7.law") == [7, 1]
    assert proofs_check.row_seed("S9.decode") == [9, 1]
    assert proofs_check.canonical("s8.AVAIL") == "S8.avail"
    (row,) = proofs_check.run_checks(cases=2, seed=0, only=["s8.avail"], library=False)
    assert row.id == "S8.avail" and row.passed


def test_cli_json_and_exit_status(tmp_path, capsys):
    path = tmp_path / "out.json"
    status = proofs_check.main(["--cases", "5", "--seed", "3", "--only", "S1,S9,s8.avail,S13", "--json", str(path)])
    assert status == 0
    data = json.loads(path.read_text())
    assert [d["id"] for d in data] == ["S1", "S9", "S8.avail", "S13"]
    for d in data:
        assert {"id", "passed", "max_error", "cases", "statement", "method", "tolerance"} <= set(d)
        assert d["passed"] is True and d["cases"] == 5 and d["max_error"] <= 1e-12
    out = capsys.readouterr().out
    assert "S13" in out and "PASS" in out


def test_unknown_statement_is_a_usage_error():
    with pytest.raises(SystemExit) as err:
        proofs_check.main(["--only", "S99", "--cases", "1"])
    assert err.value.code == 2


def test_wrong_joint_velocity_makes_s3_fail(monkeypatch):
    real = tb.joint_velocity
    monkeypatch.setattr(tb, "joint_velocity", lambda *a, **k: 0.5 * real(*a, **k))  # valid but too slow
    row = proofs_check.s1_s3.check_s3(np.random.default_rng(0), 6, symbolic=False)
    assert not row.passed and row.max_error > 1e-12


def test_wrong_total_correlation_makes_cli_exit_1(monkeypatch, tmp_path):
    real = tb.block_total_correlation
    monkeypatch.setattr(tb, "block_total_correlation", lambda *a: real(*a) + 1e-9)
    path = tmp_path / "bad.json"
    assert proofs_check.main(["--cases", "4", "--only", "S6", "--json", str(path)]) == 1
    (entry,) = json.loads(path.read_text())
    assert entry["passed"] is False and entry["max_error"] > 1e-12


def test_wrong_top_k_makes_s13_fail(monkeypatch):
    monkeypatch.setattr(tb, "top_k_renormalize", lambda w, k: np.asarray(w, dtype=float)[::-1].copy())
    (row,) = proofs_check.run_checks(cases=20, seed=0, only=["S13"])
    assert not row.passed


def test_symbolic_check_detects_a_wrong_kernel(monkeypatch):
    assert symbolic.symbolic_s3()[0] == 0.0
    real = symbolic._cond_kernel
    monkeypatch.setattr(symbolic, "_cond_kernel", lambda y, x, x0, x1, rate: real(y, x, x0, x1, [r / 2 for r in rate]))
    assert symbolic.symbolic_s3()[0] == float("inf")
