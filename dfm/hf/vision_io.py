"""Load / export the CLIP vision tower and the LLaVA / InternVL models (see `dfm.hf.load`, `dfm.hf.export`).

Key prefixes (`dfm.hf.mapping`), export form first (what transformers 5's `save_pretrained` writes):

- CLIP tower alone (`CLIPVisionModel`): none, or `vision_model.` (transformers 4 and `CLIPModel` files).
- LLaVA / InternVL: `language_model.model.` | `model.language_model.`; `language_model.lm_head.` |
  `lm_head.`; `vision_tower.` | `model.vision_tower.` (CLIP towers also with `vision_model.` after
  it, as hub LLaVA files have); `multi_modal_projector.` | `model.multi_modal_projector.`.

Torch layouts: conv `weight (out, in, kh, kw)` <-> our `kernel [kh, kw, in, out]`; InternViT's
`cls_token [1, 1, D]` and `position_embeddings [1, N + 1, D]` are stored as in HF.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from dfm.hf.mapping import Rule
from dfm.hf.safetensors_io import SafetensorsCheckpoint
from dfm.hf.weights import abstract_model, assign_weights, check_unused, checkpoint_dtypes, hf_state_dict

CLIP_RULES = (Rule((), ("", "vision_model.")),)


def multimodal_rules(vision_arch: str) -> tuple[Rule, ...]:
    """Key rules of a `MultimodalModel` whose tower is `vision_arch` ("clip" or "internvit")."""
    inner = ("", "vision_model.") if vision_arch == "clip" else ("",)
    vision = tuple(outer + i for outer in ("vision_tower.", "model.vision_tower.") for i in inner)
    return (
        Rule(("language_model",), ("language_model.model.", "model.language_model.", "language_model.")),
        Rule(("language_model", "lm_head"), ("language_model.lm_head.", "lm_head.")),
        Rule(("vision_tower",), vision),
        Rule(("multi_modal_projector",), ("multi_modal_projector.", "model.multi_modal_projector.")),
    )


def load_vision_or_multimodal(path: str | os.PathLike, kind: str, hf_config: dict, file: Any, *,
                              dtype: str | None, param_dtype: str | None, strict: bool,
                              matmul_precision: str = "highest", attention: str = "auto") -> nnx.Module:
    """`load_pretrained` for "clip_vision_model" / "clip" (-> `CLIPVisionTower`) and "llava" /
    "internvl" (-> `MultimodalModel`). Arguments and errors as `dfm.hf.load_pretrained`."""
    from dfm.hf import vision_configs
    from dfm.models.multimodal import MultimodalModel
    from dfm.models.vision import CLIPVisionTower

    with SafetensorsCheckpoint(path) as ckpt:
        compute, params = checkpoint_dtypes(ckpt, hf_config, dtype, param_dtype)
        knobs = {"attention": attention, "matmul_precision": matmul_precision}
        if kind in ("clip_vision_model", "clip"):
            config = vision_configs.vision_config_from_hf(hf_config, file, dtype=compute, param_dtype=params, **knobs)
            model = abstract_model(lambda rngs: CLIPVisionTower(config, rngs=rngs))
            used = assign_weights(model, ckpt, CLIP_RULES, source=ckpt.source)
            ignore = [k for k in ckpt.keys() if not k.startswith(("vision_model.", "embeddings.", "encoder.",
                                                                   "pre_layrnorm.", "post_layernorm."))]
        else:
            config = vision_configs.multimodal_config_from_hf(hf_config, file, dtype=compute, param_dtype=params,
                                                              **knobs)
            model = abstract_model(lambda rngs: MultimodalModel(config, rngs=rngs))
            used = assign_weights(model, ckpt, multimodal_rules(config.vision.arch), source=ckpt.source)
            ignore = [k for k in ckpt.keys() if k.endswith("lm_head.weight")] if config.text.tie_word_embeddings else []
        check_unused(ckpt, used, strict, ignore=ignore)
    return model


def export_contents(model: nnx.Module, *, dtype: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """`(HF config dict, HF tensors)` of a `CLIPVisionTower` or `MultimodalModel` (TypeError otherwise)."""
    from dfm.hf import vision_configs
    from dfm.models.multimodal import MultimodalModel
    from dfm.models.vision import CLIPVisionTower

    if isinstance(model, CLIPVisionTower):
        config = vision_configs.vision_config_to_hf(model.config)
        if dtype is not None:
            config["dtype"] = dtype
        return config, hf_state_dict(model, CLIP_RULES, dtype=dtype)
    if isinstance(model, MultimodalModel):
        model = per_layer_multimodal(model)
        c = model.config
        config = vision_configs.multimodal_config_to_hf(c, torch_dtype=dtype)
        return config, hf_state_dict(model, multimodal_rules(c.vision.arch), dtype=dtype)
    raise TypeError(f"model: cannot export a {type(model).__name__} (supported: Decoder, CLIPVisionTower, "
                    "MultimodalModel)")


def per_layer_multimodal(model: nnx.Module) -> nnx.Module:
    """`model` (a `MultimodalModel`) with its language model's layers per layer, as HF stores them: a
    new model holding the same weights when `config.text.scan_layers` (`dfm.models.unstack_layers`),
    else `model` itself."""
    from dfm.models import unstack_layers
    from dfm.models.multimodal import MultimodalModel

    c = model.config
    if not c.text.scan_layers:
        return model
    config = c.replace(text=c.text.replace(scan_layers=False))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MultimodalModel(config, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(nnx.state(model))
    pure["language_model"] = nnx.to_pure_dict(nnx.state(unstack_layers(model.language_model)))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
