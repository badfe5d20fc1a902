"""Load an HF checkpoint directory into our NNX models (no torch: safetensors read as numpy).

`load_pretrained(path)` reads `config.json`, builds the matching model without initializing it
(`nnx.eval_shape`), and fills every parameter from `model.safetensors` (or the sharded index)
through the key rules of `dfm.hf.mapping`:

| `model_type`                  | our model                                   |
|-------------------------------|---------------------------------------------|
| llama, qwen2                  | `dfm.models.Decoder`                        |
| clip_vision_model, clip       | `dfm.models.vision.CLIPVisionTower`         |
| llava, internvl               | `dfm.models.multimodal.MultimodalModel`     |

Dtypes: by default parameters keep the checkpoint's floating dtype (a bf16 checkpoint loads as
bf16 parameters computing in bf16); `dtype="float32"` casts every parameter and the computation.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.hf import configs
from dfm.hf.mapping import DECODER_RULES, Rule, hf_candidates, to_ours
from dfm.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint

Adapt = Callable[[tuple, np.ndarray], np.ndarray]


def _get(weights: Any, key: str) -> np.ndarray:
    return weights.get(key) if isinstance(weights, SafetensorsCheckpoint) else np.asarray(weights[key])


def assign_weights(model: nnx.Module, weights: Mapping[str, Any] | SafetensorsCheckpoint,
                   rules: Sequence[Rule], *, source: Any = "weights", adapt: Adapt | None = None) -> set[str]:
    """Fill every `nnx.Param` of `model` (concrete or from `nnx.eval_shape`) from HF-named tensors.

    Args:
      model: the module; its parameters' shapes and dtypes are the targets (values are cast).
      weights: HF key -> array (a dict of numpy / torch-`.numpy()` arrays, or a checkpoint).
      rules: the architecture's `dfm.hf.mapping` rules (first matching HF key is used).
      source: the file (or name) quoted in error messages.
      adapt: optional `(path, value in torch layout) -> value` hook applied before the layout change.

    Returns:
      The set of HF keys that were read.

    Raises:
      ValueError (CheckpointError for a checkpoint): a parameter with no tensor (naming `source`,
        the canonical key and the parameter), or a tensor of the wrong shape (naming the key and
        both shapes).
    """
    error = CheckpointError if isinstance(weights, SafetensorsCheckpoint) else ValueError
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        candidates = hf_candidates(rules, path)
        key = next((k for k in candidates if k in weights), None)
        name = ".".join(map(str, path))
        if key is None:
            also = f"; also tried {candidates[1:]}" if len(candidates) > 1 else ""
            raise error(f"{source}: missing tensor {candidates[0]!r} for parameter {name}{also}")
        value = _get(weights, key)
        stored = value.shape
        if adapt is not None:
            value = adapt(path, value)
        target = var.get_value()
        try:
            value = to_ours(path, value, target.shape)
        except ValueError:
            raise error(f"{source}: {key!r} has shape {stored} (as stored), which does not fit "
                        f"parameter {name} of shape {tuple(target.shape)}") from None
        var.set_value(jnp.asarray(value, dtype=target.dtype))
        used.add(key)
    return used


def _decoder_adapt(config) -> Adapt | None:
    """Drop the zero rows a padded `lm_head` carries beyond `output_size` (see `dfm.hf.export`)."""
    if config.tie_word_embeddings or config.num_outputs == config.vocab_size:
        return None

    def adapt(path, value):
        if tuple(path) == ("lm_head", "kernel") and value.shape[0] > config.num_outputs:
            return value[: config.num_outputs]
        return value
    return adapt


def _abstract(factory: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """The model with shape-only parameters (`nnx.eval_shape`), or a concrete one when it holds
    variables other than parameters (those need real initial values)."""
    model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    others = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree_util.tree_leaves(others):
        model = factory(nnx.Rngs(0))
    return model


def _dtypes(ckpt: SafetensorsCheckpoint, hf_config: dict, dtype: str | None,
            param_dtype: str | None) -> tuple[str, str]:
    stored = ckpt.floating_dtype() or configs.torch_dtype_name(hf_config) or "float32"
    compute = dtype or stored
    return compute, param_dtype or dtype or stored


def load_decoder(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                 strict: bool = False):
    """Load an HF Llama / Qwen2 directory as a `dfm.models.Decoder` (see `load_pretrained`)."""
    from dfm.models import Decoder

    hf_config, file = configs.read_config(path)
    kind = configs.model_type(hf_config, file)
    if kind not in configs.TEXT_MODEL_TYPES:
        raise configs.UnsupportedModelError(f"{file}: model_type {kind!r} is not a text decoder")
    with SafetensorsCheckpoint(path) as ckpt:
        compute, params = _dtypes(ckpt, hf_config, dtype, param_dtype)
        config = configs.decoder_config_from_hf(hf_config, file, dtype=compute, param_dtype=params)
        model = _abstract(lambda rngs: Decoder(config, rngs=rngs))
        used = assign_weights(model, ckpt, DECODER_RULES, source=ckpt.source, adapt=_decoder_adapt(config))
        _check_unused(ckpt, used, strict, ignore=("lm_head.weight",) if config.tie_word_embeddings else ())
    return model


def _check_unused(ckpt: SafetensorsCheckpoint, used: set[str], strict: bool, ignore: Sequence[str] = ()) -> None:
    if not strict:
        return
    unused = [k for k in ckpt.keys() if k not in used and k not in ignore and not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise CheckpointError(f"{ckpt.source}: {len(unused)} tensors not used by the model (strict=True), "
                              f"e.g. {unused[:5]}")


def load_pretrained(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                    strict: bool = False) -> nnx.Module:
    """Load a local HF model directory (`config.json` + safetensors) into the matching NNX model.

    Args:
      path: directory with `config.json` and `model.safetensors` or `model.safetensors.index.json`.
      dtype: computation dtype name ("float32", "bfloat16", ...); None: the checkpoint's.
      param_dtype: parameter dtype name; None: `dtype`, else the checkpoint's stored dtype.
      strict: also fail when the checkpoint has tensors the model does not use (a tied `lm_head`,
        RoPE `inv_freq` buffers are always ignored).

    Returns:
      `Decoder` (llama, qwen2), `CLIPVisionTower` (clip_vision_model, clip) or `MultimodalModel`
      (llava, internvl), parameters filled, ready to call.

    Raises:
      CheckpointError: missing / invalid `config.json` or weights, truncated or corrupt safetensors
        file, missing tensor or wrong shape (naming the file and key).
      UnsupportedModelError: unsupported `model_type` or feature (naming the file and value).
    """
    hf_config, file = configs.read_config(path)
    kind = configs.model_type(hf_config, file)
    if kind in configs.TEXT_MODEL_TYPES:
        return load_decoder(path, dtype=dtype, param_dtype=param_dtype, strict=strict)
    from dfm.hf import vision_io

    return vision_io.load_vision_or_multimodal(path, kind, hf_config, file, dtype=dtype,
                                                 param_dtype=param_dtype, strict=strict)

