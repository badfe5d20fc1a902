"""InternViT image encoder, HF transformers' native `InternVLVisionModel` semantics and names.

Module tree (HF names): `embeddings.{cls_token [1, 1, hidden], patch_embeddings.projection (conv with
bias), position_embeddings [1, 1 + num_patches, hidden]}`, `encoder.layer[i].{attention.{q_proj,
k_proj, v_proj, projection_layer, q_norm, k_norm}, layernorm_before, layernorm_after, lambda_1,
lambda_2, mlp.{fc1, fc2}}`, `layernorm` (absent with `use_mean_pooling`, HF's `nn.Identity`).
Parameter mapping to HF: Linear `kernel` = HF `weight` transposed; conv `kernel [kh, kw, in, out]` =
HF `weight (out, in, kh, kw)` transposed `(2, 3, 1, 0)`; norm `scale` / `bias` = HF `weight` /
`bias` (RMSNorms have only `scale`); `cls_token`, `position_embeddings`, `lambda_1`, `lambda_2`
are stored as in HF. `q_norm` / `k_norm` are absent unless `use_qk_norm`, `position_embeddings` is
absent unless `use_absolute_position_embeddings`.

Supported from `InternVLVisionConfig`: `attention_bias`, `use_qk_norm`, `norm_type` ("layer_norm"
as InternViT-300M in InternVL 2.5-1B, or "rms_norm" as InternViT-6B), `layer_norm_eps`,
`layer_scale_init_value`, `use_mean_pooling`, `use_absolute_position_embeddings`, `hidden_act`.
Not supported (inference only, fixed resolution): dropout, `use_mask_token` / `bool_masked_pos`,
position-embedding interpolation, non-square images or patches. Images are NHWC as in
`dfm.models.vision`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.layers import RMSNorm, dense, linear, partitioned
from dfm.models.numerics import precision_scope
from dfm.models.vision import VisionConfig, VisionMLP, check_pixels, layer_norm, multi_head_attention, normal_param

Array = jax.Array

QK_NORM_EPS = 1e-6
"""HF `InternVLVisionRMSNorm(embed_dim)` default epsilon of `q_norm` / `k_norm` (not `layer_norm_eps`)."""


def block_norm(config: VisionConfig, *, rngs: nnx.Rngs):
    """HF `NORM2FN[norm_type](hidden, eps=layer_norm_eps)`: LayerNorm or RMSNorm (param `scale`)."""
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.layer_norm_eps, param_dtype=config.parameter_dtype)
    return layer_norm(config, rngs=rngs)


class InternVLVisionPatchEmbeddings(nnx.Module):
    """HF `InternVLVisionPatchEmbeddings`: `projection` conv (kernel = stride = patch, with bias)."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c, p = config, config.patch_size
        self.projection = nnx.Conv(
            c.num_channels, c.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True,
            dtype=c.compute_dtype, param_dtype=c.parameter_dtype,
            kernel_init=partitioned(nnx.initializers.normal(c.initializer_range), (None, None, None, "embed")),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """`[batch, H, W, C]` -> `[batch, num_patches, hidden]` (patches row-major)."""
        out = self.projection(x)
        return out.reshape(out.shape[0], -1, out.shape[-1])


class InternVLVisionEmbeddings(nnx.Module):
    """HF `InternVLVisionEmbeddings`: `[cls_token; patches] + position_embeddings`.

    Initialization: normal(initializer_range) for `cls_token` / `position_embeddings` (HF inits
    them to zeros; a checkpoint overwrites both).
    """

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.cls_token = normal_param(c, rngs.params(), (1, 1, c.hidden_size), (None, None, "embed"))
        self.patch_embeddings = InternVLVisionPatchEmbeddings(c, rngs=rngs)
        if c.use_absolute_position_embeddings:
            self.position_embeddings = normal_param(
                c, rngs.params(), (1, c.num_patches + 1, c.hidden_size), (None, None, "embed"))
        else:
            self.position_embeddings = None

    def __call__(self, pixel_values: Array) -> Array:
        """`[batch, H, W, C]` (checked) -> `[batch, 1 + num_patches, hidden]`."""
        x = check_pixels(pixel_values, self.config)
        patches = self.patch_embeddings(x)
        b, _, h = patches.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b, 1, h))
        x = jnp.concatenate([cls, patches], axis=1)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings[...].astype(x.dtype)
        return x


class InternVLVisionAttention(nnx.Module):
    """HF `InternVLVisionAttention`: `q_proj`, `k_proj`, `v_proj` (bias iff `attention_bias`),
    optional RMSNorm `q_norm` / `k_norm` over the full `hidden` width (before the head split),
    `projection_layer` (with bias)."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c, h = config, config.hidden_size
        self.num_heads, self.attention = c.num_heads, c.attention
        bias = c.attention_bias
        self.q_proj = linear(c, h, h, ("embed", "heads"), rngs=rngs, use_bias=bias)
        self.k_proj = linear(c, h, h, ("embed", "heads"), rngs=rngs, use_bias=bias)
        self.v_proj = linear(c, h, h, ("embed", "heads"), rngs=rngs, use_bias=bias)
        self.projection_layer = linear(c, h, h, ("heads", "embed"), rngs=rngs, use_bias=True)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(h, QK_NORM_EPS, param_dtype=c.parameter_dtype)
            self.k_norm = RMSNorm(h, QK_NORM_EPS, param_dtype=c.parameter_dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: Array) -> Array:
        """x: `[batch, length, hidden]` -> `[batch, length, hidden]`."""
        q, k, v = dense(self.q_proj, x), dense(self.k_proj, x), dense(self.v_proj, x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return dense(self.projection_layer, multi_head_attention(q, k, v, self.num_heads, self.attention))


class InternVLVisionLayer(nnx.Module):
    """HF `InternVLVisionLayer`:
    `x = x + lambda_1 * attention(layernorm_before(x))`, then
    `x = x + lambda_2 * mlp(layernorm_after(x))`."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c = config
        self.attention = InternVLVisionAttention(c, rngs=rngs)
        self.mlp = VisionMLP(c, rngs=rngs)
        self.layernorm_before = block_norm(c, rngs=rngs)
        self.layernorm_after = block_norm(c, rngs=rngs)
        init = partitioned(nnx.initializers.constant(c.layer_scale_init), ("norm",))
        self.lambda_1 = nnx.Param(init(rngs.params(), (c.hidden_size,), c.parameter_dtype))
        self.lambda_2 = nnx.Param(init(rngs.params(), (c.hidden_size,), c.parameter_dtype))

    def __call__(self, x: Array) -> Array:
        """x: `[batch, length, hidden]` -> same."""
        x = x + self.lambda_1[...].astype(x.dtype) * self.attention(self.layernorm_before(x))
        return x + self.lambda_2[...].astype(x.dtype) * self.mlp(self.layernorm_after(x))


class InternVLVisionEncoder(nnx.Module):
    """HF `InternVLVisionEncoder`: `layer[i]`, `InternVLVisionLayer` each."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([InternVLVisionLayer(config, rngs=rngs) for _ in range(config.num_layers)])


class InternVisionTower(nnx.Module):
    """InternViT image encoder, HF `InternVLVisionModel` (see module doc for names and options).

    Args:
      config: `VisionConfig` with `arch="internvit"`.
      rngs: `nnx.Rngs` for parameter initialization.

    Raises:
      ValueError: (`config.arch`) for another arch.
    """

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        if config.arch != "internvit":
            raise ValueError(f"config.arch: InternVisionTower needs arch='internvit', got {config.arch!r}")
        self.config = config
        self.embeddings = InternVLVisionEmbeddings(config, rngs=rngs)
        self.encoder = InternVLVisionEncoder(config, rngs=rngs)
        self.layernorm = None if config.use_mean_pooling else layer_norm(config, rngs=rngs)

    def hidden_states(self, pixel_values: Array) -> tuple[Array, ...]:
        """All hidden states, as HF `output_hidden_states=True`: `num_layers + 1` arrays
        `[batch, 1 + num_patches, hidden]`; entry 0 = the embeddings, entry i = output of layer i
        (never the final `layernorm`)."""
        with precision_scope(self.config.matmul_precision):
            x = self.embeddings(pixel_values)
            states = [x]
            for layer in self.encoder.layer:
                x = layer(x)
                states.append(x)
        return tuple(states)

    def __call__(self, pixel_values: Array) -> Array:
        """HF `last_hidden_state`: `layernorm(last layer output)` (no norm with `use_mean_pooling`),
        `[batch, 1 + num_patches, hidden]`."""
        x = self.hidden_states(pixel_values)[-1]
        if self.layernorm is None:
            return x
        with precision_scope(self.config.matmul_precision):
            return self.layernorm(x)

    def pooled(self, pixel_values: Array) -> Array:
        """Pooled image vector `[batch, hidden]`, following HF `InternVLVisionModelOutputWithPooling`'s
        documented `pooler_output` (HF's forward leaves it unset): with `use_mean_pooling` the mean of
        the patch tokens of `last_hidden_state` (CLS excluded), otherwise its CLS token."""
        x = self(pixel_values)
        if self.config.use_mean_pooling:
            return jnp.mean(x[:, 1:].astype(jnp.float32), axis=1).astype(x.dtype)
        return x[:, 0]
