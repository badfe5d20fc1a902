"""Velocities: conditional velocity (S4), posterior -> velocity, validity (S1), continuity (S2)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dfm import velocities as vel


def test_conditional_velocity_values():
    x_t = jnp.array([[3, 1, 3]])
    x1 = jnp.array([[0, 1, 2]])
    u = vel.conditional_velocity(x_t, x1, jnp.array([0.5, 0.7, 1.0]), num_states=4)
    expected = np.array([[[0.5, 0, 0, -0.5], [0, 0, 0, 0], [0, 0, 1.0, -1.0]]])
    np.testing.assert_allclose(np.asarray(u), expected)
    assert float(vel.validity_error(u, x_t)) == 0.0


def test_posterior_to_velocity_values():
    post = jnp.array([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]])
    x_t = jnp.array([[3, 1]])
    u = vel.posterior_to_velocity(post, x_t, jnp.array([0.5, 0.5]), mask_id=3)
    np.testing.assert_allclose(np.asarray(u), [[[0.1, 0.15, 0.25, -0.5], [0, 0, 0, 0]]], atol=1e-7)
    # uniform source: every coordinate moves
    u = vel.posterior_to_velocity(post, jnp.array([[0, 1]]), jnp.array([[0.5], ]))
    np.testing.assert_allclose(np.asarray(u), [[[-0.4, 0.15, 0.25], [0.05, -0.45, 0.4]]], atol=1e-7)


def test_posterior_to_velocity_with_delta_posterior_is_conditional():
    """S4: the marginal velocity with p_{1|t} = delta_{x_1} is the conditional velocity."""
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.integers(0, 4, (5, 6)))
    x_t = jnp.where(jnp.asarray(rng.random((5, 6)) < 0.5), x1, 4)
    rate = jnp.asarray(rng.random((5, 6)), jnp.float32)
    u_post = vel.posterior_to_velocity(jax.nn.one_hot(x1, 4), x_t, rate, mask_id=4)
    u_cond = vel.conditional_velocity(x_t, x1, rate, 5)
    np.testing.assert_allclose(np.asarray(u_post), np.asarray(u_cond), atol=1e-7)


@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.booleans())
def test_posterior_to_velocity_always_valid(seed, vocab, masked):
    """S1: for random posteriors and rates in [0, 1] the velocity is valid and sums to 0 over y."""
    rng = np.random.default_rng(seed)
    post = rng.dirichlet(np.full(vocab, 0.5), size=(3, 4)).astype(np.float32)
    post = post / post.sum(-1, keepdims=True)
    rate = rng.random((3, 4)).astype(np.float32)
    rate[0, 0], rate[0, 1] = 0.0, 1.0
    num_states = vocab + 1 if masked else vocab
    x_t = jnp.asarray(rng.integers(0, num_states, (3, 4)))
    u = vel.posterior_to_velocity(jnp.asarray(post), x_t, jnp.asarray(rate), mask_id=vocab if masked else None)
    assert u.shape == (3, 4, num_states)
    np.testing.assert_allclose(np.asarray(u.sum(-1)), 0.0, atol=1e-6)
    assert float(vel.validity_error(u, x_t)) <= 1e-6
    vel.check_velocity(u, x_t)


def test_validity_error_detects_violations():
    x_t = jnp.array([0, 1])
    good = jnp.array([[-0.5, 0.5], [0.0, 0.0]])
    assert float(vel.validity_error(good, x_t)) == 0.0
    too_big = jnp.array([[-1.5, 1.5], [0.0, 0.0]])        # V2: delta + u = -0.5 and 1.5
    assert abs(float(vel.validity_error(too_big, x_t)) - 0.5) < 1e-7
    not_zero_sum = jnp.array([[0.0, 0.25], [0.0, 0.0]])    # V1 violated by 0.25
    assert abs(float(vel.validity_error(not_zero_sum, x_t)) - 0.25) < 1e-7


def _joint_factorized_kernel(u, states, num_states):
    """K[y, x] = prod_i (delta_{x^i}(y^i) + u[x, i, y^i]) for all joint states."""
    m = len(states)
    k = np.zeros((m, m))
    for xi in range(m):
        per = np.eye(num_states)[states[xi]] + u[xi]            # [L, S]
        for yi in range(m):
            k[yi, xi] = np.prod(per[np.arange(states.shape[1]), states[yi]])
    return k


def test_conditional_velocity_generates_conditional_path_and_continuity():
    """S4 + S2: the product kernel of delta + u^i maps p_t(.|x1) to p_{t+1}(.|x1) exactly, and the
    continuity residual of the joint velocity K - I is zero (nonzero for a wrong p_next)."""
    with jax.enable_x64(True):
        vocab, length = 2, 3
        mask = vocab
        states = np.array(list(itertools.product(range(vocab + 1), repeat=length)))
        x1 = np.array([1, 0, 1])
        kappa = np.array([[0.0, 0.0, 0.0], [0.3, 0.1, 0.6], [0.5, 0.8, 0.6], [1.0, 1.0, 1.0]])

        def cond_path(k):
            p = np.ones(len(states))
            for i in range(length):
                p *= np.where(states[:, i] == x1[i], k[i], np.where(states[:, i] == mask, 1 - k[i], 0.0))
            return p

        for t in range(3):
            rate = (kappa[t + 1] - kappa[t]) / (1 - kappa[t])
            u = np.asarray(vel.conditional_velocity(jnp.asarray(states), jnp.asarray(np.tile(x1, (len(states), 1))),
                                                    jnp.asarray(rate), vocab + 1))
            k = _joint_factorized_kernel(u, states, vocab + 1)
            np.testing.assert_allclose(k.sum(0), 1.0, atol=1e-14)
            p_t, p_next = cond_path(kappa[t]), cond_path(kappa[t + 1])
            np.testing.assert_allclose(k @ p_t, p_next, atol=1e-14)
            joint_u = jnp.asarray(k - np.eye(len(states)))
            res = vel.continuity_residual(jnp.asarray(p_t), jnp.asarray(p_next), joint_u)
            assert float(jnp.max(jnp.abs(res))) < 1e-14
            wrong = np.roll(p_next, 1)
            assert float(jnp.max(jnp.abs(vel.continuity_residual(jnp.asarray(p_t), jnp.asarray(wrong), joint_u)))) > 1e-3


def test_continuity_residual_random_kernel():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        k = rng.dirichlet(np.ones(6), size=6).T                    # column-stochastic K[y, x]
        p = rng.dirichlet(np.ones(6))
        res = vel.continuity_residual(jnp.asarray(p), jnp.asarray(k @ p), jnp.asarray(k - np.eye(6)))
        assert float(jnp.max(jnp.abs(res))) < 1e-15


def test_velocity_jit_vmap_match_eager():
    rng = np.random.default_rng(1)
    post = jnp.asarray(rng.dirichlet(np.ones(3), size=(4, 5)), jnp.float32)
    x_t = jnp.asarray(rng.integers(0, 4, (4, 5)))
    x1 = jnp.asarray(rng.integers(0, 3, (4, 5)))
    rate = jnp.asarray(rng.random((4, 5)), jnp.float32)
    f = lambda p, x, r: vel.posterior_to_velocity(p, x, r, mask_id=3)
    g = lambda x, y, r: vel.conditional_velocity(x, y, r, 4)
    for fn, args in ((f, (post, x_t, rate)), (g, (x_t, x1, rate))):
        eager = np.asarray(fn(*args))
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(*args)), eager, atol=1e-7)
        vm = jax.vmap(lambda *a: fn(*(z[None] for z in a))[0])(*args)
        np.testing.assert_allclose(np.asarray(vm), eager, atol=1e-7)
    u = f(post, x_t, rate)
    np.testing.assert_allclose(float(jax.jit(vel.validity_error)(u, x_t)), float(vel.validity_error(u, x_t)))


def test_conditional_velocity_zero_on_revealed_coordinates_with_mask_source():
    # THEORY S4: 0 on a revealed coordinate, even one off the conditional path (value != x1).
    x_t = jnp.array([[3, 1, 2]])          # mask_id = 3; coordinate 1 revealed off-path, 2 on-path
    x1 = jnp.array([[0, 0, 2]])
    rate = jnp.array([0.5, 0.5, 0.5])
    u = np.asarray(vel.conditional_velocity(x_t, x1, rate, 4, mask_id=3))
    np.testing.assert_allclose(u[0, 0], [0.5, 0.0, 0.0, -0.5])
    np.testing.assert_array_equal(u[0, 1:], 0.0)
    u_formula = np.asarray(vel.conditional_velocity(x_t, x1, rate, 4))
    np.testing.assert_allclose(u_formula[0, 1], [0.5, -0.5, 0.0, 0.0])   # the bare formula moves it
