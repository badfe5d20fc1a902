"""HF vision / multimodal `config.json` <-> `VisionConfig` / `MultimodalConfig`, field by field.

- `CLIPVisionConfig` ("clip_vision_model"; or the `vision_config` of a "clip" `CLIPConfig`) <->
  `VisionConfig(arch="clip")`.
- `InternVLVisionConfig` ("internvl_vision") <-> `VisionConfig(arch="internvit")`; square images
  and patches only.
- `LlavaConfig` ("llava": CLIP tower + Llama / Qwen2) and `InternVLConfig` ("internvl": InternViT +
  Qwen2 / Llama) <-> `MultimodalConfig`. Tied word embeddings follow the top-level
  `tie_word_embeddings` (what transformers ties by); for LLaVA a tied `text_config` also ties
  (`LlavaConfig.__post_init__`). A list-valued `vision_feature_layer` is refused.
"""
from __future__ import annotations

import json
from typing import Any

from dfm.hf.configs import CheckpointError, UnsupportedModelError, decoder_config_from_hf, decoder_config_to_hf
from dfm.models.multimodal import MultimodalConfig
from dfm.models.vision import ACTIVATION_NAMES, VisionConfig


def _square(value: Any, name: str, source: Any, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UnsupportedModelError(f"{source}: {where}{name} {list(value)} is not square (only square is supported)")
        value = value[0]
    if not isinstance(value, int):
        raise CheckpointError(f"{source}: {where}{name} must be an int, got {value!r}")
    return value


def _get(config: dict, name: str, source: Any, where: str) -> Any:
    if config.get(name) is None:
        raise CheckpointError(f"{source}: missing config field {where}{name!r}")
    return config[name]


def _act(config: dict, name: str, default: str, source: Any, where: str) -> str:
    act = config.get(name, default)
    if act not in ACTIVATION_NAMES:
        raise UnsupportedModelError(f"{source}: {where}{name} {act!r} is not supported (supported: {ACTIVATION_NAMES})")
    return act


def vision_config_from_hf(config: dict, source: Any, *, dtype: str = "float32", param_dtype: str = "float32",
                          where: str = "", attention: str = "auto", matmul_precision: str = "highest") -> VisionConfig:
    """`VisionConfig` of a CLIP ("clip_vision_model", or "clip" via its `vision_config`) or InternViT
    ("internvl_vision") config dict. `attention` / `matmul_precision`: our runtime knobs (no HF
    field; "highest" by default on import, see `dfm.hf.load_pretrained`).

    Raises UnsupportedModelError (another model_type, non-square sizes, unknown activation) or
    CheckpointError (missing field), naming `source` and the field.
    """
    kind = config.get("model_type")
    if kind == "clip":
        vision = {"model_type": "clip_vision_model", **_get(config, "vision_config", source, where)}
        return vision_config_from_hf(vision, source, dtype=dtype, param_dtype=param_dtype,
                                     where=where + "vision_config.", attention=attention,
                                     matmul_precision=matmul_precision)
    common = dict(
        image_size=_square(_get(config, "image_size", source, where), "image_size", source, where),
        patch_size=_square(_get(config, "patch_size", source, where), "patch_size", source, where),
        hidden_size=int(_get(config, "hidden_size", source, where)),
        intermediate_size=int(_get(config, "intermediate_size", source, where)),
        num_layers=int(_get(config, "num_hidden_layers", source, where)),
        num_heads=int(_get(config, "num_attention_heads", source, where)),
        num_channels=int(config.get("num_channels", 3)),
        initializer_range=float(config.get("initializer_range", 0.02)),
        dtype=dtype, param_dtype=param_dtype, attention=attention, matmul_precision=matmul_precision)
    if kind == "clip_vision_model":
        return VisionConfig(**common, arch="clip", layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                            hidden_act=_act(config, "hidden_act", "quick_gelu", source, where))
    if kind == "internvl_vision":
        norm = config.get("norm_type", "layer_norm")
        if norm not in ("layer_norm", "rms_norm"):
            raise UnsupportedModelError(f"{source}: {where}norm_type {norm!r} is not supported")
        return VisionConfig(
            **common, arch="internvit", layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
            hidden_act=_act(config, "hidden_act", "gelu", source, where),
            attention_bias=bool(config.get("attention_bias", False)),
            use_qk_norm=bool(config.get("use_qk_norm", False)), norm_type=norm,
            layer_scale_init=float(config.get("layer_scale_init_value", 0.1)),
            use_mean_pooling=bool(config.get("use_mean_pooling", True)),
            use_absolute_position_embeddings=bool(config.get("use_absolute_position_embeddings", True)))
    raise UnsupportedModelError(f"{source}: unsupported {where}model_type {kind!r} for a vision tower "
                                "(supported: clip_vision_model, clip, internvl_vision)")


def vision_config_to_hf(config: VisionConfig) -> dict:
    """HF config dict of `config` (via transformers' `CLIPVisionConfig` / `InternVLVisionConfig`);
    the runtime knobs (`attention`, `matmul_precision`) are not written."""
    import transformers

    common = dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_channels=config.num_channels, image_size=config.image_size, patch_size=config.patch_size,
                  hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                  initializer_range=config.initializer_range)
    if config.arch == "clip":
        hf = transformers.CLIPVisionConfig(**common)
        hf.architectures = ["CLIPVisionModel"]
    else:
        hf = transformers.InternVLVisionConfig(
            **common, attention_bias=config.attention_bias, use_qk_norm=config.use_qk_norm,
            norm_type=config.norm_type, layer_scale_init_value=config.layer_scale_init,
            use_mean_pooling=config.use_mean_pooling,
            use_absolute_position_embeddings=config.use_absolute_position_embeddings)
        hf.architectures = ["InternVLVisionModel"]
    out = json.loads(hf.to_json_string(use_diff=True))
    out["dtype"] = config.param_dtype
    return out


def _tied(config: dict, kind: str, text: dict) -> bool:
    if kind == "internvl":
        return bool(config.get("tie_word_embeddings", True))
    return bool(config.get("tie_word_embeddings", False)) or bool(text.get("tie_word_embeddings", False))


def multimodal_config_from_hf(config: dict, source: Any, *, dtype: str = "float32", param_dtype: str = "float32",
                              attention: str = "auto", matmul_precision: str = "highest") -> MultimodalConfig:
    """`MultimodalConfig` of an HF "llava" / "internvl" config dict (module doc); `attention` and
    `matmul_precision` go into both the vision and the text config.

    Raises UnsupportedModelError / CheckpointError naming `source` and the field.
    """
    kind = config.get("model_type")
    if kind not in ("llava", "internvl"):
        raise UnsupportedModelError(f"{source}: unsupported model_type {kind!r} for a multimodal model")
    vision_hf = dict(_get(config, "vision_config", source, ""))
    vision_hf.setdefault("model_type", "clip_vision_model" if kind == "llava" else "internvl_vision")
    text_hf = dict(_get(config, "text_config", source, ""))
    text_hf.setdefault("model_type", "llama" if kind == "llava" else "qwen2")
    text_hf["tie_word_embeddings"] = _tied(config, kind, text_hf)
    knobs = {"attention": attention, "matmul_precision": matmul_precision}
    vision = vision_config_from_hf(vision_hf, source, dtype=dtype, param_dtype=param_dtype, where="vision_config.",
                                   **knobs)
    want = "clip" if kind == "llava" else "internvit"
    if vision.arch != want:
        raise UnsupportedModelError(f"{source}: vision_config.model_type {vision_hf['model_type']!r} is not "
                                    f"supported for {kind}")
    text = decoder_config_from_hf(text_hf, source, dtype=dtype, param_dtype=param_dtype, where="text_config.",
                                  **knobs)
    layer = config.get("vision_feature_layer", -2 if kind == "llava" else -1)
    if not isinstance(layer, int):
        raise UnsupportedModelError(f"{source}: vision_feature_layer {layer!r} is not supported (one int layer only)")
    token = config.get("image_token_id", config.get("image_token_index"))
    if token is None:
        raise CheckpointError(f"{source}: missing config field 'image_token_id'")
    try:
        return MultimodalConfig(
            vision=vision, text=text, image_token_id=int(token), vision_feature_layer=layer,
            vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
            projector="llava" if kind == "llava" else "internvl",
            downsample_ratio=1.0 if kind == "llava" else float(config.get("downsample_ratio", 0.5)),
            projector_hidden_act=_act(config, "projector_hidden_act", "gelu", source, ""),
            multimodal_projector_bias=bool(config.get("multimodal_projector_bias", True)) if kind == "llava" else True)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def multimodal_config_to_hf(config: MultimodalConfig, *, torch_dtype: str | None = None) -> dict:
    """HF `LlavaConfig` / `InternVLConfig` dict of `config` (via transformers' config classes)."""
    import transformers

    want = {"llava": "clip", "internvl": "internvit"}[config.projector]
    if config.vision.arch != want:
        raise ValueError(f"config: a {config.projector!r} checkpoint needs a {want!r} tower (the HF class "
                         f"pairs them), got vision.arch={config.vision.arch!r}")
    text = decoder_config_to_hf(config.text, torch_dtype=torch_dtype)
    vision = vision_config_to_hf(config.vision)
    for sub in (text, vision):
        for key in ("architectures", "dtype", "transformers_version"):
            sub.pop(key, None)
    common = dict(vision_config=vision, text_config=text, image_token_id=config.image_token_id,
                  vision_feature_layer=config.vision_feature_layer,
                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                  projector_hidden_act=config.projector_hidden_act, image_seq_length=config.num_image_tokens,
                  tie_word_embeddings=config.text.tie_word_embeddings)
    if config.projector == "llava":
        hf = transformers.LlavaConfig(**common, multimodal_projector_bias=config.multimodal_projector_bias)
        hf.architectures = ["LlavaForConditionalGeneration"]
    else:
        hf = transformers.InternVLConfig(**common, downsample_ratio=config.downsample_ratio)
        hf.architectures = ["InternVLForConditionalGeneration"]
    out = json.loads(hf.to_json_string(use_diff=True))
    out["dtype"] = torch_dtype or config.text.param_dtype
    return out
