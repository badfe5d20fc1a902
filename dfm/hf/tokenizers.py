"""Tokenizers through transformers, and the image-placeholder expansion of LLaVA / InternVL prompts.

- `load_tokenizer(path)`: `transformers.AutoTokenizer.from_pretrained` on a local directory.
- `tokenizer_fingerprint(tokenizer)`: a hash of the vocabulary and special tokens, the
  `dfm.decentral.ExpertSpec.tokenizer_fingerprint` that experts must share to be mixed.
- LLaVA: `LlavaProcessor` replaces each `<image>` in the text by `<image>` repeated once per
  image feature; `llava_num_image_tokens` counts them from the config and `expand_llava_prompt`
  does the replacement (same string as the processor, without needing an image).
- InternVL: `InternVLProcessor` replaces each `<IMG_CONTEXT>` by
  `<img>` + `<IMG_CONTEXT>` * (image_seq_length * num_patches) + `</img>`; its image processor
  needs torchvision, so `expand_internvl_prompt` does this here (transformers 5,
  `processing_internvl.py`, `replace_image_token`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from dfm.hf.safetensors_io import CheckpointError

LLAVA_IMAGE_TOKEN = "<image>"
INTERNVL_CONTEXT_TOKEN = "<IMG_CONTEXT>"
INTERNVL_START_TOKEN = "<img>"
INTERNVL_END_TOKEN = "</img>"


def load_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """`transformers.AutoTokenizer.from_pretrained(path, **kwargs)` for a local directory.

    Raises:
      CheckpointError: `path` is not a directory, or transformers cannot build a tokenizer from
        it (naming the directory and transformers' message).
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such tokenizer directory")
    try:
        return transformers.AutoTokenizer.from_pretrained(os.fspath(path), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of the tokenizer's vocabulary (token -> id, added tokens included) and special tokens.

    Two tokenizers with the same fingerprint map every token string to the same id, which is
    what mixing the experts' distributions needs (`dfm.decentral.check_compatible_experts`).
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _vision_sizes(vision_config: dict) -> tuple[int, int]:
    image, patch = vision_config.get("image_size"), vision_config.get("patch_size")
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if not isinstance(image, int) or not isinstance(patch, int) or patch < 1 or image % patch:
        raise ValueError(f"vision_config: image_size {image!r} must be a multiple of patch_size {patch!r}")
    return image, patch


def llava_num_image_tokens(config: dict) -> int:
    """Image features per image of an HF LLaVA config dict: `(image_size // patch_size) ** 2`, plus
    one (the CLS token) when `vision_feature_select_strategy == "full"`."""
    image, patch = _vision_sizes(config["vision_config"])
    extra = 1 if config.get("vision_feature_select_strategy", "default") == "full" else 0
    return (image // patch) ** 2 + extra


def internvl_num_image_tokens(config: dict) -> int:
    """`image_seq_length` of an HF InternVL config dict: `(image_size // patch_size) ** 2 *
    downsample_ratio ** 2` (the CLS token is dropped, pixel shuffle merges 1/ratio^2 patches)."""
    image, patch = _vision_sizes(config["vision_config"])
    side = (image // patch) * float(config.get("downsample_ratio", 0.5))
    if side != int(side):
        raise ValueError(f"config: {image // patch} patches per side times downsample_ratio is not an integer")
    return int(side) ** 2


def _replace_each(text: str, placeholder: str, replacement: str, name: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string, got {type(text).__name__}")
    return re.sub(re.escape(placeholder), lambda _: replacement, text)


def expand_llava_prompt(text: str, num_image_tokens: int, image_token: str = LLAVA_IMAGE_TOKEN) -> str:
    """Replace every `image_token` in `text` by `num_image_tokens` copies of it (as `LlavaProcessor`)."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens: must be >= 1, got {num_image_tokens}")
    return _replace_each(text, image_token, image_token * num_image_tokens, "text")


def expand_internvl_prompt(text: str, num_image_tokens: int, *, num_patches: int = 1,
                           placeholder: str = INTERNVL_CONTEXT_TOKEN, context_token: str = INTERNVL_CONTEXT_TOKEN,
                           start_token: str = INTERNVL_START_TOKEN, end_token: str = INTERNVL_END_TOKEN) -> str:
    """Replace every `placeholder` by `<img>` + `<IMG_CONTEXT>` * (num_image_tokens * num_patches) + `</img>`.

    Args:
      text: the prompt (transformers' InternVL chat template writes one `<IMG_CONTEXT>` per image).
      num_image_tokens: `image_seq_length` (`internvl_num_image_tokens`).
      num_patches: image tiles per image (1 without InternVL's dynamic tiling).
    """
    if num_image_tokens < 1 or num_patches < 1:
        raise ValueError(f"num_image_tokens and num_patches must be >= 1, got {num_image_tokens}, {num_patches}")
    return _replace_each(text, placeholder, start_token + context_token * (num_image_tokens * num_patches)
                         + end_token, "text")
