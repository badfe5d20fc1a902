"""The engine's validation (experiments/engine/validation.py): the token-weighted held-out loss, and
which validation units select which model."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.engine.graph import Assignments
from experiments.engine.validation import make_validate, validation_units


class Point(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3,)))


def test_make_validate_is_the_token_weighted_mean():
    """Two batches of different sizes: the mean is over target tokens, not over batches."""
    def mean_abs(model, batch, key):
        del key
        err = jnp.abs(model.w[...][None, :] - batch)
        return err.mean(), {"tokens": jnp.asarray(err.size, jnp.float32)}

    rng = np.random.default_rng(0)
    b1, b2 = rng.normal(size=(4, 3)), rng.normal(size=(1, 3))
    got = make_validate(mean_abs, [jnp.asarray(b1), jnp.asarray(b2)])(Point())
    assert got == pytest.approx(np.abs(np.concatenate([b1, b2])).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="batches"):
        make_validate(mean_abs, [])


def test_each_model_is_selected_on_its_own_validation_units():
    a = Assignments(units={"train": np.array([0, 1, 1]), "random": np.array([1, 0, 1]),
                           "val": np.array([1, 0, 1, 1, 0]), "test": np.array([0])}, example_unit=np.arange(3))
    assert validation_units("expert-1", a).tolist() == [0, 2, 3]
    assert validation_units("expert-0", a).tolist() == [1, 4]
    assert validation_units("dense", a) is None
    assert validation_units("random-0", a) is None       # a uniform sample: all of val
