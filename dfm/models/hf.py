"""Parameter names of HF transformers' LLaMA / Qwen2 causal LMs, mapped onto our `Decoder`.

Our parameter paths follow `LlamaForCausalLM` / `Qwen2ForCausalLM` with the `model.` prefix dropped
(`layers.0.self_attn.q_proj`, `norm`, `embed_tokens`, `lm_head`); flax `kernel`s are the torch
`weight`s transposed (torch Linear weights are `(out, in)`), norm `scale`s and the `embedding` are the
`weight`s as they are, and `bias` is `bias`.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def hf_name(path: tuple) -> str:
    """The HF state-dict key of one of our parameter paths, e.g. `("norm", "scale") -> "model.norm.weight"`."""
    module = ".".join(str(p) for p in path[:-1])
    prefix = module if module == "lm_head" else "model." + module
    return prefix + (".bias" if path[-1] == "bias" else ".weight")


def assign_hf_weights(model: nnx.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Write HF LLaMA / Qwen2 weights into `model` (a `dfm.models.Decoder`) in place.

    Args:
      model: the decoder whose config matches the checkpoint.
      weights: HF state-dict names -> arrays (e.g. `{k: v.numpy() for k, v in hf.state_dict().items()}`).

    Raises:
      ValueError: a parameter of `model` has no tensor in `weights` (naming the key), or a shape
        differs (naming the key and both shapes).
    """
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = hf_name(path)
        if key not in weights:
            raise ValueError(f"weights: missing tensor {key!r} for parameter {'.'.join(map(str, path))}")
        value = np.asarray(weights[key])
        if path[-1] == "kernel":
            value = value.T
        if value.shape != tuple(var.shape):
            raise ValueError(f"weights: {key!r} has shape {value.shape} (as stored here), expected {tuple(var.shape)}")
        var[...] = jnp.asarray(value, var.dtype)
