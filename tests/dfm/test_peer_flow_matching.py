"""Cross-check against Meta flow_matching 1.0.10 (peer implementation of Gat et al. 2024).

Same random inputs, float64: the continuous-time mixture-path velocity (our posterior_to_velocity with
rate = d_kappa / (1 - kappa), THEORY S7) vs MixtureDiscreteProbPath.posterior_to_velocity, and our
generalized_kl vs MixturePathGeneralizedKL. Max abs difference <= 1e-5 (observed ~1e-15).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm import losses, paths, schedules
from dfm import velocities as vel

torch = pytest.importorskip("torch", reason="the peer check needs torch (flow_matching is torch-based)")
fm_path = pytest.importorskip("flow_matching.path", reason="the peer check needs Meta's flow_matching package")
fm_sched = pytest.importorskip("flow_matching.path.scheduler", reason="needs flow_matching schedulers")
fm_loss = pytest.importorskip("flow_matching.loss", reason="needs flow_matching losses")

pytestmark = pytest.mark.peer

BATCH, LENGTH, K = 6, 7, 5


def _inputs(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(BATCH, LENGTH, K)) * 2
    x1 = rng.integers(0, K, size=(BATCH, LENGTH))
    x_t = np.where(rng.random((BATCH, LENGTH)) < 0.5, x1, rng.integers(0, K, size=(BATCH, LENGTH)))
    t = rng.uniform(0.02, 0.95, size=BATCH)
    return logits, x1, x_t, t


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_velocity_matches_flow_matching(exponent):
    logits, x1, x_t, t = _inputs(int(exponent))
    path = fm_path.MixtureDiscreteProbPath(fm_sched.PolynomialConvexScheduler(n=exponent))
    ref = path.posterior_to_velocity(torch.tensor(logits), torch.tensor(x_t), torch.tensor(t)).numpy()
    with jax.enable_x64(True):
        sch = schedules.PolynomialScheduler(exponent)
        tj = jnp.asarray(t)
        rate = (sch.d_kappa(tj) / (1 - sch.kappa(tj)))[:, None]        # [batch, 1]
        ours = np.asarray(vel.posterior_to_velocity(jax.nn.softmax(jnp.asarray(logits)), jnp.asarray(x_t), rate))
        out = fm_sched.PolynomialConvexScheduler(n=exponent)(torch.tensor(t))
        np.testing.assert_allclose(np.asarray(sch.kappa(tj)), out.alpha_t.numpy(), atol=1e-12)
        np.testing.assert_allclose(np.asarray(sch.d_kappa(tj)), out.d_alpha_t.numpy(), atol=1e-12)
    assert ref.shape == ours.shape
    assert np.max(np.abs(ref - ours)) <= 1e-5


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_generalized_kl_matches_flow_matching(reduction):
    logits, x1, x_t, t = _inputs(11)
    path = fm_path.MixtureDiscreteProbPath(fm_sched.PolynomialConvexScheduler(n=2.0))
    ref = fm_loss.MixturePathGeneralizedKL(path, reduction=reduction)(
        torch.tensor(logits), torch.tensor(x1), torch.tensor(x_t), torch.tensor(t)).numpy()
    with jax.enable_x64(True):
        sch = schedules.PolynomialScheduler(2.0)
        tj = jnp.asarray(t)
        ours = np.asarray(losses.generalized_kl(jnp.asarray(logits), jnp.asarray(x1), jnp.asarray(x_t),
                                                sch.kappa(tj), sch.d_kappa(tj), reduction=reduction))
    assert ref.shape == ours.shape
    assert np.max(np.abs(ref - ours)) <= 1e-5


def test_generalized_kl_float32_matches():
    logits, x1, x_t, t = _inputs(12)
    path = fm_path.MixtureDiscreteProbPath(fm_sched.PolynomialConvexScheduler(n=1.0))
    ref = fm_loss.MixturePathGeneralizedKL(path, reduction="none")(
        torch.tensor(logits, dtype=torch.float32), torch.tensor(x1), torch.tensor(x_t),
        torch.tensor(t, dtype=torch.float32)).numpy()
    sch = schedules.PolynomialScheduler(1.0)
    tj = jnp.asarray(t, jnp.float32)
    ours = np.asarray(losses.generalized_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(x1), jnp.asarray(x_t),
                                            sch.kappa(tj), sch.d_kappa(tj), reduction="none"))
    assert np.max(np.abs(ref - ours)) <= 1e-5


def test_path_sample_law_matches_flow_matching():
    """Fraction of coordinates taking x1 (where x0 != x1) is kappa(t) for both (loose: 6 sigma)."""
    n, t_val = 4000, 0.6
    x0 = np.zeros((n, LENGTH), dtype=np.int64)
    x1 = np.ones((n, LENGTH), dtype=np.int64)
    torch.manual_seed(0)
    path = fm_path.MixtureDiscreteProbPath(fm_sched.PolynomialConvexScheduler(n=2.0))
    ref = path.sample(torch.tensor(x0), torch.tensor(x1), torch.full((n,), t_val)).x_t.numpy()
    kappa = schedules.PolynomialScheduler(2.0).kappa(jnp.float32(t_val))
    ours = np.asarray(paths.sample_path(jax.random.key(0), jnp.asarray(x0, jnp.int32), jnp.asarray(x1, jnp.int32),
                                        jnp.full((n, 1), kappa)))
    sigma = np.sqrt(0.36 * 0.64 / (n * LENGTH))
    assert abs(ref.mean() - 0.36) < 6 * sigma
    assert abs(ours.mean() - 0.36) < 6 * sigma
    assert abs(ours.mean() - ref.mean()) < 8 * sigma
