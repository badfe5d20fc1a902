"""Bad input raises ValueError whose message names the argument (dfm/checks.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm import checks, losses, paths, samplers, schedules
from dfm import velocities as vel


def test_non_monotone_schedule():
    k = np.array([[0.0, 0.0], [0.6, 0.2], [0.4, 0.5], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"kappa.*nondecreasing"):
        schedules.from_kappa(k)


def test_kappa_outside_unit_interval():
    with pytest.raises(ValueError, match=r"kappa.*\[0, 1\]"):
        schedules.from_kappa(np.array([[0.0], [1.2], [1.0]]))
    with pytest.raises(ValueError, match=r"kappa.*NaN"):
        schedules.from_kappa(np.array([[0.0], [np.nan], [1.0]]))


def test_kappa_wrong_endpoints():
    with pytest.raises(ValueError, match=r"kappa.*kappa\[0\]"):
        schedules.from_kappa(np.array([[0.1], [0.5], [1.0]]))
    with pytest.raises(ValueError, match=r"kappa.*kappa\[T\]"):
        schedules.from_kappa(np.array([[0.0], [0.5], [0.9]]))
    with pytest.raises(ValueError, match=r"kappa.*shape"):
        schedules.from_kappa(np.array([0.0, 1.0]))


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="max_moves"):
        schedules.from_kappa(np.array([[0.0, 0.0], [1.0, 1.0]]), max_moves=1)
    with pytest.raises(ValueError, match="permutation"):
        schedules.any_order([0, 0, 2])
    with pytest.raises(ValueError, match="block_size"):
        schedules.block(4, 0)
    with pytest.raises(ValueError, match="exponent"):
        schedules.PolynomialScheduler(-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        schedules.discretize(schedules.LinearScheduler(), 3, 0)


def test_mask_id_inside_vocab():
    post = jnp.full((1, 2, 3), 1 / 3)
    with pytest.raises(ValueError, match="mask_id"):
        vel.posterior_to_velocity(post, jnp.zeros((1, 2), int), jnp.ones(2), mask_id=1)
    with pytest.raises(ValueError, match="mask_id"):
        losses.dfm_cross_entropy(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), int), jnp.zeros((1, 2), int), jnp.ones(2),
                                 mask_id=2)
    with pytest.raises(ValueError, match="x1"):
        paths.sample_masked_path(jax.random.key(0), jnp.array([[0, 3]]), jnp.ones(2), mask_id=3)
    with pytest.raises(ValueError, match="mask_id"):
        checks.check_mask_id(2.5, 2)


def test_posterior_vocab_shape_mismatch():
    post = jnp.full((1, 2, 3), 1 / 3)
    with pytest.raises(ValueError, match="posterior"):
        vel.posterior_to_velocity(post, jnp.zeros((1, 3), int), jnp.ones(3))
    with pytest.raises(ValueError, match="x_t"):
        vel.posterior_to_velocity(post, jnp.array([[0, 5]]), jnp.ones(2), mask_id=3)   # state 5 >= num_states 4
    with pytest.raises(ValueError, match="rate"):
        vel.posterior_to_velocity(post, jnp.zeros((1, 2), int), jnp.ones(5))
    with pytest.raises(ValueError, match="logits"):
        losses.ar_nll(jnp.zeros((1, 3, 4)), jnp.zeros((1, 2), int))
    with pytest.raises(ValueError, match="x1"):
        losses.ar_nll(jnp.zeros((1, 2, 4)), jnp.array([[0, 4]]))
    with pytest.raises(ValueError, match="x0"):
        samplers.sample_discrete(jax.random.key(0), lambda *a: None, schedules.autoregressive(3),
                                 paths.mask_source((2, 4), 3), mask_id=3)


def test_negative_or_nan_probabilities():
    x_t = jnp.zeros((1, 2), int)
    with pytest.raises(ValueError, match=r"posterior.*nonnegative"):
        vel.posterior_to_velocity(jnp.array([[[1.2, -0.2], [0.5, 0.5]]]), x_t, jnp.ones(2))
    with pytest.raises(ValueError, match=r"posterior.*NaN"):
        vel.posterior_to_velocity(jnp.array([[[jnp.nan, 0.5], [0.5, 0.5]]]), x_t, jnp.ones(2))
    with pytest.raises(ValueError, match=r"posterior.*sum to 1"):
        vel.posterior_to_velocity(jnp.array([[[0.3, 0.3], [0.5, 0.5]]]), x_t, jnp.ones(2))
    with pytest.raises(ValueError, match=r"q.*nonnegative"):
        checks.check_probabilities(np.array([0.5, 0.7, -0.2]), "q")


def test_invalid_velocity_and_sampler_arguments():
    with pytest.raises(ValueError, match="u"):
        vel.check_velocity(jnp.array([[-1.5, 1.5]]), jnp.array([0]))
    with pytest.raises(ValueError, match="temperature"):
        samplers.sample_discrete(jax.random.key(0), lambda *a: None, schedules.autoregressive(2),
                                 paths.mask_source((1, 2), 2), mask_id=2, temperature=-1.0)
    with pytest.raises(ValueError, match="rates"):
        checks.check_rate(np.array([0.5, 1.5]), "rates")


def test_checks_skip_on_tracers():
    """Inside jit the value checks are skipped (no ConcretizationError); the result is computed."""
    f = jax.jit(lambda p: vel.posterior_to_velocity(p, jnp.zeros((1, 2), int), jnp.ones(2)))
    out = f(jnp.array([[[1.2, -0.2], [0.5, 0.5]]]))
    assert out.shape == (1, 2, 2)
    out = jax.jit(lambda k: (checks.check_kappa_table(k, "kappa"), k)[1])(jnp.zeros((3, 2)))
    assert out.shape == (3, 2)
