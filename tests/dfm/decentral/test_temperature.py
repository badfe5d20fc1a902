"""Temperature fitting of the centroid router (dfm/decentral/temperature.py): interior maxima, fits at a
bound and the limits they stand for (T -> 0: top-1 indicator; T -> inf: uniform over the top-k)."""
import numpy as np
import pytest

from dfm.decentral.temperature import (
    DEFAULT_BOUNDS, LIMIT_INF, LIMIT_ZERO, fit_temperature, fit_temperature_search, limit_weights,
    mixture_log_likelihood, temperature_note,
)


def _reference_weights(cos, temperature, k=None):
    """numpy softmax(cos / T), then the k largest kept and renormalized."""
    z = cos / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    w = e / e.sum(1, keepdims=True)
    if k is not None:
        keep = np.zeros_like(w, bool)
        np.put_along_axis(keep, np.argsort(-w, axis=1, kind="stable")[:, :k], True, axis=1)
        w = np.where(keep, w, 0.0)
        w /= w.sum(1, keepdims=True)
    return w


def _case(seed=0, n=400, k=4):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, size=(n, k))
    return rng, cos


def test_log_likelihood_matches_numpy():
    rng, cos = _case()
    ll = np.log(rng.dirichlet(np.ones(4), size=400))
    for t in (0.01, 0.3, 7.0):
        w = _reference_weights(cos, t, 2)
        want = np.sum(np.log(np.sum(w * np.exp(ll), axis=1)))
        assert mixture_log_likelihood(cos, ll, t, top_k=2) == pytest.approx(want, rel=1e-12)


def test_interior_maximum_is_found_and_not_at_bound():
    """Labels drawn from rho(T* = 0.05), one-hot expert likelihoods: an interior maximum near T*."""
    rng, cos = _case(1, n=3000)
    rho = _reference_weights(cos, 0.05)
    labels = (rho.cumsum(1) > rng.random((3000, 1))).argmax(1)
    ll = np.where(np.eye(4, dtype=bool)[labels], 0.0, -np.inf)
    fit = fit_temperature_search(cos, ll)
    assert fit.at_bound is None and fit.limit is None and not fit.flat
    assert abs(np.log(fit.temperature / 0.05)) < 0.15, fit.temperature
    grid = np.exp(np.linspace(np.log(1e-3), np.log(10), 200))
    assert fit.log_likelihood >= max(mixture_log_likelihood(cos, ll, t) for t in grid) - 1e-9
    assert temperature_note(fit.temperature) == ""
    assert "interior maximum" in fit.describe()


def test_top1_optimum_is_reported_at_the_lower_bound_with_its_limit():
    """Each example is explained only by its nearest centroid's expert: L grows as T -> 0."""
    _, cos = _case(2)
    cos = np.round(cos, 1) + 0.01 * np.arange(4)       # every gap >= 0.01: at T = 1e-4 weights within e^-100 of the limit
    nearest = cos.argmax(1)
    ll = np.where(np.eye(4, dtype=bool)[nearest], np.log(0.9), np.log(1e-6))
    fit = fit_temperature_search(cos, ll, top_k=2)
    assert fit.at_bound == "lower" and fit.temperature == DEFAULT_BOUNDS[0]
    assert fit.limit == LIMIT_ZERO
    assert fit.log_likelihood == pytest.approx(fit.limit_log_likelihoods["zero"], rel=1e-12)
    assert fit_temperature(cos, ll, top_k=2) == DEFAULT_BOUNDS[0]
    note = temperature_note(fit.temperature)
    assert "lower search bound" in note and "top-1 indicator" in note
    assert "AT the lower search bound" in fit.describe() and "the router there is the limit" in fit.describe()


def test_uniform_optimum_is_reported_at_the_upper_bound_with_its_limit():
    """Every expert explains every example equally well except that the nearest is worst: uniform over the
    top-2 is best, the T -> inf limit."""
    _, cos = _case(3)
    order = np.argsort(-cos, axis=1)
    ll = np.full(cos.shape, np.log(0.5))
    np.put_along_axis(ll, order[:, :1], np.log(0.4), axis=1)
    np.put_along_axis(ll, order[:, 1:2], np.log(0.6), axis=1)
    fit = fit_temperature_search(cos, ll, top_k=2)
    assert fit.at_bound == "upper" and fit.temperature == DEFAULT_BOUNDS[1]
    assert fit.limit is None or fit.limit == LIMIT_INF
    assert fit.log_likelihood <= fit.limit_log_likelihoods["inf"] + 1e-9
    assert "uniform weights over the top-k" in temperature_note(fit.temperature)
    assert "T -> inf end" in fit.describe()


def test_near_ties_keep_the_lower_bound_short_of_the_limit():
    """Random cosines with near ties (gaps ~1e-4): at T = 1e-4 those rows are not yet one-hot; the fit is at
    the lower bound, the limit is not claimed, and L(T -> 0) is larger."""
    _, cos = _case(2)
    ll = np.where(np.eye(4, dtype=bool)[cos.argmax(1)], np.log(0.9), np.log(1e-6))
    fit = fit_temperature_search(cos, ll, top_k=2)
    assert fit.at_bound == "lower" and fit.limit is None
    assert fit.limit_log_likelihoods["zero"] > fit.log_likelihood
    assert "does not reach" in fit.describe() and "widen" in fit.describe()


def test_bound_that_cuts_the_search_says_widen():
    """Same case with a narrow interval: at the upper bound, the weights are not yet the limit."""
    rng, cos = _case(4, n=2000)
    rho = _reference_weights(cos, 0.05)
    labels = (rho.cumsum(1) > rng.random((2000, 1))).argmax(1)
    ll = np.where(np.eye(4, dtype=bool)[labels], 0.0, -np.inf)
    fit = fit_temperature_search(cos, ll, bounds=(0.5, 5.0))
    assert fit.at_bound == "lower" and fit.temperature == 0.5 and fit.limit is None
    assert "widen `bounds`" in fit.describe()


def test_limit_weights():
    cos = np.array([[0.1, 0.5, 0.5, -0.2], [0.9, 0.3, 0.2, 0.1]])
    np.testing.assert_allclose(limit_weights(cos, "zero"), [[0, 0.5, 0.5, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(limit_weights(cos, "zero", top_k=1), [[0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(limit_weights(cos, "inf", top_k=2), [[0, 0.5, 0.5, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(limit_weights(cos, "inf"), np.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="limit must be"):
        limit_weights(cos, "half")


def test_flat_likelihood_with_top1():
    _, cos = _case(5)
    ll = np.log(np.full(cos.shape, 0.25))
    fit = fit_temperature_search(cos, ll, top_k=1)
    assert fit.flat and fit.at_bound is None and "irrelevant" in fit.describe()


def test_notes_for_earlier_bounds():
    assert "lower search bound 0.001" in temperature_note(1e-3)
    assert "upper search bound 100" in temperature_note(100.0)
    assert temperature_note(0.37) == ""


def test_bad_bounds():
    with pytest.raises(ValueError, match="bounds must satisfy"):
        fit_temperature(np.zeros((3, 2)), np.zeros((3, 2)), bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="bounds must satisfy"):
        fit_temperature(np.zeros((3, 2)), np.zeros((3, 2)), bounds=(1.0, np.inf))
