"""Models of the multimodal job: construction, the LLaVA loss, pixels and routing features.

Teacher-forced scoring, prefill and mixture generation are the library's (`dfm.inference`,
`dfm.decentral.mixture_generate`), shared with `dfm.DecentralizedModel`.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfm.inference import routing_features
from dfm.models import DecoderConfig
from dfm.models.multimodal import MultimodalConfig, MultimodalModel
from dfm.models.vision import VisionConfig, normalize_pixels
from dfm.train.tiled_loss import causal_lm_loss
from experiments.engine.config import ConfigError
from experiments.mllm import pretrained
from experiments.mllm.config import frozen_prefixes  # noqa: F401 - re-exported (its former home)


def num_image_tokens(config) -> int:
    """Text positions one image occupies: patches (class token dropped) after pixel shuffle; with
    ``init_from`` the checkpoint's (`experiments.mllm.pretrained`)."""
    if config.init_from:
        return pretrained.read_checkpoint(config.init_from).num_image_tokens
    side = config.data.image_size // config.vision.patch_size
    if config.projector.kind == "internvl":
        side = round(side * config.projector.downsample_ratio)
    return side * side


def model_config(config, vocab_size: int, image_token_id: int):
    """`dfm.models.multimodal.MultimodalConfig` of the run (vision tower, projector, decoder).

    With ``init_from``: the checkpoint's architecture with the run's ``[numerics]``; `vocab_size`
    (the tokenizer's length) must fit its vocabulary and `image_token_id` must be its own
    (ConfigError naming ``init_from`` otherwise).
    """
    if config.init_from:
        mc = pretrained.read_checkpoint(config.init_from).model_config(config.numerics)
        if vocab_size > mc.text.vocab_size or image_token_id != mc.image_token_id:
            raise ConfigError(f"init_from: the run's tokenizer ({vocab_size} tokens, image token {image_token_id}) "
                              f"does not fit the checkpoint (vocab_size {mc.text.vocab_size}, image_token_id "
                              f"{mc.image_token_id})")
        return mc

    v, t, p = config.vision, config.text, config.projector
    vision = VisionConfig(image_size=config.data.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                          intermediate_size=v.intermediate_size, num_layers=v.num_layers, num_heads=v.num_heads,
                          arch=v.arch, **config.numerics.vision_fields())
    text = DecoderConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads or None,
                         attention_bias=t.attention_bias, tie_word_embeddings=t.tie_word_embeddings,
                         rope_theta=t.rope_theta, **config.numerics.model_fields())
    mc = MultimodalConfig(vision=vision, text=text, image_token_id=image_token_id,
                          vision_feature_layer=p.vision_feature_layer, projector=p.kind,
                          downsample_ratio=p.downsample_ratio)
    if mc.num_image_tokens != num_image_tokens(config):
        raise ValueError(f"projector: model has {mc.num_image_tokens} image tokens, data laid out for "
                         f"{num_image_tokens(config)}")
    return mc


def new_model(mconfig, seed: int, init_from: str = ""):
    """A freshly initialized `MultimodalModel` (parameters from `nnx.Rngs(seed)`), or with
    `init_from` the checkpoint's weights in a model of `mconfig` (`experiments.mllm.pretrained.new_model`)."""
    if init_from:
        return pretrained.new_model(pretrained.read_checkpoint(init_from), mconfig, seed)
    return MultimodalModel(mconfig, rngs=nnx.Rngs(seed))


def run_model(config, vocab_size: int, image_token_id: int):
    """A fresh model of the run (`MultimodalTask.new_model`): `model_config` of the run's tokenizer,
    random init from ``config.seed``, or the ``init_from`` checkpoint's weights."""
    return new_model(model_config(config, vocab_size, image_token_id), config.seed, init_from=config.init_from)


def image_size(config) -> int:
    """Side in pixels of the run's images: ``data.image_size``, or the checkpoint's with ``init_from``."""
    if config.init_from:
        return pretrained.read_checkpoint(config.init_from).image_size
    return config.data.image_size


def pixels(images_uint8: np.ndarray, stats=None) -> np.ndarray:
    """`[n, S, S, 3]` uint8 -> float32 NHWC `(x / 255 - mean) / std` (`dfm.models.vision.normalize_pixels`)
    with `stats = (mean, std)` (the run's, `MultimodalData.pixel_stats`; default CLIP's)."""
    return normalize_pixels(images_uint8) if stats is None else normalize_pixels(images_uint8, *stats)


def llava_loss(model, batch, key, loss_chunk: int = 0):
    """Mean cross-entropy of the answer tokens (LLaVA's masked LM loss).

    batch: `{"tokens": [B, L] int32, "mask": [B, L] bool (True = target), "pixels": [B, S, S, 3]}`,
    or a packed batch (`experiments.mllm.packing.pack_batch`) with also `"segment_ids"` and
    `"positions"` `[R, P]` int32: each row holds several conversations, attending within their own
    segment; the mean over the same answer tokens is then the padded batch's loss.
    `loss_chunk` > 0: the vocabulary-tiled cross-entropy (`dfm.train.tiled_loss.causal_lm_loss`,
    ``[numerics] loss_chunk``), no `[B, L, vocab]` logits; 0: the full logits.
    Returns `(loss, {"tokens": number of targets})`.
    """
    del key
    tokens = batch["tokens"]
    packed = {name: batch[name][:, :-1] for name in ("segment_ids", "positions") if name in batch}
    if loss_chunk:
        loss, n = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:], batch["mask"][:, 1:], pixels=batch["pixels"],
                                 chunk=loss_chunk, **packed)
        return loss, {"tokens": n}
    logits = model(tokens[:, :-1], batch["pixels"], **packed)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    m = batch["mask"][:, 1:].astype(jnp.float32)
    n = m.sum()
    return (ce * m).sum() / jnp.maximum(n, 1.0), {"tokens": n}


@functools.lru_cache(maxsize=None)
def training_loss_fn(loss_chunk: int):
    """`llava_loss` with the config's ``[numerics] loss_chunk`` (cached: one function, one jitted step)."""
    return llava_loss if not loss_chunk else functools.partial(llava_loss, loss_chunk=loss_chunk)


def image_features(model, images_uint8: np.ndarray, batch_size: int, stats=None) -> np.ndarray:
    """Routing / partition features `[n, vision_hidden]` float64 of uint8 images `[n, S, S, 3]`
    (`dfm.inference.routing_features`: the patch mean of the tower's layer `vision_feature_layer`),
    normalized per batch with `stats` (as `pixels`)."""
    return routing_features(model, lambda rows: pixels(images_uint8[rows], stats), len(images_uint8), batch_size)
