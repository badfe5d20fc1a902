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

from flax import nnx

from dfm.hf import configs, vision_io
from dfm.hf.mapping import DECODER_RULES
from dfm.hf.safetensors_io import SafetensorsCheckpoint
from dfm.hf.weights import Adapt, abstract_model, assign_weights, check_unused, checkpoint_dtypes


def _decoder_adapt(config) -> Adapt | None:
    """Drop the zero rows a padded `lm_head` carries beyond `output_size` (see `dfm.hf.export`)."""
    if config.tie_word_embeddings or config.num_outputs == config.vocab_size:
        return None

    def adapt(path, value):
        if tuple(path) == ("lm_head", "kernel") and value.shape[0] > config.num_outputs:
            return value[: config.num_outputs]
        return value
    return adapt


def load_decoder(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                 strict: bool = False):
    """Load an HF Llama / Qwen2 directory as a `dfm.models.Decoder` (see `load_pretrained`)."""
    from dfm.models import Decoder

    hf_config, file = configs.read_config(path)
    kind = configs.model_type(hf_config, file)
    if kind not in configs.TEXT_MODEL_TYPES:
        raise configs.UnsupportedModelError(f"{file}: model_type {kind!r} is not a text decoder")
    with SafetensorsCheckpoint(path) as ckpt:
        compute, params = checkpoint_dtypes(ckpt, hf_config, dtype, param_dtype)
        config = configs.decoder_config_from_hf(hf_config, file, dtype=compute, param_dtype=params)
        model = abstract_model(lambda rngs: Decoder(config, rngs=rngs))
        used = assign_weights(model, ckpt, DECODER_RULES, source=ckpt.source, adapt=_decoder_adapt(config))
        check_unused(ckpt, used, strict, ignore=("lm_head.weight",) if config.tie_word_embeddings else ())
    return model


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
    return vision_io.load_vision_or_multimodal(path, kind, hf_config, file, dtype=dtype,
                                                 param_dtype=param_dtype, strict=strict)

