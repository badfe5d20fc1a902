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

Runtime knobs (`dfm.hf.configs.RUNTIME_FIELDS`; no HF field holds them, none is written on export):
`matmul_precision` defaults to "highest" on import, so an imported float32 model multiplies in
full float32 on GPU / TPU too and its logits match transformers' as closely as on CPU (JAX's
"default" there is TF32 / bf16 passes, ~1e-3 relative off); training code may pass "default" for
speed. bf16 / fp16 compute is unaffected by it. `attention` ("auto") picks the attention kernel;
`scan_layers=True` (decoders) returns the model with its layers stacked for `nnx.scan`
(`dfm.models.stack_layers`). See docs/accelerators.md.
"""
from __future__ import annotations

import os

from flax import nnx

from dfm.hf import configs, vision_io
from dfm.hf.mapping import DECODER_RULES
from dfm.hf.safetensors_io import SafetensorsCheckpoint
from dfm.hf.weights import Adapt, abstract_model, assign_weights, check_unused, checkpoint_dtypes
from dfm.models.numerics import ATTENTION_IMPLEMENTATIONS, MATMUL_PRECISIONS, check_choice


def check_runtime_knobs(attention: str, matmul_precision: str) -> None:
    """ValueError naming the argument for an unknown `attention` / `matmul_precision` (checked
    before any file is read)."""
    check_choice("attention", attention, ATTENTION_IMPLEMENTATIONS)
    check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)


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
                 strict: bool = False, matmul_precision: str = "highest", attention: str = "auto",
                 scan_layers: bool = False):
    """Load an HF Llama / Qwen2 directory as a `dfm.models.Decoder` (see `load_pretrained`).

    The weights are read into the per-layer layout; `scan_layers=True` then returns
    `dfm.models.stack_layers(model)` (same weights and logits, layers stacked for `nnx.scan`).
    """
    from dfm.models import Decoder, stack_layers

    check_runtime_knobs(attention, matmul_precision)
    hf_config, file = configs.read_config(path)
    kind = configs.model_type(hf_config, file)
    if kind not in configs.TEXT_MODEL_TYPES:
        raise configs.UnsupportedModelError(f"{file}: model_type {kind!r} is not a text decoder")
    with SafetensorsCheckpoint(path) as ckpt:
        compute, params = checkpoint_dtypes(ckpt, hf_config, dtype, param_dtype)
        config = configs.decoder_config_from_hf(hf_config, file, dtype=compute, param_dtype=params,
                                                attention=attention, matmul_precision=matmul_precision)
        model = abstract_model(lambda rngs: Decoder(config, rngs=rngs))
        used = assign_weights(model, ckpt, DECODER_RULES, source=ckpt.source, adapt=_decoder_adapt(config))
        check_unused(ckpt, used, strict, ignore=("lm_head.weight",) if config.tie_word_embeddings else ())
    return stack_layers(model) if scan_layers else model


def load_pretrained(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                    strict: bool = False, matmul_precision: str = "highest", attention: str = "auto",
                    scan_layers: bool = False) -> nnx.Module:
    """Load a local HF model directory (`config.json` + safetensors) into the matching NNX model.

    Args:
      path: directory with `config.json` and `model.safetensors` or `model.safetensors.index.json`.
      dtype: computation dtype name ("float32", "bfloat16", ...); None: the checkpoint's.
      param_dtype: parameter dtype name; None: `dtype`, else the checkpoint's stored dtype.
      strict: also fail when the checkpoint has tensors the model does not use (a tied `lm_head`,
        RoPE `inv_freq` buffers are always ignored).
      matmul_precision: "highest" (default) | "high" | "default", the `matmul_precision` of the
        model's configs (text and vision). "highest": full float32 matmuls on GPU / TPU as on
        CPU, so an imported float32 checkpoint keeps its parity with transformers; training code
        may pass "default" (faster TF32 / bf16-pass float32 matmuls). bf16 compute is unaffected.
      attention: "auto" (default) | "xla" | "cudnn", the attention kernel (`dfm.models.attention`;
        "auto" = cuDNN flash attention on a GPU for bf16 / fp16 compute, XLA otherwise).
      scan_layers: decoders only: return the model with its layers stacked for `nnx.scan`
        (`DecoderConfig.scan_layers`); export unstacks them again.

    Returns:
      `Decoder` (llama, qwen2), `CLIPVisionTower` (clip_vision_model, clip) or `MultimodalModel`
      (llava, internvl), parameters filled, ready to call.

    Raises:
      CheckpointError: missing / invalid `config.json` or weights, truncated or corrupt safetensors
        file, missing tensor or wrong shape (naming the file and key).
      UnsupportedModelError: unsupported `model_type` or feature (naming the file and value).
      ValueError: an unknown `matmul_precision` / `attention`, or `scan_layers=True` for a model
        that is not a text decoder (naming the argument).
    """
    check_runtime_knobs(attention, matmul_precision)
    hf_config, file = configs.read_config(path)
    kind = configs.model_type(hf_config, file)
    if kind in configs.TEXT_MODEL_TYPES:
        return load_decoder(path, dtype=dtype, param_dtype=param_dtype, strict=strict,
                            matmul_precision=matmul_precision, attention=attention, scan_layers=scan_layers)
    if scan_layers:
        raise ValueError(f"scan_layers: only a text decoder (llama, qwen2) loads with stacked layers, "
                         f"{file} is a {kind!r} model")
    return vision_io.load_vision_or_multimodal(path, kind, hf_config, file, dtype=dtype, param_dtype=param_dtype,
                                                 strict=strict, matmul_precision=matmul_precision,
                                                 attention=attention)

