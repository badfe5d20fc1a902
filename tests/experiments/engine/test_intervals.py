"""Intervals of the comparison with dense (experiments.engine.intervals), the parity verdict, the
report's delta_vs_dense, and the experts' warmup (never scaled to 0)."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats

from experiments.engine.intervals import (
    paired_bootstrap,
    partition_entropy,
    per_unit_sums,
    t_interval,
    unit_bootstrap,
    verdict,
)
from experiments.engine.training import train_config
from experiments.text.config import load_config
from experiments.text.report import dense_comparison
from experiments.text.task import TextTask


def test_identical_systems_give_zero_and_a_zero_interval():
    a = np.array([10.0, 30.0, 5.0, 12.0])
    boot = paired_bootstrap(a, a.copy(), np.array([4.0, 10.0, 2.0, 6.0]), resamples=500, seed=1)
    assert boot["mean"] == 0.0 and boot["ci95"] == [0.0, 0.0]


def test_a_constant_per_token_shift_gives_that_shift_and_a_point_interval():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, size=12).astype(float)
    dense = rng.uniform(1, 5, size=12) * tokens
    c = 0.037
    boot = paired_bootstrap(dense + c * tokens, dense, tokens, resamples=300, seed=2)
    assert boot["mean"] == pytest.approx(c, abs=1e-12)
    assert boot["ci95"] == pytest.approx([c, c], abs=1e-12)


def test_point_estimate_is_the_difference_of_the_two_losses():
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 50, size=9).astype(float)
    a, b = rng.uniform(0, 9, size=9) * tokens, rng.uniform(0, 9, size=9) * tokens
    boot = paired_bootstrap(a, b, tokens, resamples=10)
    assert boot["mean"] == pytest.approx(a.sum() / tokens.sum() - b.sum() / tokens.sum(), abs=1e-12)


def test_three_documents_match_the_exact_bootstrap_distribution():
    """27 equally likely resamples; the smallest and largest ratios each have probability >= 1/27 > 2.5%,
    so the exact percentile interval is [min, max] of the single-document ratios, and the drawn
    distribution matches the enumerated one."""
    a, b, tokens = np.array([12.0, 3.0, 40.0]), np.array([10.0, 4.0, 30.0]), np.array([4.0, 2.0, 8.0])
    exact = {}
    for idx in itertools.product(range(3), repeat=3):
        r = round(float((a - b)[list(idx)].sum() / tokens[list(idx)].sum()), 12)
        exact[r] = exact.get(r, 0) + 1 / 27
    ratios = (a - b) / tokens
    boot = paired_bootstrap(a, b, tokens, resamples=8000, seed=3)
    assert boot["ci95"] == pytest.approx([ratios.min(), ratios.max()], abs=1e-12)
    # the draws' distribution against the exact one
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 3, size=(8000, 3))
    drawn = np.round((a - b)[draws].sum(1) / tokens[draws].sum(1), 12)
    for value, p in exact.items():
        assert np.mean(drawn == value) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 8000) + 1e-3)


def test_bootstrap_is_seeded_and_pairs_the_documents():
    rng = np.random.default_rng(4)
    tokens = rng.integers(10, 60, size=20).astype(float)
    common = rng.uniform(1, 8, size=20) * tokens            # large shared document difficulty
    a, b = common + 0.1 * tokens + rng.normal(0, 0.5, 20), common
    one, two = (paired_bootstrap(a, b, tokens, resamples=400, seed=5) for _ in range(2))
    assert one == two
    lo, hi = one["ci95"]
    assert lo <= one["mean"] <= hi and hi - lo < 0.05        # paired: the shared difficulty cancels


def test_per_unit_sums():
    assert per_unit_sums([1.0, 2.0, 3.0], [0, 2, 0], 4).tolist() == [4.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize("lo,hi,expected", [
    (-0.05, -0.01, "better"), (-0.01, -0.001, "better"), (0.024, 0.073, "worse"), (-0.01, 0.015, "within margin"),
    (-0.02, 0.02, "within margin"), (0.01, 0.05, "inconclusive"), (-0.05, 0.01, "inconclusive"),
    (-0.03, 0.0, "inconclusive")])
def test_verdict_rule(lo, hi, expected):
    assert verdict(lo, hi, 0.02) == expected


@pytest.mark.parametrize("lo,hi,expected", [
    (0.001, 0.05, "better"), (-0.05, -0.021, "worse"), (-0.01, 0.015, "within margin"), (-0.02, 0.02, "within margin"),
    (-0.05, 0.01, "inconclusive"), (0.0, 0.03, "inconclusive"), (-0.03, -0.01, "inconclusive")])
def test_verdict_rule_when_higher_is_better(lo, hi, expected):
    """Exact match: Δ > 0 is better; the same rule on the negated interval."""
    assert verdict(lo, hi, 0.02, higher_is_better=True) == expected


def test_unit_bootstrap_one_item_per_unit_is_the_bootstrap_over_items_by_hand():
    """Each resample draws n items with replacement (rng.integers(0, n, (chunk, n)) of the seeded
    generator): the interval is the 2.5 / 97.5 percentiles of the resampled means, computed here
    with plain numpy from the same draws."""
    rng = np.random.default_rng(7)
    em = (rng.random(40) < 0.6).astype(float)
    ref = (rng.random(40) < 0.5).astype(float)
    got = unit_bootstrap(em, np.arange(40)[::-1] + 100, ref, resamples=600, seed=11)   # unit ids need not be 0..n-1
    draws = np.random.default_rng(11)
    idx = np.concatenate([draws.integers(0, 40, size=(min(256, 600 - s), 40)) for s in range(0, 600, 256)])
    diff = (em - ref)[::-1]                 # np.unique orders the units: item i is unit 139 - i
    means = diff[idx].mean(axis=1)
    assert got["mean"] == pytest.approx(em.mean() - ref.mean(), abs=1e-12)
    assert got["ci95"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert got["units"] == got["items"] == 40


def test_unit_bootstrap_matches_the_normal_approximation_on_a_large_sample():
    """n = 4000 Bernoulli(0.55) scores: the percentile interval of the mean is p ± 1.96 sqrt(p(1-p)/n)
    (CLT) to within a few percent of its half width; paired with a correlated reference, the interval
    of the difference is mean(d) ± 1.96 sd(d) / sqrt(n)."""
    rng = np.random.default_rng(0)
    n = 4000
    em = (rng.random(n) < 0.55).astype(float)
    got = unit_bootstrap(em, np.arange(n), resamples=4000, seed=1)
    p = em.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert got["ci95"] == pytest.approx([p - half, p + half], abs=0.1 * half)
    ref = np.where(rng.random(n) < 0.9, em, 1 - em)         # agrees with em on 90% of the items
    d = em - ref
    got = unit_bootstrap(em, np.arange(n), ref, resamples=4000, seed=2)
    half = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=0.1 * half)


def test_unit_bootstrap_resamples_whole_units():
    """Five identical questions per image: the interval is the one of the 300 image means (each
    image's questions move together), sqrt(5) wider than treating the 1500 questions as independent."""
    rng = np.random.default_rng(3)
    per_image = (rng.random(300) < 0.5).astype(float)
    em, image = np.repeat(per_image, 5), np.repeat(np.arange(300), 5)
    by_image = unit_bootstrap(em, image, resamples=3000, seed=4)
    alone = unit_bootstrap(per_image, np.arange(300), resamples=3000, seed=4)
    naive = unit_bootstrap(em, np.arange(1500), resamples=3000, seed=4)
    assert by_image["ci95"] == pytest.approx(alone["ci95"], abs=1e-12)
    assert by_image["units"] == 300 and by_image["items"] == 1500
    width = by_image["ci95"][1] - by_image["ci95"][0]
    assert width / (naive["ci95"][1] - naive["ci95"][0]) == pytest.approx(math.sqrt(5), rel=0.12)
    with pytest.raises(ValueError, match="unit_bootstrap"):
        unit_bootstrap(em, image[:-1])


def test_verdict_rejects_a_negative_margin_and_an_empty_interval():
    with pytest.raises(ValueError):
        verdict(0.0, 0.1, -0.1)
    with pytest.raises(ValueError):
        verdict(0.2, 0.1, 0.02)


def test_t_interval_matches_scipy():
    x = [0.05, 0.02, 0.071]
    mean, sd, ci = t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and sd == pytest.approx(np.std(x, ddof=1))
    assert ci == pytest.approx(list(ref))
    assert t_interval([0.3]) == (0.3, None, None)


def test_partition_entropy():
    assert partition_entropy(np.array([0, 1, 2, 3] * 5), 4) == pytest.approx(math.log(4))
    assert partition_entropy(np.array([1, 1, 1]), 3) == 0.0


def test_dense_comparison_adds_delta_vs_dense_and_per_document_scores():
    seq_len = 4
    doc = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    context = np.array([True, False, False, True, False, True, False, False])
    dense = np.array([8.0, 9.0, 7.0, 5.0, 6.0])                  # per scored sequence
    results = {"systems": [{"name": "dense", "loss": dense.sum() / 20},
                           {"name": "ensemble/bayes", "loss": (dense + 0.4).sum() / 20}],
               "arrays": {"doc": doc, "context": context, "labels": np.array([0, 1, 0]),
                          "nll/dense": dense, "nll/ensemble/bayes": dense + 0.4}}
    dense_comparison(results, seq_len, seed=0, margin=0.02, resamples=200)
    arrays = results["arrays"]
    assert arrays["doc_tokens"].tolist() == [8.0, 4.0, 8.0]
    assert arrays["doc_nll/dense"].tolist() == [17.0, 7.0, 11.0]
    d = results["systems"][1]["delta_vs_dense"]
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx([0.1, 0.1])
    assert d["std"] is None and d["seeds"] == [0] and d["verdict"] == "worse"
    assert results["systems"][0]["delta_vs_dense"]["verdict"] == "reference"


@pytest.mark.parametrize("warmup,expected_min", [(2, 1), (0, 0)])
def test_expert_warmup_never_scales_to_zero(warmup, expected_min):
    task = TextTask()
    config = load_config("tiny")
    config = config.replace(stage2=config.stage2.__class__(**{**config.stage2.__dict__, "warmup_steps": warmup}))
    tc = train_config(task, config, "expert-0", 1)      # round(warmup * 1 / 16) == 0
    assert tc.warmup_steps == expected_min
    assert train_config(task, config, "expert-0", 16).warmup_steps == warmup
    assert train_config(task, config, "dense", 16).warmup_steps == warmup
