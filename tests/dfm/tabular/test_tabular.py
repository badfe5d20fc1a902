"""Tests of the exact numpy engine dfm.tabular (THEORY S1-S13 building blocks), with real values."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfm import tabular as tb

Q4 = np.array([0.1, 0.2, 0.3, 0.4])  # vocab 2, length 2: q(00), q(01), q(10), q(11)


def ar(length):
    return (np.arange(length)[None, :] < np.arange(length + 1)[:, None]).astype(float)


def test_enumerate_states_order_and_round_trip():
    states = tb.enumerate_states(2, 2)
    assert states.shape == (9, 2)
    np.testing.assert_array_equal(states[:4], [[0, 0], [0, 1], [0, 2], [1, 0]])
    np.testing.assert_array_equal(states[-1], [2, 2])  # all-mask state is last
    for v, n, wm in [(2, 3, True), (3, 2, False), (4, 4, True)]:
        s = tb.enumerate_states(v, n, with_mask=wm)
        np.testing.assert_array_equal(tb.state_index(s, v, with_mask=wm), np.arange(s.shape[0]))
    assert tb.mask_index(3, 2) == 15
    np.testing.assert_array_equal(tb.data_index(2, 2), [0, 1, 3, 4])
    assert not tb.enumerate_states(3, 3).flags.writeable


def test_marginal_path_hand_computed_values():
    kappa = np.array([[0.0, 0.0], [0.5, 0.25], [1.0, 1.0]])
    path = tb.marginal_path(Q4, kappa, 2)
    idx = lambda *x: int(tb.state_index(np.array(x), 2))  # noqa: E731
    assert path[1, idx(2, 2)] == pytest.approx(0.375)
    assert path[1, idx(0, 2)] == pytest.approx(0.5 * 0.75 * 0.3)
    assert path[1, idx(2, 1)] == pytest.approx(0.5 * 0.25 * 0.6)
    assert path[1, idx(1, 1)] == pytest.approx(0.5 * 0.25 * 0.4)
    post = tb.posterior(Q4, kappa, 1, 2)
    np.testing.assert_allclose(post[idx(0, 2)], [1 / 3, 2 / 3, 0, 0], atol=1e-15)
    coord = tb.coordinate_posteriors(Q4, kappa, 1, 2)
    np.testing.assert_allclose(coord[idx(0, 2)], [[1.0, 0.0], [1 / 3, 2 / 3]], atol=1e-15)


@pytest.mark.parametrize("vocab,length", [(2, 2), (3, 3), (4, 2)])
def test_path_endpoints_and_normalization(vocab, length):
    rng = np.random.default_rng(vocab * 10 + length)
    q = tb.random_distribution(rng, vocab**length, kind="sparse")
    kappa = tb.random_kappa(rng, 4, length)
    path = tb.marginal_path(q, kappa, vocab)
    np.testing.assert_allclose(path.sum(1), 1.0, atol=1e-14)
    np.testing.assert_allclose(path[0], tb.point_mass(tb.mask_index(vocab, length), path.shape[1]), atol=1e-15)
    np.testing.assert_allclose(path[-1], tb.embed_data(q, vocab, length), atol=1e-15)
    src = tb.random_distribution(rng, vocab**length)
    upath = tb.marginal_path(q, kappa, vocab, source=src)
    np.testing.assert_allclose(upath[0], src, atol=1e-15)
    np.testing.assert_allclose(upath[-1], q, atol=1e-15)
    coupling = tb.random_coupling(rng, q)
    cpath = tb.marginal_path(q, kappa, vocab, coupling=coupling)
    np.testing.assert_allclose(cpath[0], coupling.sum(1), atol=1e-15)


def test_posteriors_sum_to_one_on_reachable_states_and_zero_elsewhere():
    rng = np.random.default_rng(3)
    q = tb.random_distribution(rng, 27, kind="sparse")
    kappa = tb.random_kappa(rng, 3, 3)
    path = tb.marginal_path(q, kappa, 3)
    post = tb.posterior(q, kappa, 1, 3)
    alive = path[1] > 0
    np.testing.assert_allclose(post[alive].sum(1), 1.0, atol=1e-14)
    assert np.all(post[~alive] == 0.0)
    coord = tb.coordinate_posteriors(q, kappa, 1, 3)
    np.testing.assert_allclose(coord[alive].sum(-1), 1.0, atol=1e-14)
    np.testing.assert_allclose(coord, tb.coordinate_posteriors_from(post, 3, 3), atol=1e-15)


def test_kernels_are_column_stochastic():
    rng = np.random.default_rng(4)
    q = tb.random_distribution(rng, 16, kind="peaked")
    kappa = tb.random_kappa(rng, 3, 2)
    for t in range(3):
        u = tb.joint_velocity(q, kappa, t, 4)
        assert tb.velocity_validity_error(u) < 1e-14
        k = tb.conditional_kernel(kappa, t, np.array([3, 1]), 4)
        assert tb.markov_kernel_error(k) < 1e-14
        k_f = tb.factorized_kernel(tb.coordinate_posteriors(q, kappa, t, 4), kappa, t, 4)
        assert tb.markov_kernel_error(k_f) < 1e-14
        k_u = tb.conditional_kernel(kappa, t, np.array([3, 1]), 4, x0=np.array([0, 1]), with_mask=False)
        assert tb.markov_kernel_error(k_u) < 1e-14 and k_u.shape == (16, 16)
    assert tb.markov_kernel_error(tb.random_markov_kernel(rng, 7, kind="sparse")) < 1e-14


def test_joint_velocity_generates_path_and_ar_sampler_is_exact():
    rng = np.random.default_rng(5)
    q = tb.random_distribution(rng, 27)
    kappa = tb.random_kappa(rng, 4, 3)
    path = tb.marginal_path(q, kappa, 3)
    kernels = [np.eye(64) + tb.joint_velocity(q, kappa, t, 3) for t in range(4)]
    np.testing.assert_allclose(tb.sample_distribution(kernels, path[0]), path[-1], atol=1e-14)
    k_ar = ar(3)
    fac = [tb.factorized_kernel(tb.coordinate_posteriors(q, k_ar, t, 3), k_ar, t, 3) for t in range(3)]
    np.testing.assert_allclose(tb.sample_distribution(fac, path[0]), tb.embed_data(q, 3, 3), atol=1e-14)


def test_rates_values():
    kappa = np.array([[0.0, 0.0], [0.5, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(tb.rates(kappa), [[0.5, 1.0], [1.0, 0.0]])


def test_losses_under_ar_and_elbo():
    rng = np.random.default_rng(6)
    model = rng.dirichlet(np.ones(2), size=(9, 2))
    loss = tb.dfm_loss(model, ar(2), 2)
    np.testing.assert_allclose(loss, tb.ar_nll(model, 2, 2), atol=1e-14)
    np.testing.assert_allclose(loss, tb.sampler_nll(model, ar(2), 2), atol=1e-14)
    # x1 = (0, 1): -log p(0 | mm) - log p(1 | 0m)
    expected = -math.log(model[8, 0, 0]) - math.log(model[int(tb.state_index(np.array([0, 2]), 2)), 1, 1])
    assert loss[1] == pytest.approx(expected)
    kappa = tb.random_kappa(rng, 5, 2)
    assert np.all(tb.dfm_loss(model, kappa, 2) >= tb.sampler_nll(model, kappa, 2) - 1e-12)


def test_information_quantities():
    assert tb.entropy(np.full(8, 1 / 8)) == pytest.approx(math.log(8))
    assert tb.kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert tb.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert tb.tv_distance([1.0, 0.0], [0.25, 0.75]) == pytest.approx(0.75)
    assert tb.mutual_information(np.outer([0.3, 0.7], [0.5, 0.5])) == pytest.approx(0.0, abs=1e-15)
    copy = np.array([0.5, 0.0, 0.0, 0.5])  # X^2 = X^1
    assert tb.block_total_correlation(copy, 2, 2, [[0, 1]]) == pytest.approx(math.log(2))
    assert tb.block_total_correlation(copy, 2, 2, [[0], [1]]) == pytest.approx(0.0, abs=1e-15)
    nt = tb.next_token_conditionals(Q4, 2, 2)
    np.testing.assert_allclose(nt[1], [[1 / 3, 2 / 3], [3 / 7, 4 / 7]])
    w, experts = np.array([0.5, 0.5]), np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    assert tb.mutual_information(w[:, None] * experts) == pytest.approx(math.log(2))
    np.testing.assert_allclose(tb.chain_rule_mutual_information(w, experts, 2, 2), [math.log(2), 0.0], atol=1e-15)


def test_router_and_top_k():
    rho = tb.router([0.25, 0.75], np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    np.testing.assert_allclose(rho, [[1, 0], [0.25, 0.75], [0, 1]])
    rho0 = tb.router([0.5, 0.5], np.array([[1.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_array_equal(rho0[1], [0.0, 0.0])  # unreachable state
    np.testing.assert_allclose(tb.top_k_renormalize(np.array([0.2, 0.5, 0.3]), 2), [0, 0.625, 0.375])
    np.testing.assert_allclose(tb.route(rho, np.ones((2, 3, 4))), np.ones((3, 4)))
    np.testing.assert_allclose(tb.mixture([0.25, 0.75], np.eye(2)), [0.25, 0.75])


def test_random_distributions_kinds():
    rng = np.random.default_rng(7)
    sparse = tb.random_distribution(rng, 50, kind="sparse")
    assert np.any(sparse == 0.0) and sparse.sum() == pytest.approx(1.0)
    peaked = tb.random_distribution(rng, 50, kind="peaked")
    assert peaked.max() >= 0.9
    kappa = tb.random_kappa(rng, 6, 4)
    assert kappa.shape == (7, 4) and np.all(kappa[0] == 0) and np.all(kappa[-1] == 1)
    assert np.all(np.diff(kappa, axis=0) >= 0)


@pytest.mark.parametrize("call,match", [
    (lambda: tb.enumerate_states(0, 2), "vocab"),
    (lambda: tb.enumerate_states(2, 0), "length"),
    (lambda: tb.state_index(np.array([0, 3]), 2), "states"),
    (lambda: tb.state_index(np.array([0.0, 1.0]), 2), "states"),
    (lambda: tb.marginal_path(np.array([0.5, 0.5, 0.5, 0.5]), ar(2), 2), "q"),
    (lambda: tb.marginal_path(Q4, np.array([[0.1, 0.0], [1.0, 1.0]]), 2), "kappa"),
    (lambda: tb.marginal_path(Q4, np.array([[0.0, 0.0], [0.6, 0.2], [0.5, 0.5], [1.0, 1.0]]), 2), "kappa"),
    (lambda: tb.marginal_path(Q4, ar(3), 2), "q"),
    (lambda: tb.marginal_path(Q4, ar(2), 2, source=Q4, coupling=np.eye(4) / 4), "exclusive"),
    (lambda: tb.marginal_path(Q4, ar(2), 2, coupling=np.eye(4) / 4), "coupling"),
    (lambda: tb.joint_velocity(Q4, ar(2), 2, 2), "t must"),
    (lambda: tb.random_distribution(np.random.default_rng(0), 3, kind="flat"), "kind"),
    (lambda: tb.random_distribution(0, 3), "rng"),
    (lambda: tb.top_k_renormalize(np.array([0.5, 0.5]), 3), "k must"),
    (lambda: tb.router([0.5, 0.6], np.ones((2, 3))), "weights"),
    (lambda: tb.conditional_kernel(ar(2), 0, np.array([0, 2]), 2), "states"),
])
def test_bad_inputs_raise_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 3), length=st.integers(2, 3),
       kind=st.sampled_from(tb.KINDS), uniform=st.booleans())
def test_property_marginal_velocity_generates_path(seed, vocab, length, kind, uniform):
    rng = np.random.default_rng(seed)
    q = tb.random_distribution(rng, vocab**length, kind=kind)
    kappa = tb.random_kappa(rng, 3, length)
    kwargs = {"source": tb.random_distribution(rng, vocab**length)} if uniform else {}
    path = tb.marginal_path(q, kappa, vocab, **kwargs)
    for t in range(3):
        u = tb.joint_velocity(q, kappa, t, vocab, **kwargs)
        assert tb.velocity_validity_error(u) < 1e-13
        assert np.max(np.abs(tb.continuity_residual_kernel(path[t], path[t + 1], u))) < 1e-13
        np.testing.assert_allclose(tb.continuity_residual_divergence(path[t], path[t + 1], u), 0.0, atol=1e-13)
