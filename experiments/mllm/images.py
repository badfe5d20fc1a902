"""Image loading and normalisation for the vision encoder.

`load_image` follows InternVL's ``build_transform`` (``T.Resize((s, s), BICUBIC)`` after
``convert('RGB')``): the whole image is resized to a square, aspect ratio not kept, with PIL's
area (``BOX``) filter when no axis is enlarged (less aliasing when shrinking photos to the small
images of the default dataset) and bicubic interpolation otherwise. `normalize` then applies per-channel mean / std:
CLIP's for LLaVA (``CLIPImageProcessor``), ImageNet's for InternVL.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dfm.hf.clip_features import resize_bicubic
from dfm.io import atomic_path
from experiments.mllm.formats import FormatError

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (CLIP, LLaVA).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers.image_utils.IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD (InternVL).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnreadableImageError(FormatError):
    """An image file is missing, corrupt or not an image; the message names the file."""


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read an image as RGB, resized to a `size` x `size` square.

    Args:
      path: any format PIL reads (PNG, JPEG, ...); grey, palette and RGBA images are converted
        with ``convert("RGB")`` (alpha dropped).
      size: output side in pixels (> 0).

    Returns:
      float32 array [size, size, 3] with values in [0, 1] (uint8 / 255).

    Raises:
      UnreadableImageError: the file is missing, truncated or not an image (names the file).
      ValueError: if `size` < 1.
    """
    if size < 1:
        raise ValueError(f"size: must be >= 1, got {size}")
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if rgb.size != (size, size):
        shrink = size <= min(rgb.size)  # no axis enlarged
        rgb = rgb.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[n, h, w, 3]` -> uint8 `[n, size, size, 3]`: `dfm.hf.clip_features.resize_bicubic`
    (PIL bicubic, `CLIPImageProcessor`'s ``resample=BICUBIC``).

    Raises:
      ValueError: `images` not uint8 `[n, h, w, 3]`, or `size` < 1.
    """
    return resize_bicubic(images, size)


def load_images(paths: Sequence[str | os.PathLike], size: int) -> np.ndarray:
    """`load_image` of each path, stacked: float32 [len(paths), size, size, 3] in [0, 1]."""
    out = np.empty((len(paths), size, size, 3), np.float32)
    for i, p in enumerate(paths):
        out[i] = load_image(p, size)
    return out


def normalize(images: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """``(images - mean) / std`` per channel.

    Args:
      images: float array [..., 3] with values in [0, 1] (e.g. [batch, height, width, 3]).
      mean, std: per-channel (R, G, B) statistics, e.g. `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` or
        `IMAGENET_MEAN` / `IMAGENET_STD`.

    Returns:
      float32 array of the same shape.

    Raises:
      ValueError: if the last axis of `images` is not 3, or mean/std do not have 3 entries, or a
        std entry is not > 0.
    """
    images = np.asarray(images, np.float32)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if images.ndim < 1 or images.shape[-1] != 3:
        raise ValueError(f"images: last axis must be 3 (RGB), got shape {images.shape}")
    if mean.shape != (3,) or std.shape != (3,) or not (std > 0).all():
        raise ValueError(f"mean, std: need 3 entries each and std > 0, got {mean.tolist()}, {std.tolist()}")
    return (images - mean) / std


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 [height, width, 3] (or [height, width]) array as PNG, atomically.

    Raises:
      ValueError: if `image` is not uint8 with 2 dims or 3 dims ending in 3.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"image: need uint8 [h, w] or [h, w, 3], got {image.dtype} {image.shape}")
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
