"""Mixture paths (THEORY S4): x_t^i = x1^i w.p. kappa_t^i, else x0^i."""
import jax
import jax.numpy as jnp
import numpy as np

from dfm import paths


def test_mask_source_and_uniform_source():
    x0 = paths.mask_source((2, 3), 7)
    assert x0.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(x0), np.full((2, 3), 7))
    u = np.asarray(paths.uniform_source(jax.random.key(0), (30000,), 3))
    assert u.min() == 0 and u.max() == 2
    # each frequency has std sqrt(2/9/30000) = 0.0027; allow 6 sigma
    assert np.all(np.abs(np.bincount(u) / u.size - 1 / 3) < 0.017)


def test_sample_path_endpoints_exact():
    x0 = jnp.zeros((4, 5), jnp.int32)
    x1 = jnp.ones((4, 5), jnp.int32)
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(paths.sample_path(key, x0, x1, jnp.zeros(5))), 0)
    np.testing.assert_array_equal(np.asarray(paths.sample_path(key, x0, x1, jnp.ones(5))), 1)
    kappa = jnp.array([[0, 1, 0, 1, 0]] * 4, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(paths.sample_path(key, x0, x1, kappa)), np.asarray(kappa).astype(int))


def test_sample_path_law():
    n, kappa = 20000, jnp.array([0.1, 0.5, 0.9])
    x1 = jnp.broadcast_to(jnp.array([1, 2, 0]), (n, 3))
    x_t = paths.sample_masked_path(jax.random.key(1), x1, kappa, mask_id=3)
    revealed = np.asarray(x_t != 3)
    np.testing.assert_array_equal(np.asarray(x_t)[revealed], np.asarray(x1)[revealed])
    # revealed fraction per position ~ kappa; std <= 0.5/sqrt(20000) = 0.0035, allow ~6 sigma
    assert np.all(np.abs(revealed.mean(0) - np.asarray(kappa)) < 0.02)
    # per-sequence kappa [batch, 1]
    kb = jnp.where(jnp.arange(n)[:, None] < n // 2, 0.0, 1.0)
    x_t = paths.sample_masked_path(jax.random.key(2), x1, kb, mask_id=3)
    assert np.all(np.asarray(x_t[: n // 2]) == 3) and np.all(np.asarray(x_t[n // 2:]) == np.asarray(x1[n // 2:]))
    # coordinates are independent: joint reveal frequency of positions 0 and 2 ~ 0.1 * 0.9
    x_t = np.asarray(paths.sample_masked_path(jax.random.key(3), x1, kappa, mask_id=3))
    assert abs(((x_t[:, 0] != 3) & (x_t[:, 2] != 3)).mean() - 0.09) < 0.015


def test_sample_path_jit_and_vmap():
    x1 = jnp.array([[1, 2, 0], [0, 0, 1]])
    kappa = jnp.array([0.3, 0.6, 0.2])
    key = jax.random.key(4)
    eager = paths.sample_masked_path(key, x1, kappa, 3)
    jitted = jax.jit(paths.sample_masked_path, static_argnums=3)(key, x1, kappa, 3)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    keys = jax.random.split(key, 5)
    out = jax.vmap(lambda k: paths.sample_masked_path(k, x1, kappa, 3))(keys)
    assert out.shape == (5, 2, 3)
