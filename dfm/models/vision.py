"""Vision encoders: `VisionConfig` and the CLIP ViT tower (HF `CLIPVisionModel` layout).

Module tree of `CLIPVisionTower` (HF transformers `CLIPVisionModel` / `CLIPVisionTransformer` names):
`embeddings.{class_embedding, patch_embedding, position_embedding}`, `pre_layrnorm`,
`encoder.layers[i].{self_attn.{q_proj, k_proj, v_proj, out_proj}, layer_norm1, mlp.{fc1, fc2},
layer_norm2}`, `post_layernorm`. Parameter mapping to HF: every `*.kernel` of a Linear is the HF
`*.weight` transposed (`(out, in) -> (in, out)`); the patch-embedding conv `kernel [kh, kw, in, out]`
is the HF `weight (out, in, kh, kw)` transposed with `(2, 3, 1, 0)`; LayerNorm `scale` / `bias` are
HF `weight` / `bias`; `position_embedding.embedding` is `position_embedding.weight`;
`class_embedding` is `class_embedding`.

Images are NHWC here: `pixel_values [batch, height, width, channels]` (HF takes NCHW
`(batch, channels, height, width)`; transpose with `(0, 2, 3, 1)`). Patches are flattened
row-major (patch row, then patch column) exactly as HF's `flatten(2).transpose(1, 2)`.

The InternViT tower (HF `InternVLVisionModel`) lives in `dfm.models.internvit` and shares
`VisionConfig`, `activation` and `multi_head_attention` from here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.models.attention import dot_product_attention
from dfm.models.layers import dense, linear, partitioned
from dfm.models.numerics import ATTENTION_IMPLEMENTATIONS, MATMUL_PRECISIONS, check_choice, precision_scope

Array = jax.Array

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
ARCHS = ("clip", "internvit")
# CLIP's pixel statistics (HF `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`), per RGB channel
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images_uint8, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """`[n, H, W, 3]` uint8 RGB -> float32 NHWC `(images / 255 - mean) / std` (HF `CLIPImageProcessor`'s
    rescale + normalize, without resizing). Default statistics: CLIP's."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (np.asarray(images_uint8, np.float32) / 255.0 - mean) / std
NORM_TYPES = ("layer_norm", "rms_norm")


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,                                   # HF QuickGELUActivation
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),         # HF GELUActivation (erf)
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),      # HF NewGELUActivation (tanh formula)
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
ACTIVATION_NAMES = tuple(_ACTIVATIONS)


def activation(name: str):
    """The elementwise function HF `ACT2FN[name]` denotes, for the names in `ACTIVATION_NAMES`.

    Raises ValueError for any other name.
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: unknown name {name!r}; supported: {ACTIVATION_NAMES}")
    return _ACTIVATIONS[name]


@dataclass(frozen=True)
class VisionConfig:
    """Shape and numerics of a ViT image encoder (CLIP or InternViT).

    Field names follow HF `CLIPVisionConfig` / `InternVLVisionConfig` (shortened: `num_layers` is
    `num_hidden_layers`, `num_heads` is `num_attention_heads`, `layer_scale_init` is
    `layer_scale_init_value`); square images and patches only.

    Attributes:
      image_size: image height = width in pixels; must be divisible by `patch_size`.
      patch_size: patch height = width (conv kernel and stride).
      hidden_size: encoder width.
      intermediate_size: MLP width.
      num_layers: encoder layers.
      num_heads: attention heads; must divide `hidden_size`.
      num_channels: image channels.
      layer_norm_eps: epsilon of every LayerNorm (HF `layer_norm_eps`; CLIP 1e-5, InternViT 1e-6).
      hidden_act: MLP activation (one of `ACTIVATION_NAMES`, HF `ACT2FN` meaning).
      arch: "clip" (`CLIPVisionTower`) or "internvit" (`dfm.models.internvit.InternVisionTower`).
      attention_bias: q/k/v projection bias (CLIP always has one: must be True for "clip").
      layer_scale_init: initial value of InternViT's `lambda_1` / `lambda_2` layer scales.
      use_qk_norm: InternViT RMSNorm on queries and keys (not available for "clip").
      dtype: computation dtype name. param_dtype: parameter storage dtype name.
      initializer_range: std of the normal initializer.
      norm_type: InternViT block norm, "layer_norm" or "rms_norm" (must be "layer_norm" for "clip").
      use_mean_pooling: InternViT only: True = no final `layernorm` and `pooled` is the mean of
        the patch tokens; False = final `layernorm` and `pooled` is the CLS token. Ignored for
        "clip" (CLIP always pools the CLS token through `post_layernorm`).
      use_absolute_position_embeddings: InternViT learned position embeddings (must be True for
        "clip").
      attention: "auto" | "xla" | "cudnn" (`dfm.models.attention`; "auto" = cuDNN flash attention
        on a GPU in bf16 / fp16).
      matmul_precision: "default" | "high" | "highest" (`dfm.models.numerics`; "highest" for HF
        parity on GPU / TPU).

    Raises:
      ValueError: naming the field, for a non-positive size, a failed divisibility requirement,
        an unknown arch / activation / norm type / dtype, or an option the arch does not have.
    """

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    arch: str = "clip"
    attention_bias: bool = True
    layer_scale_init: float = 0.1
    use_qk_norm: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    norm_type: str = "layer_norm"
    use_mean_pooling: bool = True
    use_absolute_position_embeddings: bool = True
    attention: str = "auto"
    matmul_precision: str = "default"

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size: must be divisible by patch_size, got image_size={self.image_size}, "
                             f"patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: must divide hidden_size, got num_heads={self.num_heads}, "
                             f"hidden_size={self.hidden_size}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch: must be one of {ARCHS}, got {self.arch!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: must be one of {ACTIVATION_NAMES}, got {self.hidden_act!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type: must be one of {NORM_TYPES}, got {self.norm_type!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if not math.isfinite(self.layer_scale_init):
            raise ValueError(f"layer_scale_init: must be finite, got {self.layer_scale_init!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _FLOAT_DTYPES:
                raise ValueError(f"{name}: must be one of {_FLOAT_DTYPES}, got {getattr(self, name)!r}")
        check_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        if self.arch == "clip":
            if not self.attention_bias:
                raise ValueError("attention_bias: CLIP always has q/k/v biases (must be True for arch='clip')")
            if self.use_qk_norm:
                raise ValueError("use_qk_norm: not available for arch='clip'")
            if self.norm_type != "layer_norm":
                raise ValueError(f"norm_type: arch='clip' uses 'layer_norm', got {self.norm_type!r}")
            if not self.use_absolute_position_embeddings:
                raise ValueError("use_absolute_position_embeddings: CLIP always has them (must be True)")

    @property
    def grid_size(self) -> int:
        """Patches per image side, `image_size // patch_size`."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image, `(image_size // patch_size) ** 2` (the sequence is `1 + num_patches` long)."""
        return self.grid_size ** 2

    @property
    def head_size(self) -> int:
        """Per-head width `hidden_size // num_heads`."""
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a numpy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        """`param_dtype` as a numpy dtype."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "VisionConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- shared pieces
def check_pixels(pixel_values: Array, config: VisionConfig, name: str = "pixel_values") -> Array:
    """`pixel_values` as an array, checked to be `[batch, image_size, image_size, num_channels]`.

    Raises ValueError (naming `name`) for another rank or shape (HF also refuses other sizes when
    position embeddings are not interpolated).
    """
    x = jnp.asarray(pixel_values)
    want = (config.image_size, config.image_size, config.num_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"{name}: expected NHWC shape [batch, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")
    return x.astype(config.compute_dtype)


def layer_norm(config: VisionConfig, size: int | None = None, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """An `nnx.LayerNorm` (params `scale`, `bias` = HF `weight`, `bias`) with torch's exact variance."""
    return nnx.LayerNorm(
        size or config.hidden_size, epsilon=config.layer_norm_eps, dtype=config.compute_dtype,
        param_dtype=config.parameter_dtype, use_fast_variance=False,
        scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


def normal_param(config: VisionConfig, key: Array, shape: tuple[int, ...], names: tuple) -> nnx.Param:
    """A Param of `shape` drawn from normal(initializer_range), with logical axis `names`."""
    init = partitioned(nnx.initializers.normal(config.initializer_range), names)
    return nnx.Param(init(key, shape, config.parameter_dtype))


def multi_head_attention(q: Array, k: Array, v: Array, num_heads: int, implementation: str = "auto") -> Array:
    """Bidirectional scaled dot-product attention (HF `eager_attention_forward`, no mask).

    q, k, v: `[batch, length, heads * head_dim]`. Runs `dfm.models.attention.dot_product_attention`
    (float32 scores and softmax, scale `head_dim ** -0.5`) with `implementation` ("auto" | "xla" |
    "cudnn"). Returns `[batch, length, heads * head_dim]` in v's dtype.
    """
    b, n, d = q.shape
    hd = d // num_heads
    q, k, v = (t.reshape(b, n, num_heads, hd) for t in (q, k, v))
    return dot_product_attention(q, k, v, implementation=implementation).reshape(b, n, d)


class VisionMLP(nnx.Module):
    """`fc2(act(fc1(x)))`, HF `CLIPMLP` / `InternVLVisionMLP` (both Linears with bias)."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c = config
        self.fc1 = linear(c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs=rngs, use_bias=True)
        self.fc2 = linear(c, c.intermediate_size, c.hidden_size, ("mlp", "embed"), rngs=rngs, use_bias=True)
        self.act = activation(c.hidden_act)

    def __call__(self, x: Array) -> Array:
        """x: `[..., hidden]` -> `[..., hidden]`."""
        return dense(self.fc2, self.act(dense(self.fc1, x)))


# ---------------------------------------------------------------------- CLIP
class CLIPVisionEmbeddings(nnx.Module):
    """HF `CLIPVisionEmbeddings`: `[CLS; conv patches] + position_embedding` (no interpolation).

    Params: `class_embedding [hidden]`, `patch_embedding.kernel [p, p, channels, hidden]` (no bias),
    `position_embedding.embedding [1 + num_patches, hidden]`.
    """

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c, p = config, config.patch_size
        self.config = config
        self.class_embedding = normal_param(c, rngs.params(), (c.hidden_size,), ("embed",))
        self.patch_embedding = nnx.Conv(
            c.num_channels, c.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=c.compute_dtype, param_dtype=c.parameter_dtype,
            kernel_init=partitioned(nnx.initializers.normal(c.initializer_range), (None, None, None, "embed")),
            rngs=rngs)
        self.position_embedding = nnx.Embed(
            c.num_patches + 1, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.parameter_dtype,
            embedding_init=partitioned(nnx.initializers.normal(c.initializer_range), (None, "embed")), rngs=rngs)

    def __call__(self, pixel_values: Array) -> Array:
        """`[batch, H, W, C]` (checked) -> `[batch, 1 + num_patches, hidden]`."""
        x = check_pixels(pixel_values, self.config)
        patches = self.patch_embedding(x)                                  # [b, gh, gw, hidden]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])                # row-major patches
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPAttention(nnx.Module):
    """HF `CLIPAttention`: `q_proj`, `k_proj`, `v_proj`, `out_proj`, all with bias."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        c, h = config, config.hidden_size
        self.num_heads, self.attention = c.num_heads, c.attention
        self.q_proj = linear(c, h, h, ("embed", "heads"), rngs=rngs, use_bias=True)
        self.k_proj = linear(c, h, h, ("embed", "heads"), rngs=rngs, use_bias=True)
        self.v_proj = linear(c, h, h, ("embed", "heads"), rngs=rngs, use_bias=True)
        self.out_proj = linear(c, h, h, ("heads", "embed"), rngs=rngs, use_bias=True)

    def __call__(self, x: Array) -> Array:
        """x: `[batch, length, hidden]` -> `[batch, length, hidden]`."""
        out = multi_head_attention(dense(self.q_proj, x), dense(self.k_proj, x), dense(self.v_proj, x),
                                   self.num_heads, self.attention)
        return dense(self.out_proj, out)


class CLIPEncoderLayer(nnx.Module):
    """HF `CLIPEncoderLayer`: `x + self_attn(layer_norm1(x))`, then `x + mlp(layer_norm2(x))`."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, rngs=rngs)
        self.layer_norm1 = layer_norm(config, rngs=rngs)
        self.mlp = VisionMLP(config, rngs=rngs)
        self.layer_norm2 = layer_norm(config, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """x: `[batch, length, hidden]` -> same."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """HF `CLIPEncoder`: `layers[i]`, `CLIPEncoderLayer` each."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])


class CLIPVisionTower(nnx.Module):
    """CLIP ViT image encoder, HF `CLIPVisionModel` (= `CLIPVisionTransformer`) semantics and names.

    Args:
      config: `VisionConfig` with `arch="clip"`.
      rngs: `nnx.Rngs` for parameter initialization.

    Inputs are NHWC `pixel_values [batch, image_size, image_size, num_channels]` (see module doc);
    a different shape is a ValueError naming `pixel_values`.
    """

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        if config.arch != "clip":
            raise ValueError(f"config.arch: CLIPVisionTower needs arch='clip', got {config.arch!r}")
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = layer_norm(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.post_layernorm = layer_norm(config, rngs=rngs)

    def hidden_states(self, pixel_values: Array) -> tuple[Array, ...]:
        """All hidden states, as HF `output_hidden_states=True`: a tuple of `num_layers + 1` arrays
        `[batch, 1 + num_patches, hidden]`; entry 0 = `pre_layrnorm(embeddings)`, entry i = output
        of encoder layer i (the last one is not `post_layernorm`-ed)."""
        with precision_scope(self.config.matmul_precision):
            x = self.pre_layrnorm(self.embeddings(pixel_values))
            states = [x]
            for layer in self.encoder.layers:
                x = layer(x)
                states.append(x)
        return tuple(states)

    def __call__(self, pixel_values: Array) -> Array:
        """HF `last_hidden_state`: output of the last layer `[batch, 1 + num_patches, hidden]`."""
        return self.hidden_states(pixel_values)[-1]

    def pooled(self, pixel_values: Array) -> Array:
        """HF `pooler_output`: `post_layernorm` of the CLS token of the last layer, `[batch, hidden]`."""
        last = self(pixel_values)[:, 0]
        with precision_scope(self.config.matmul_precision):
            return self.post_layernorm(last)
