"""Models of the multimodal job: construction, the LLaVA loss, teacher-forced scoring, and greedy
generation from a mixture of experts (any `dfm.decentral.Router`; THEORY S8/S9/S12).

Mixture decoding is the library's: the AR schedule over the answer positions
(`dfm.schedules.autoregressive`) sampled greedily by `dfm.samplers.sample_discrete`, with the
experts' cached posterior functions continuing the prefilled prompt
(`dfm.autoregressive.prompted_posterior_fn`) mixed by `dfm.decentral.ensemble_posterior_fn`: at
every step `p(y) = sum_k rho_k p_k(y | image, prompt, generated)`, with `rho` fixed per question
(centroid routers; top-1 = the partition function, exact by S12) or the Bayes filter
`rho_k ∝ w_k prod p_k(generated tokens | image, question)` updated after every token (S9). The
answer is `argmax_y p(y)` at every step; with a fixed-weight router only the experts that carry
weight in the batch are run (`Router.support`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfm.models import DecoderConfig


def num_image_tokens(config) -> int:
    """Text positions one image occupies: patches (class token dropped) after pixel shuffle; with
    ``init_from`` the checkpoint's (`experiments.mllm.pretrained`)."""
    if config.init_from:
        from experiments.mllm.pretrained import read_checkpoint

        return read_checkpoint(config.init_from).num_image_tokens
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
    from dfm.models.multimodal import MultimodalConfig
    from dfm.models.vision import VisionConfig

    if config.init_from:
        from experiments.engine.config import ConfigError
        from experiments.mllm.pretrained import read_checkpoint

        mc = read_checkpoint(config.init_from).model_config(config.numerics)
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
    from dfm.models.multimodal import MultimodalModel

    if init_from:
        from experiments.mllm import pretrained

        return pretrained.new_model(pretrained.read_checkpoint(init_from), mconfig, seed)
    return MultimodalModel(mconfig, rngs=nnx.Rngs(seed))


def image_size(config) -> int:
    """Side in pixels of the run's images: ``data.image_size``, or the checkpoint's with ``init_from``."""
    if config.init_from:
        from experiments.mllm.pretrained import read_checkpoint

        return read_checkpoint(config.init_from).image_size
    return config.data.image_size


def frozen_prefixes(train: str) -> tuple[str, ...]:
    """`TrainConfig.frozen` for a stage's `train` setting ("all", "projector", ...)."""
    keep = {"all": {"vision_tower", "multi_modal_projector", "language_model"},
            "projector": {"multi_modal_projector"},
            "projector+tower": {"multi_modal_projector", "vision_tower"},
            "projector+llm": {"multi_modal_projector", "language_model"}}[train]
    return tuple(sorted({"vision_tower", "multi_modal_projector", "language_model"} - keep))


def pixels(images_uint8: np.ndarray, stats=None) -> np.ndarray:
    """`[n, S, S, 3]` uint8 -> float32 NHWC `(x / 255 - mean) / std` (`dfm.models.vision.normalize_pixels`)
    with `stats = (mean, std)` (the run's, `MultimodalData.pixel_stats`; default CLIP's)."""
    from dfm.models.vision import normalize_pixels

    return normalize_pixels(images_uint8) if stats is None else normalize_pixels(images_uint8, *stats)


def llava_loss(model, batch, key):
    """Mean cross-entropy of the answer tokens (LLaVA's masked LM loss).

    batch: `{"tokens": [B, L] int32, "mask": [B, L] bool (True = target), "pixels": [B, S, S, 3]}`,
    or a packed batch (`experiments.mllm.packing.pack_batch`) with also `"segment_ids"` and
    `"positions"` `[R, P]` int32: each row holds several conversations, attending within their own
    segment; the mean over the same answer tokens is then the padded batch's loss.
    Returns `(loss, {"tokens": number of targets})`.
    """
    del key
    tokens = batch["tokens"]
    packed = {name: batch[name][:, :-1] for name in ("segment_ids", "positions") if name in batch}
    logits = model(tokens[:, :-1], batch["pixels"], **packed)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    m = batch["mask"][:, 1:].astype(jnp.float32)
    n = m.sum()
    return (ce * m).sum() / jnp.maximum(n, 1.0), {"tokens": n}


@nnx.jit
def _target_log_probs(model, tokens, px):
    logits = model(tokens[:, :-1], px)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


def sequence_log_probs(model, seqs: np.ndarray, pixels_of, batch_size: int) -> np.ndarray:
    """Log-probabilities `[n, L-1]` float64 of tokens 1.. of `seqs [n, L]` given their images.

    `pixels_of(rows) -> [len(rows), S, S, 3]` gives the normalized images of rows `rows`. Rows are
    padded to `batch_size` so every batch has one shape (one compilation).
    """
    n = len(seqs)
    out = np.zeros((n, seqs.shape[1] - 1))
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        lp = _target_log_probs(model, jnp.asarray(seqs[pad]), jnp.asarray(pixels_of(pad)))
        out[idx] = np.asarray(lp, np.float64)[: len(idx)]
    return out


@nnx.jit
def pooled_features(model, px):
    """Routing / partition features `[n, vision_hidden]` (`MultimodalModel.routing_features`: the
    patch mean of the tower's layer `vision_feature_layer`)."""
    return model.routing_features(px)


def image_features(model, images_uint8: np.ndarray, batch_size: int, stats=None) -> np.ndarray:
    """`pooled_features` of uint8 images `[n, S, S, 3]` (normalized per batch with `stats`, as
    `pixels`), float64 `[n, vision_hidden]`."""
    parts = [np.asarray(pooled_features(model, jnp.asarray(pixels(images_uint8[s:s + batch_size], stats))),
                        np.float64)
             for s in range(0, len(images_uint8), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


@functools.partial(nnx.jit, static_argnums=(3,))
def _prefill(model, tokens, px, cache_length):
    cache = model.init_cache(tokens.shape[0], cache_length)
    logits, cache = model.prefill(tokens, px, cache)
    return cache, jax.nn.log_softmax(logits[:, -1], axis=-1)


def mixture_generate(models: list, prompts: np.ndarray, px: np.ndarray, max_new_tokens: int, router, *,
                     cache_length: int | None = None) -> np.ndarray:
    """Greedy decoding from the mixture of `models` under `router` (one batch of equal-length prompts).

    Each expert prefills the prompt (images scattered in) into a KV cache of `cache_length`
    positions; then one jitted `dfm.samplers.sample_discrete` over the answer positions decodes
    all experts step by step. The decoding program depends on the prompt length only as a traced
    value, so one compilation serves every prompt length when `cache_length` is fixed.

    Args:
      models: K `MultimodalModel`s (K = 1 with `FixedRouter(ones [B, 1])`: plain greedy decoding).
      prompts: `[B, P]` int32 prompt ids (image tokens expanded); px: `[B, S, S, 3]` pixels.
      max_new_tokens: answer length.
      router: a `dfm.decentral.Router` over the K experts for these B rows: `FixedRouter(weights
        [B, K])` or `BayesFilterRouter.from_priors(w)` (starts at the priors, updated by every
        generated token).
      cache_length: KV cache positions, >= P + max_new_tokens (default exactly that).

    Returns:
      `[B, max_new_tokens]` int32 generated ids (continuing after EOS; cut with `decode_answer`).

    Raises:
      ValueError: a `cache_length` shorter than P + max_new_tokens.
    """
    from dfm.decentral import FixedRouter, mixture_decode

    prompt_length = prompts.shape[1]
    cache_length = cache_length or prompt_length + max_new_tokens
    if cache_length < prompt_length + max_new_tokens:
        raise ValueError(f"cache_length: {cache_length} < prompt {prompt_length} + {max_new_tokens} new tokens")
    support = router.support()
    if support is not None and not support.all():   # only the experts that carry weight run
        used = np.flatnonzero(support)
        models = [models[i] for i in used]
        router = FixedRouter(jnp.asarray(np.asarray(router.table)[:, used]))
    tokens, px = jnp.asarray(prompts), jnp.asarray(px)
    starts = tuple(_prefill(m, tokens, px, cache_length) for m in models)
    return np.asarray(mixture_decode(models, starts, prompt_length, max_new_tokens, router), np.int32)
