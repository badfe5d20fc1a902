"""HF `config.json` <-> our model configs, field by field (text decoders here; vision in `vision_configs`).

Supported `model_type`s: "llama" and "qwen2" (-> `DecoderConfig`), "clip_vision_model" and "clip"
(-> the CLIP vision tower), "llava" and "internvl" (-> `MultimodalConfig`). Anything the decoder
cannot compute exactly is refused rather than approximated: a rope type other than "default"
(e.g. Llama-3's "llama3" scaling), an activation other than SiLU, Llama's `attention_bias` /
`mlp_bias` (biases on o_proj / the MLP), Qwen2's sliding window.

Our decoders that transformers has no field for (a bidirectional masked denoiser, `output_size <
vocab_size`) are written with an extra `"dfm": {"causal": ..., "output_size": ...}` object, which
transformers keeps as an attribute and ignores; see `docs/checkpoints.md`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dfm.hf.safetensors_io import CheckpointError
from dfm.models.config import DecoderConfig

CONFIG_FILE = "config.json"
TEXT_MODEL_TYPES = ("llama", "qwen2")
VISION_MODEL_TYPES = ("clip_vision_model", "clip")
MULTIMODAL_MODEL_TYPES = ("llava", "internvl")
SUPPORTED_MODEL_TYPES = TEXT_MODEL_TYPES + VISION_MODEL_TYPES + MULTIMODAL_MODEL_TYPES
RUNTIME_FIELDS = ("attention", "matmul_precision", "remat", "scan_layers")
"""Config fields that say how our model computes (kernels, precision, memory, layout), not what the
checkpoint holds: chosen at import (`dfm.hf.load_pretrained`), never written to `config.json`."""


class UnsupportedModelError(CheckpointError):
    """A `config.json` whose `model_type` (or a feature of it) this package cannot load."""


def read_config(path: str | os.PathLike) -> tuple[dict, Path]:
    """Read `config.json` of a checkpoint directory (or the given json file).

    Returns `(config dict, file)`. Raises CheckpointError naming the file when it is missing, not
    JSON, or not a JSON object.
    """
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: no such config file")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config, file


def model_type(config: dict, source: Any) -> str:
    """The `model_type` of an HF config dict, checked against `SUPPORTED_MODEL_TYPES`.

    Raises:
      UnsupportedModelError: naming `source` (the file) and the value, when missing or unsupported.
    """
    value = config.get("model_type")
    if value not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: unsupported model_type {value!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return value


def _require(config: dict, name: str, source: Any, where: str = "") -> Any:
    if name not in config or config[name] is None:
        raise CheckpointError(f"{source}: missing config field {where}{name!r}")
    return config[name]


def rope_theta(config: dict, source: Any, where: str = "") -> float:
    """`rope_theta` from `rope_parameters` (transformers 5) or the top level (older files).

    Raises UnsupportedModelError for a rope type other than "default" (or a legacy `rope_scaling`).
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(
            f"{source}: {where}rope type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def torch_dtype_name(config: dict) -> str | None:
    """The checkpoint's declared dtype (`dtype`, or the older `torch_dtype`), e.g. "bfloat16"."""
    value = config.get("dtype", config.get("torch_dtype"))
    return value if isinstance(value, str) else None


def decoder_config_from_hf(config: dict, source: Any, *, dtype: str | None = None,
                           param_dtype: str | None = None, where: str = "", attention: str = "auto",
                           matmul_precision: str = "highest") -> DecoderConfig:
    """`DecoderConfig` of an HF `LlamaConfig` / `Qwen2Config` dict.

    Args:
      config: the config dict (for LLaVA / InternVL: its `text_config`).
      source: the file, for messages; where: prefix for field names in messages ("text_config.").
      dtype, param_dtype: our compute / parameter dtype names (default "float32").
      attention, matmul_precision: our runtime knobs (`DecoderConfig`; no HF field holds them;
        "highest" by default on import, see `dfm.hf.load_pretrained`).

    Raises:
      UnsupportedModelError: a model_type other than llama / qwen2, or an unsupported feature
        (see the module doc), naming `source` and the field.
      CheckpointError: a required field missing; ValueError from `DecoderConfig` for bad sizes.
    """
    kind = config.get("model_type")
    if kind not in TEXT_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: unsupported {where}model_type {kind!r} for a decoder (supported: {', '.join(TEXT_MODEL_TYPES)})")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: {where}hidden_act {act!r} is not supported (only 'silu')")
    if kind == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise UnsupportedModelError(f"{source}: {where}{flag}=true is not supported for llama")
    if kind == "qwen2" and config.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: {where}use_sliding_window=true is not supported")
    extra = config.get("dfm") or {}
    num_heads = int(_require(config, "num_attention_heads", source, where))
    hidden = int(_require(config, "hidden_size", source, where))
    head_dim = config.get("head_dim")
    return DecoderConfig(
        vocab_size=int(_require(config, "vocab_size", source, where)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", source, where)),
        num_layers=int(_require(config, "num_hidden_layers", source, where)),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=None if head_dim in (None, hidden // num_heads) else int(head_dim),
        rope_theta=rope_theta(config, source, where),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        attention_bias=kind == "qwen2",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        causal=bool(extra.get("causal", True)),
        output_size=extra.get("output_size"),
        dtype=dtype or "float32",
        param_dtype=param_dtype or dtype or "float32",
        initializer_range=float(config.get("initializer_range", 0.02)),
        attention=attention,
        matmul_precision=matmul_precision,
    )


def decoder_family(config: DecoderConfig) -> str:
    """"qwen2" for a decoder with q/k/v biases, else "llama" (Llama's `attention_bias` would add an
    o_proj bias too, which our decoder never has)."""
    return "qwen2" if config.attention_bias else "llama"


def decoder_config_to_hf(config: DecoderConfig, *, torch_dtype: str | None = None) -> dict:
    """HF config dict (`LlamaConfig` / `Qwen2Config`, via transformers' config class) of `config`.

    `torch_dtype` is written as `dtype` (default: `config.param_dtype`). A bidirectional decoder or
    `output_size != vocab_size` adds the `"dfm"` object (module doc). The runtime-only fields
    (`attention`, `matmul_precision`, `remat`, `scan_layers`) describe how our model computes, not
    the checkpoint, and are never written.
    """
    import transformers

    family = decoder_family(config)
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        hidden_act="silu", initializer_range=config.initializer_range,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if family == "llama":
        hf = transformers.LlamaConfig(**kwargs, head_dim=config.head_size, attention_bias=False, mlp_bias=False)
    else:
        hf = transformers.Qwen2Config(**kwargs)
        if config.head_dim is not None:
            hf.head_dim = config.head_size   # Qwen2 reads `getattr(config, "head_dim", hidden // heads)`
    hf.architectures = ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"]
    out = json.loads(hf.to_json_string(use_diff=True))   # what `PreTrainedConfig.save_pretrained` writes
    out["dtype"] = torch_dtype or config.param_dtype
    if not config.causal or config.num_outputs != config.vocab_size:
        out["dfm"] = {"causal": config.causal, "output_size": config.num_outputs}
    return out
