"""Convert a `Decoder` between per-layer parameters and layers stacked for `nnx.scan`.

`DecoderConfig.scan_layers=True` stores each block parameter once with a leading `[num_layers]`
axis (compile time independent of depth); HF checkpoints, `dfm.hf` import / export and older
orbax checkpoints use the per-layer layout (`layers[i].…`). The same weights give the same
logits in either layout (tests/dfm/train/test_scale_knobs.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.decoder import Decoder


def _relayout(model: Decoder, scan_layers: bool) -> Decoder:
    config = model.config.replace(scan_layers=scan_layers)
    target = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(target)
    pure = nnx.to_pure_dict(nnx.state(model))
    layers = pure.pop("layers")
    if scan_layers:
        per_layer = [layers[i] for i in range(config.num_layers)]
        pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    else:
        pure["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(config.num_layers)}
    pure = jax.tree.map(jnp.copy, pure)     # own buffers: a donating train step of one model never frees the other's
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(graphdef, abstract)


def stack_layers(model: Decoder) -> Decoder:
    """A new `Decoder` with `scan_layers=True` holding `model`'s weights (each block parameter
    stacked to `[num_layers, ...]`). `model` is not modified. Raises ValueError if it is already
    stacked."""
    if model.config.scan_layers:
        raise ValueError("model: its layers are already stacked (config.scan_layers=True)")
    return _relayout(model, True)


def unstack_layers(model: Decoder) -> Decoder:
    """A new `Decoder` with `scan_layers=False` holding `model`'s weights (the per-layer layout HF
    import / export use). `model` is not modified. Raises ValueError if it is not stacked."""
    if not model.config.scan_layers:
        raise ValueError("model: its layers are not stacked (config.scan_layers=False)")
    return _relayout(model, False)
