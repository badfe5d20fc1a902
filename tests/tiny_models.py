"""Tiny decoders shared by the training, sharding and multi-process tests.

`tiny_decoder` draws the default-init distribution (normal(0.02) weights, unit norm scales) from a
seeded numpy Generator into an abstract module, which avoids compiling `jax.random` once per
parameter shape. Importable from tests (pytest puts tests/ on sys.path) and from test files run as
scripts (their folder is sys.path[0]).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfm.models import Decoder


def tiny_decoder(config, seed: int = 0) -> Decoder:
    """A `Decoder(config)` with parameters drawn from `numpy.random.default_rng(seed)`."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.ones(var.shape) if path[-1] == "scale" else 0.02 * rng.standard_normal(var.shape)
        var.set_raw_value(jnp.asarray(value, var.dtype))
    return model


def lm_loss(model, batch, key):
    """Next-token NLL plus a small key-dependent term, so the per-step key matters for exact resume."""
    logits = model(batch[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    noise = 1e-3 * jax.random.normal(key, ()) * jnp.sum(model.norm.scale[...])
    return nll + noise, {"nll": nll, "tokens": batch[:, 1:].size}
