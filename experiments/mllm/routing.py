"""The image features the multimodal job partitions and routes by (``[partition] features``).

- "tower": the patch mean of the stage-1 tower's hidden state ``vision_feature_layer``
  (`MultimodalModel.routing_features`, `experiments.mllm.modeling.image_features`); stage 2 keeps
  the tower frozen, so every expert's tower gives the same features.
- "clip:<dir>": the L2-normalised CLIP image embedding of a local HF CLIP checkpoint
  (`dfm.hf.clip_image_embeddings`, transformers' `get_image_features`, as the paper's authors use
  CLIP ViT-B/16): the run's uint8 images resized to the checkpoint's image size with bicubic
  filtering (`experiments.mllm.images.resize_uint8`) and normalised with its processor's mean / std
  (`dfm.hf.clip_features.image_stats`). They do not depend on any trained model.

The partition stage saves the features of every split in ``partition/features.npz``; the
evaluation routes the val / test questions by those rows, so the same featurizer routes at
inference. The export records it in ``<run>/decentralized/routing_features.json``
(`write_featurizer_record`), with the CLIP checkpoint's config, weights and processor files copied
beside it (``routing_clip/``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dfm.hf import load_clip_image_encoder
from dfm.hf.clip_features import image_stats, routing_image_embeddings
from dfm.hf.configs import read_config
from dfm.hf.safetensors_io import CheckpointError
from experiments.engine.config import ConfigError
from experiments.engine.rundir import atomic_write_json
from experiments.mllm import modeling
from experiments.mllm.pretrained import read_checkpoint

RECORD_FILE = "routing_features.json"
CLIP_COPY = "routing_clip"
_CLIP_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
               "processor_config.json")


def clip_features(clip_dir: str, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """float64 `[n, D]` unit rows: CLIP embeddings of uint8 images `[n, H, W, 3]` (module doc).

    Raises:
      ConfigError: naming ``partition.features`` when `clip_dir` is not a loadable CLIP checkpoint.
    """
    if not Path(clip_dir).is_dir():
        raise ConfigError(f"partition.features: clip:{clip_dir} is not a directory (a local HF CLIP checkpoint)")
    try:
        encoder = load_clip_image_encoder(clip_dir)
        mean, std = image_stats(clip_dir)
    except CheckpointError as e:
        raise ConfigError(f"partition.features: {e}") from None
    if len(images_uint8) == 0:
        return np.zeros((0, encoder.dim))
    return routing_image_embeddings(encoder, images_uint8, mean, std, batch_size=batch_size)


def partition_features(config, images: dict, stage1_model, batch_size: int, stats=None) -> dict[str, np.ndarray]:
    """``{split: float64 [n_images, D]}`` for the uint8 images of every split (``images[split]``):
    CLIP's with ``partition.features = "clip:<dir>"`` (`stage1_model` unused), else the stage-1
    tower's (`experiments.mllm.modeling.image_features`)."""
    clip_dir = config.partition.clip_dir
    if clip_dir:
        return {s: clip_features(clip_dir, im, batch_size) for s, im in images.items()}
    return {s: modeling.image_features(stage1_model, im, batch_size, stats) for s, im in images.items()}


def featurizer_record(config, dim: int) -> dict:
    """The ``routing_features.json`` object of the run: ``{"featurizer": "tower", "layer": L,
    "pooling": "patch_mean", "dim": D}`` or ``{"featurizer": "clip", "checkpoint": "routing_clip",
    "source": <dir as configured>, "embedding": "get_image_features, L2-normalised", "dim": D,
    "preprocess": {"resize": "bicubic", "image_size": S, "image_mean": [3], "image_std": [3]}}``
    (how `clip_features` turns the uint8 images into the encoder's pixels)."""
    clip_dir = config.partition.clip_dir
    if clip_dir:
        hf = read_config(clip_dir)[0]
        size = (hf.get("vision_config") or {}).get("image_size") if hf.get("model_type") == "clip" \
            else hf.get("image_size")
        mean, std = image_stats(clip_dir)
        return {"featurizer": "clip", "checkpoint": CLIP_COPY, "source": clip_dir,
                "embedding": "CLIPModel.get_image_features (pooled, projected when the checkpoint has a "
                             "visual_projection), L2-normalised", "dim": int(dim),
                "preprocess": {"resize": "bicubic", "image_size": size, "image_mean": list(mean),
                               "image_std": list(std)}}
    layer = config.projector.vision_feature_layer
    if config.init_from:
        layer = read_checkpoint(config.init_from).model_config().vision_feature_layer
    return {"featurizer": "tower", "pooling": "patch_mean", "layer": layer, "dim": int(dim)}


def write_featurizer_record(config, root: Path, dim: int) -> dict:
    """Write `featurizer_record` to ``root/routing_features.json`` (atomically) and, for CLIP, copy
    the checkpoint's files into ``root/routing_clip`` (module doc). Returns the record."""
    root = Path(root)
    record = featurizer_record(config, dim)
    if config.partition.clip_dir:
        src, dst = Path(config.partition.clip_dir), root / CLIP_COPY
        tmp = root / f".{CLIP_COPY}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in _CLIP_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        for shard in sorted(src.glob("model-*-of-*.safetensors")):
            shutil.copyfile(shard, tmp / shard.name)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    atomic_write_json(root / RECORD_FILE, record)
    return record
