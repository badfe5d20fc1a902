"""Vision-language model: image encoder + projector + causal `Decoder`, HF LLaVA / InternVL semantics.

Module tree (HF `LlavaModel` / `InternVLModel` names): `vision_tower` (`CLIPVisionTower` or
`InternVisionTower`, by `config.vision.arch`), `multi_modal_projector` (`LlavaProjector` or
`InternVLProjector`, by `config.projector`), `language_model` (a causal `dfm.models.Decoder`; its
parameters carry HF's `model.language_model.*` names without the prefix, and `lm_head`).

Image features (HF `get_image_features`): take hidden state `vision_feature_layer` of the tower,
drop the class token ("default") or keep it ("full"), for InternVL reshape the patch grid,
`pixel_shuffle` it by `downsample_ratio` and flatten, then project to the text width. InternVL with
`vision_feature_layer == -1` reads the tower's `last_hidden_state` (after the final `layernorm` when
the tower has one), as HF does; LLaVA always reads `hidden_states[vision_feature_layer]`.

Prompts carry `num_image_tokens` placeholder ids `image_token_id` per image; `embed_inputs` replaces
them, in row-major order over `[batch, length]`, by the image features in order (image 0's tokens
first), as HF's `inputs_embeds.masked_scatter(special_image_mask, image_features)`.
Images are NHWC `pixel_values [n_images, height, width, channels]` (HF: NCHW).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.config import DecoderConfig
from dfm.models.decoder import Cache, Decoder, check_tokens
from dfm.models.internvit import InternVisionTower
from dfm.models.numerics import precision_scope
from dfm.models.projector import InternVLProjector, LlavaProjector, pixel_shuffle
from dfm.models.vision import ACTIVATION_NAMES, CLIPVisionTower, VisionConfig

Array = jax.Array

PROJECTORS = ("llava", "internvl")
SELECT_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class MultimodalConfig:
    """A vision-language model: `vision` tower, projector, causal `text` decoder.

    Field names follow HF `LlavaConfig` / `InternVLConfig`.

    Attributes:
      vision: `VisionConfig` of the image encoder.
      text: `DecoderConfig` of the language model; must be causal.
      image_token_id: placeholder id of one image token in prompts; in `[0, text.vocab_size)`.
      vision_feature_layer: index into the tower's `hidden_states` (`num_layers + 1` entries;
        negative counts from the end), HF `vision_feature_layer` (int only).
      vision_feature_select_strategy: "default" drops the class token, "full" keeps it (LLaVA only:
        InternVL's pixel shuffle needs a square patch grid).
      projector: "llava" (`LlavaProjector`) or "internvl" (`InternVLProjector` + pixel shuffle).
      downsample_ratio: InternVL pixel-shuffle factor; `1 / downsample_ratio` must be an integer
        dividing the patch grid side. Must be 1.0 for "llava".
      projector_hidden_act: projector activation (HF `projector_hidden_act`).
      multimodal_projector_bias: LLaVA projector biases (HF `multimodal_projector_bias`);
        InternVL's projector always has them (must be True for "internvl").

    Raises:
      ValueError: naming the field, for a wrong type, an id or layer out of range, an unknown
        strategy / projector / activation, or a ratio that does not fit the patch grid.
    """

    vision: VisionConfig
    text: DecoderConfig
    image_token_id: int
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector: str = "llava"
    downsample_ratio: float = 1.0
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self):
        if not isinstance(self.vision, VisionConfig):
            raise ValueError(f"vision: must be a VisionConfig, got {type(self.vision).__name__}")
        if not isinstance(self.text, DecoderConfig):
            raise ValueError(f"text: must be a DecoderConfig, got {type(self.text).__name__}")
        if not self.text.causal:
            raise ValueError("text: the language model must be causal (text.causal=False)")
        tid = self.image_token_id
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < self.text.vocab_size:
            raise ValueError(f"image_token_id: must be an int in [0, text.vocab_size={self.text.vocab_size}), "
                             f"got {tid!r}")
        n = self.vision.num_layers
        layer = self.vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not -(n + 1) <= layer <= n:
            raise ValueError(f"vision_feature_layer: must be an int in [{-(n + 1)}, {n}] "
                             f"(vision.num_layers={n}), got {layer!r}")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy: must be one of {SELECT_STRATEGIES}, "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector: must be one of {PROJECTORS}, got {self.projector!r}")
        if self.projector_hidden_act not in ACTIVATION_NAMES:
            raise ValueError(f"projector_hidden_act: must be one of {ACTIVATION_NAMES}, "
                             f"got {self.projector_hidden_act!r}")
        if self.projector == "llava":
            if self.downsample_ratio != 1.0:
                raise ValueError(f"downsample_ratio: must be 1.0 for projector='llava', got {self.downsample_ratio!r}")
        else:
            if self.vision_feature_select_strategy != "default":
                raise ValueError("vision_feature_select_strategy: projector='internvl' needs 'default' "
                                 "(pixel shuffle needs the square patch grid without the class token)")
            if not self.multimodal_projector_bias:
                raise ValueError("multimodal_projector_bias: InternVL's projector always has biases")
            r = self.downsample_ratio
            inv = 1.0 / r if isinstance(r, (int, float)) and r > 0 else math.nan
            side = self.vision.grid_size
            if not (inv >= 1 and abs(inv - round(inv)) < 1e-9 and side % round(inv) == 0):
                raise ValueError(f"downsample_ratio: 1 / downsample_ratio must be an integer dividing the patch "
                                 f"grid side {side}, got {r!r}")

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens (= projected feature vectors) per image in the text.

        LLaVA: `num_patches` ("default") or `num_patches + 1` ("full"); InternVL:
        `num_patches * downsample_ratio ** 2` (HF `image_seq_length`).
        """
        v = self.vision
        if self.projector == "internvl":
            return v.num_patches // round(1.0 / self.downsample_ratio) ** 2
        return v.num_patches + (self.vision_feature_select_strategy == "full")

    def replace(self, **changes) -> "MultimodalConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def vision_tower(config: VisionConfig, *, rngs: nnx.Rngs) -> CLIPVisionTower | InternVisionTower:
    """The tower of `config.arch`: `CLIPVisionTower` ("clip") or `InternVisionTower` ("internvit")."""
    cls = CLIPVisionTower if config.arch == "clip" else InternVisionTower
    return cls(config, rngs=rngs)


class MultimodalModel(nnx.Module):
    """LLaVA / InternVL-style vision-language causal LM (see module doc).

    Args:
      config: `MultimodalConfig`.
      rngs: `nnx.Rngs` for parameter initialization.

    Call: `model(tokens [batch, length], pixel_values [n_images, H, W, C] | None, *, positions=None,
    attention_mask=None, segment_ids=None)` -> logits `[batch, length, vocab]` float32, the
    next-token distribution (row j is `p(x^{j+1} | x^{<j+1}, images)`). With `segment_ids` (packed
    rows) each segment sees only itself (`Decoder.hidden_states`).
    """

    def __init__(self, config: MultimodalConfig, *, rngs: nnx.Rngs):
        self.config = config
        t = config.text
        self.vision_tower = vision_tower(config.vision, rngs=rngs)
        kw = dict(act=config.projector_hidden_act, dtype=t.compute_dtype, param_dtype=t.parameter_dtype,
                  initializer_range=t.initializer_range, rngs=rngs)
        if config.projector == "llava":
            self.multi_modal_projector = LlavaProjector(
                config.vision.hidden_size, t.hidden_size, use_bias=config.multimodal_projector_bias, **kw)
        else:
            self.multi_modal_projector = InternVLProjector(
                config.vision.hidden_size, t.hidden_size, config.downsample_ratio, **kw)
        self.language_model = Decoder(t, rngs=rngs)

    # ------------------------------------------------------------------ images
    def image_features(self, pixel_values: Array) -> Array:
        """Projected image features `[n_images, num_image_tokens, text_hidden]` (HF `get_image_features`).

        pixel_values: NHWC `[n_images, image_size, image_size, num_channels]`; another shape is a
        ValueError naming `pixel_values`.
        """
        c = self.config
        if c.projector == "internvl" and c.vision_feature_layer == -1:
            feats = self.vision_tower(pixel_values)
        else:
            feats = self.vision_tower.hidden_states(pixel_values)[c.vision_feature_layer]
        if c.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        if c.projector == "internvl":
            n, side = feats.shape[0], c.vision.grid_size
            feats = pixel_shuffle(feats.reshape(n, side, side, -1), c.downsample_ratio)
            feats = feats.reshape(n, -1, feats.shape[-1])
        with precision_scope(c.text.matmul_precision):
            return self.multi_modal_projector(feats.astype(c.text.compute_dtype))

    def pooled_image_features(self, pixel_values: Array) -> Array:
        """One vector per image, `[n_images, vision_hidden]`: `vision_tower.pooled` (CLIP: post-normed
        CLS; InternViT: patch mean or CLS). Used to partition / route by image content."""
        return self.vision_tower.pooled(pixel_values)

    def routing_features(self, pixel_values: Array) -> Array:
        """`[n_images, vision_hidden]`: the mean over patches (class token dropped) of the tower's
        hidden state `vision_feature_layer`, the features the projector reads. The multimodal job
        partitions and routes by these (CLIP's own pooled output, the post-normed class token of
        the last layer, comes from layers LLaVA's feature layer -2 never trains when the tower is
        trained from scratch).
        """
        hidden = self.vision_tower.hidden_states(pixel_values)[self.config.vision_feature_layer]
        return hidden[:, 1:].mean(axis=1)

    def embed_inputs(self, tokens: Array, pixel_values: Array | None = None) -> Array:
        """Token embeddings with image features scattered into the image-token positions.

        Args:
          tokens: `[batch, length]` int ids in `[0, vocab_size)`.
          pixel_values: `[n_images, H, W, C]` or None (no images).
        Returns:
          `[batch, length, text_hidden]` (compute dtype): position `p` (row-major over
          `[batch, length]`) holding the k-th `image_token_id` gets feature `k % num_image_tokens`
          of image `k // num_image_tokens`; other positions keep their token embedding (HF
          `masked_scatter`). Jittable (cumsum index + where).
        Raises:
          ValueError: (concrete tokens) the count of image tokens differs from
            `n_images * num_image_tokens` (0 when `pixel_values` is None); bad `tokens` /
            `pixel_values` shapes or ids.
        """
        c = self.config
        tokens = jnp.asarray(tokens)
        check_tokens(tokens, c.text.vocab_size, "tokens")
        n_images = 0 if pixel_values is None else int(jnp.shape(pixel_values)[0])
        check_image_tokens(tokens, c.image_token_id, n_images * c.num_image_tokens)
        x = self.language_model.embed(tokens)
        if pixel_values is None or n_images == 0:
            return x
        feats = self.image_features(pixel_values)
        flat = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)                 # [n_images * T, hidden]
        mask = tokens == c.image_token_id
        index = jnp.cumsum(mask.reshape(-1).astype(jnp.int32)) - 1
        index = jnp.clip(index, 0, flat.shape[0] - 1).reshape(tokens.shape)
        return jnp.where(mask[..., None], jnp.take(flat, index, axis=0), x)

    # ------------------------------------------------------------------ full forward
    def hidden_states(self, tokens: Array, pixel_values: Array | None = None, *, positions: Array | None = None,
                      attention_mask: Array | None = None, segment_ids: Array | None = None) -> Array:
        """Final-layer hidden states of the language model before its last norm, `[batch, length,
        text_hidden]` (compute dtype): `__call__` without the head (`Decoder.hidden_states` on
        `embed_inputs(tokens, pixel_values)`). `language_model.logits` of them is `__call__`'s
        logits; `language_model.output_projection` gives the head's factors for
        `dfm.train.tiled_loss`. Raises ValueError as `__call__`."""
        embeds = self.embed_inputs(tokens, pixel_values)
        return self.language_model.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                                 inputs_embeds=embeds, segment_ids=segment_ids)

    def __call__(self, tokens: Array, pixel_values: Array | None = None, *, positions: Array | None = None,
                 attention_mask: Array | None = None, segment_ids: Array | None = None) -> Array:
        """Logits `[batch, length, vocab]` float32 of `tokens [batch, length]` with `pixel_values`
        `[n_images, H, W, C]` (or None) scattered in (`embed_inputs`). `positions` /
        `attention_mask` / `segment_ids` as `Decoder.__call__`.

        Packed rows (`segment_ids [batch, length]`, 1.. = segment, 0 = padding): the images are
        still read in row-major token order, so `pixel_values` lists the images of the segments in
        the order their image tokens appear in the packed rows; each segment's logits equal those
        of its sequence run alone with its own images (positions restart in each segment).
        Raises ValueError as `embed_inputs` and `Decoder.__call__`."""
        embeds = self.embed_inputs(tokens, pixel_values)
        return self.language_model(tokens, positions=positions, attention_mask=attention_mask, inputs_embeds=embeds,
                                   segment_ids=segment_ids)

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int, max_length: int) -> Cache:
        """Empty KV cache of the language model (`Decoder.init_cache`)."""
        return self.language_model.init_cache(batch, max_length)

    def prefill(self, tokens: Array, pixel_values: Array | None, cache: Cache) -> tuple[Array, Cache]:
        """Fill the cache with a prompt `tokens [batch, P]` (images scattered in) at positions `0..P-1`.

        Returns `(logits [batch, P, vocab] float32, cache)`; equals `model(tokens, pixel_values)`.
        """
        embeds = self.embed_inputs(tokens, pixel_values)
        return self.language_model.prefill(tokens, cache, inputs_embeds=embeds)

    def decode_step(self, tokens: Array, position, cache: Cache) -> tuple[Array, Cache]:
        """One cached AR step of text tokens `tokens [batch]` at `position` (may be traced).

        Returns `(logits [batch, vocab] float32, cache)` (`Decoder.decode_step`; generated tokens are
        always embedded as text, images only enter through `prefill`).
        """
        return self.language_model.decode_step(tokens, position, cache)


def check_image_tokens(tokens: Array, image_token_id: int, expected: int) -> None:
    """ValueError unless concrete `tokens` hold exactly `expected` ids `image_token_id` (no-op when traced)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    count = int(jnp.sum(jnp.asarray(tokens) == image_token_id))
    if count != expected:
        raise ValueError(f"tokens: found {count} image tokens (id {image_token_id}) but the images give "
                         f"{expected} features (n_images * num_image_tokens)")


@partial(jax.jit, static_argnums=(0, 4))
def _greedy_generate(graphdef, state, prompt: Array, pixel_values: Array | None, num_tokens: int) -> Array:
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    cache = model.init_cache(b, p + num_tokens)
    logits, cache = model.prefill(prompt, pixel_values, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, position):
        token, cache = carry
        logits, cache = model.decode_step(token, position, cache)
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32), cache), token

    positions = jnp.arange(p, p + num_tokens, dtype=jnp.int32)
    _, tokens = jax.lax.scan(step, (first, cache), positions)   # [num_tokens, batch]
    return jnp.concatenate([prompt.astype(jnp.int32), tokens.T], axis=1)


def greedy_generate(model: MultimodalModel, tokens: Array, pixel_values: Array | None, num_tokens: int) -> Array:
    """Greedy (argmax) continuation of the prompt `tokens [batch, P]` with images by `num_tokens` tokens.

    One jitted program: `prefill` (images scattered in) + `lax.scan` of `decode_step`. Returns
    `[batch, P + num_tokens]` int32: the prompt followed by the generated tokens.
    Raises ValueError for `num_tokens < 1`, an empty or invalid prompt, or an image-token count
    that does not match `pixel_values` (see `MultimodalModel.embed_inputs`).
    """
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens: must be a positive int, got {num_tokens!r}")
    prompt = jnp.asarray(tokens)
    check_tokens(prompt, model.config.text.vocab_size, "tokens")
    if prompt.shape[1] < 1:
        raise ValueError("tokens: the prompt needs at least one token")
    c = model.config
    n_images = 0 if pixel_values is None else int(jnp.shape(pixel_values)[0])
    check_image_tokens(prompt, c.image_token_id, n_images * c.num_image_tokens)
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
    graphdef, state = nnx.split(model)
    return _greedy_generate(graphdef, state, prompt, pixel_values, num_tokens)
