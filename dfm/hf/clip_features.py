"""CLIP image embeddings from a local HF CLIP checkpoint: the partition / routing features of images.

`clip_image_embeddings(encoder_or_dir, pixel_values)` is transformers' `CLIPModel.get_image_features`
(the post-normed class token of the last layer, `pooler_output`, times `visual_projection`),
L2-normalised, as the decentralized-generation paper's authors cluster images with CLIP ViT-B/16.
Checkpoints (`config.json` `model_type`, weights read with `dfm.hf.load_pretrained` and
`SafetensorsCheckpoint`, no torch):

| checkpoint                                   | model_type          | feature                       |
|----------------------------------------------|---------------------|-------------------------------|
| `CLIPModel`                                  | "clip"              | projected pooled output       |
| `CLIPVisionModelWithProjection`              | "clip_vision_model" | projected pooled output       |
| `CLIPVisionModel` (no `visual_projection`)   | "clip_vision_model" | pooled output (not projected) |

Pixels are NHWC float `[n, image_size, image_size, 3]`, already resized and normalised the way the
checkpoint's `CLIPImageProcessor` does (`image_mean` / `image_std`, OpenAI CLIP's by default;
`image_stats` reads them from the directory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfm.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint
from dfm.models.vision import CLIP_MEAN, CLIP_STD

PROJECTION_KEY = "visual_projection.weight"


@dataclasses.dataclass
class CLIPImageEncoder:
    """A CLIP vision tower and its optional image projection.

    Attributes:
      tower: `dfm.models.vision.CLIPVisionTower` (HF `CLIPVisionTransformer`).
      projection: `[hidden, projection_dim]` float32 (HF `visual_projection.weight` transposed), or
        None for a `CLIPVisionModel` without one.
      source: the checkpoint directory.
    """

    tower: Any
    projection: np.ndarray | None
    source: Path

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the tower takes."""
        return self.tower.config.image_size

    @property
    def dim(self) -> int:
        """Width of an embedding: `projection_dim`, or the tower's `hidden_size` without projection."""
        return int(self.projection.shape[1]) if self.projection is not None else self.tower.config.hidden_size


def load_clip_image_encoder(path: str | os.PathLike, *, matmul_precision: str = "highest") -> CLIPImageEncoder:
    """Load the vision side of a CLIP checkpoint directory (module table), as float32.

    Args:
      path: directory with `config.json` and safetensors weights.
      matmul_precision: the tower's (`dfm.hf.load_pretrained`); "highest" keeps the parity with
        transformers on GPU / TPU too.

    Raises:
      CheckpointError: missing / invalid config or weights (naming the file and key), a
        `visual_projection.weight` whose shape does not fit the tower's width.
      UnsupportedModelError: a `model_type` other than "clip" / "clip_vision_model".
    """
    from dfm.hf import configs
    from dfm.hf.load import load_pretrained

    path = Path(path)
    hf_config, file = configs.read_config(path)
    kind = configs.model_type(hf_config, file)
    if kind not in configs.VISION_MODEL_TYPES:
        raise configs.UnsupportedModelError(f"{file}: model_type {kind!r} is not a CLIP checkpoint "
                                            f"(expected one of {configs.VISION_MODEL_TYPES})")
    tower = load_pretrained(path, dtype="float32", matmul_precision=matmul_precision)
    projection = None
    with SafetensorsCheckpoint(path) as ckpt:
        if PROJECTION_KEY in ckpt:
            weight = np.asarray(ckpt.get(PROJECTION_KEY), np.float32)     # torch Linear: [dim, hidden]
            hidden = tower.config.hidden_size
            if weight.ndim != 2 or weight.shape[1] != hidden:
                raise CheckpointError(f"{ckpt.file_of(PROJECTION_KEY)}: {PROJECTION_KEY!r} has shape "
                                      f"{weight.shape}, expected [projection_dim, {hidden}]")
            projection = weight.T.copy()
    return CLIPImageEncoder(tower, projection, path)


def image_stats(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`(image_mean, image_std)` of the checkpoint's image processor (`preprocessor_config.json`, or
    the `image_processor` entry of `processor_config.json`), OpenAI CLIP's when neither has them.

    Raises CheckpointError naming the file when it is not JSON or holds stats that are not 3 numbers.
    """
    path = Path(path)
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        data = data.get(entry, {}) if entry and isinstance(data, dict) else data
        if isinstance(data, dict) and "image_mean" in data and "image_std" in data:
            mean, std = data["image_mean"], data["image_std"]
            ok = all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                     for v in (mean, std))
            if not ok or min(std) <= 0:
                raise CheckpointError(f"{file}: image_mean / image_std must be 3 numbers each (std > 0), "
                                      f"got {mean!r}, {std!r}")
            return tuple(map(float, mean)), tuple(map(float, std))
    return CLIP_MEAN, CLIP_STD


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, pixels, projection):
    from flax import nnx

    tower = nnx.merge(graphdef, state)
    pooled = tower.pooled(pixels).astype(jnp.float32)
    if projection is not None:
        pooled = jnp.matmul(pooled, projection, precision=jax.lax.Precision.HIGHEST)
    return pooled


def clip_image_embeddings(encoder: CLIPImageEncoder | str | os.PathLike, pixel_values: Any, *,
                          batch_size: int = 64) -> np.ndarray:
    """L2-normalised CLIP image embeddings (transformers' `CLIPModel.get_image_features`, normalised).

    Args:
      encoder: a `CLIPImageEncoder`, or a checkpoint directory (`load_clip_image_encoder`).
      pixel_values: NHWC float `[n, image_size, image_size, 3]`, normalised by the checkpoint's
        processor statistics (`image_stats`).
      batch_size: images per forward pass (the last batch is padded, so one program serves all).

    Returns:
      float64 `[n, dim]` with unit rows (a zero embedding stays zero); `dim` = `encoder.dim`.

    Raises:
      ValueError: `pixel_values` not `[n, image_size, image_size, 3]` (naming it), `batch_size` < 1.
      CheckpointError / UnsupportedModelError: as `load_clip_image_encoder`.
    """
    from flax import nnx

    if not isinstance(encoder, CLIPImageEncoder):
        encoder = load_clip_image_encoder(encoder)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    x = np.asarray(pixel_values, np.float32)
    s = encoder.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, encoder.tower.config.num_channels):
        raise ValueError(f"pixel_values: expected NHWC [n, {s}, {s}, 3] for {encoder.source}, got {x.shape}")
    graphdef, state = nnx.split(encoder.tower)
    projection = None if encoder.projection is None else jnp.asarray(encoder.projection)
    out = np.zeros((len(x), encoder.dim), np.float64)
    batch = min(batch_size, max(len(x), 1))
    for start in range(0, len(x), batch):
        rows = x[start:start + batch]
        pad = np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)]) if len(rows) < batch else rows
        out[start:start + len(rows)] = np.asarray(_embed(graphdef, state, jnp.asarray(pad), projection),
                                                  np.float64)[: len(rows)]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def resize_bicubic(images_uint8: Any, size: int) -> np.ndarray:
    """uint8 `[n, h, w, 3]` -> uint8 `[n, size, size, 3]`, each image resized with PIL's bicubic
    filter (`CLIPImageProcessor`'s ``resample=BICUBIC``; a square image needs no crop); returned
    unchanged when already `size` x `size`.

    Raises:
      ValueError: `images_uint8` not uint8 `[n, h, w, 3]`, or `size` < 1.
    """
    from PIL import Image

    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: need uint8 [n, h, w, 3], got {images.dtype} {images.shape}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: must be a positive int, got {size!r}")
    if images.shape[1:3] == (size, size):
        return images
    if not len(images):
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images])


def routing_image_embeddings(encoder: CLIPImageEncoder, images_uint8: Any, image_mean, image_std, *,
                             batch_size: int = 64) -> np.ndarray:
    """The routing features of uint8 images `[n, h, w, 3]` for a CLIP-partitioned model: resized
    bicubic to the encoder's image size (`resize_bicubic`), normalised with `image_mean` / `image_std`
    (3 floats each, the checkpoint's processor's), then `clip_image_embeddings`: float64 `[n, dim]`
    unit rows."""
    from dfm.models.vision import normalize_pixels

    px = normalize_pixels(resize_bicubic(images_uint8, encoder.image_size), tuple(image_mean), tuple(image_std))
    return clip_image_embeddings(encoder, px, batch_size=batch_size)
