"""Kappa schedules (THEORY S4, S5): endpoints, monotonicity, rates, derivatives, moving positions."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dfm import schedules

CONTINUOUS = [schedules.PolynomialScheduler(1.0), schedules.PolynomialScheduler(2.0),
              schedules.PolynomialScheduler(0.5), schedules.LinearScheduler(), schedules.CosineScheduler()]


def test_continuous_endpoints_and_monotone():
    t = jnp.linspace(0.0, 1.0, 101)
    for sch in CONTINUOUS:
        k = np.asarray(sch.kappa(t))
        assert k[0] == 0.0 and abs(k[-1] - 1.0) < 1e-6, sch
        assert np.all(np.diff(k) >= 0), sch
        assert isinstance(sch, schedules.KappaScheduler)


def test_derivatives_match_grad_and_finite_differences():
    with jax.enable_x64(True):
        t = jnp.linspace(0.05, 0.95, 19)
        for sch in CONTINUOUS:
            grad = jax.vmap(jax.grad(lambda s: sch.kappa(s)))(t)
            np.testing.assert_allclose(np.asarray(sch.d_kappa(t)), np.asarray(grad), rtol=1e-12, atol=1e-12)
            h = 1e-6
            fd = (sch.kappa(t + h) - sch.kappa(t - h)) / (2 * h)
            np.testing.assert_allclose(np.asarray(sch.d_kappa(t)), np.asarray(fd), rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(np.asarray(schedules.CosineScheduler().kappa(t)), np.sin(np.pi * np.asarray(t) / 2) ** 2)


def _check_table(s):
    k = np.asarray(s.kappa)
    assert k.shape == (s.num_steps + 1, s.length)
    assert np.all(k[0] == 0) and np.all(k[-1] == 1) and np.all(np.diff(k, axis=0) >= 0)
    r = np.asarray(s.rates())
    assert r.shape == (s.num_steps, s.length)
    assert np.all((r >= 0) & (r <= 1))
    # survival identity: 1 - kappa[t+1] = (1 - kappa[t]) (1 - rate[t])
    np.testing.assert_allclose(1 - k[1:], (1 - k[:-1]) * (1 - r), atol=1e-6)
    return k, r


def test_autoregressive_schedule():
    s = schedules.autoregressive(4)
    k, r = _check_table(s)
    assert s.num_steps == 4 and s.length == 4 and s.max_moves == 1
    np.testing.assert_array_equal(k, (np.arange(4)[None] < np.arange(5)[:, None]).astype(float))
    np.testing.assert_array_equal(r, np.eye(4))       # rate 1 on coordinate t, 0 elsewhere
    for t in range(4):
        np.testing.assert_array_equal(np.asarray(s.moving_positions(t)), [t])


def test_any_order_schedule():
    perm = [2, 0, 3, 1]
    s = schedules.any_order(perm)
    k, r = _check_table(s)
    for step, pos in enumerate(perm):
        np.testing.assert_array_equal(r[step], np.eye(4)[pos])
        np.testing.assert_array_equal(np.asarray(s.moving_positions(step)), [pos])
        assert k[step + 1, pos] == 1 and k[step, pos] == 0


def test_block_schedule():
    s = schedules.block(5, 2)
    k, r = _check_table(s)
    assert s.num_steps == 3 and s.max_moves == 2
    np.testing.assert_array_equal(r, [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    pos, valid = s.moving_table()
    np.testing.assert_array_equal(np.asarray(pos), [[0, 1], [2, 3], [4, 4]])
    np.testing.assert_array_equal(np.asarray(valid), [[True, True], [True, True], [True, False]])
    np.testing.assert_array_equal(np.asarray(s.moving_positions(2)), [4, 4])
    assert schedules.block(4, 1).kappa.shape == schedules.autoregressive(4).kappa.shape
    np.testing.assert_array_equal(np.asarray(schedules.block(4, 1).kappa), np.asarray(schedules.autoregressive(4).kappa))


def test_discretize():
    with jax.enable_x64(True):
        s = schedules.discretize(schedules.CosineScheduler(), 3, 4)
        k, r = _check_table(s)
        assert s.max_moves == 3
        expected = np.sin(np.pi * np.arange(5) / 8) ** 2
        np.testing.assert_allclose(k[:, 1], expected, atol=1e-15)
        np.testing.assert_allclose(r[:, 0], (expected[1:] - expected[:-1]) / (1 - expected[:-1]), atol=1e-14)
        assert r[-1, 0] == 1.0
        np.testing.assert_array_equal(np.asarray(s.moving_positions(1)), [0, 1, 2])
        lin = schedules.discretize(schedules.LinearScheduler(), 2, 4)
        np.testing.assert_allclose(np.asarray(lin.rates())[:, 0], [1 / 4, 1 / 3, 1 / 2, 1])


def test_moving_positions_traced_and_pytree():
    s = schedules.block(6, 3)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 1 and leaves[0].shape == (3, 6)
    pos = jax.jit(lambda sch, t: sch.moving_positions(t))(s, 1)
    np.testing.assert_array_equal(np.asarray(pos), [3, 4, 5])
    out = jax.jit(lambda sch: sch.rates().sum())(s)
    assert float(out) == 6.0
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.max_moves == 3


@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 5))
def test_from_kappa_random_tables(seed, num_steps, length):
    rng = np.random.default_rng(seed)
    inc = rng.random((num_steps, length)) * (rng.random((num_steps, length)) < 0.7)
    inc[-1] += 1e-3
    k = np.concatenate([np.zeros((1, length)), np.cumsum(inc, 0) / np.cumsum(inc, 0)[-1]], 0)
    k[-1] = 1.0
    s = schedules.from_kappa(k)
    _check_table(s)
    r = np.asarray(s.rates())
    assert s.max_moves == max(1, int((r > 0).sum(1).max()))
    table, valid = map(np.asarray, s.moving_table())
    for t in range(num_steps):
        pos = table[t]
        assert valid[t].sum() == (r[t] > 0).sum()
        moving = np.flatnonzero(r[t] > 0)
        assert set(pos.tolist()) == set(moving.tolist()) or (moving.size == 0 and pos.tolist() == [0] * s.max_moves)
