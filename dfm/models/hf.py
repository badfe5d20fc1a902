"""Parameter names of HF transformers' LLaMA / Qwen2 causal LMs, mapped onto our `Decoder`.

A thin layer over `dfm.hf` (which also reads and writes whole checkpoint directories). Our
parameter paths follow `LlamaForCausalLM` / `Qwen2ForCausalLM` with the `model.` prefix dropped
(`layers.0.self_attn.q_proj`, `norm`, `embed_tokens`, `lm_head`); flax `kernel`s are the torch
`weight`s transposed (torch Linear weights are `(out, in)`), norm `scale`s and the `embedding` are the
`weight`s as they are, and `bias` is `bias`.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from dfm.hf.weights import assign_weights
from dfm.hf.mapping import DECODER_RULES, hf_key


def hf_name(path: tuple) -> str:
    """The HF state-dict key of one of our parameter paths, e.g. `("norm", "scale") -> "model.norm.weight"`."""
    return hf_key(DECODER_RULES, path)


def assign_hf_weights(model: nnx.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Write HF LLaMA / Qwen2 weights into `model` (a `dfm.models.Decoder`) in place.

    Args:
      model: the decoder whose config matches the checkpoint.
      weights: HF state-dict names -> arrays (e.g. `{k: v.numpy() for k, v in hf.state_dict().items()}`).

    Raises:
      ValueError: a parameter of `model` has no tensor in `weights` (naming the key), or a shape
        differs (naming the key and both shapes).
    """
    assign_weights(model, weights, DECODER_RULES, source="weights")
