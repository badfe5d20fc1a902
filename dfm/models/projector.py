"""Vision-to-text projectors (HF LLaVA / InternVL) and InternVL's `pixel_shuffle`.

`LlavaProjector`: HF `LlavaMultiModalProjector`, `linear_2(act(linear_1(x)))`.
`InternVLProjector`: HF `InternVLMultiModalProjector`, `linear_2(act(linear_1(layer_norm(x))))` on
pixel-shuffled features of width `vision_hidden * int(1 / downsample_ratio) ** 2`.
Parameter mapping to HF: Linear `kernel` = HF `weight` transposed; LayerNorm `scale` / `bias` = HF
`weight` / `bias`; biases identical.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.layers import dense, partitioned
from dfm.models.vision import activation

Array = jax.Array

PROJECTOR_LAYER_NORM_EPS = 1e-5
"""Epsilon of InternVL's projector `layer_norm` (HF builds it as `nn.LayerNorm(d)`, torch's default)."""


def pixel_shuffle(features: Array, scale_factor: float) -> Array:
    """InternVL's pixel-shuffle downsampling, exactly HF `InternVLModel.pixel_shuffle`.

    Args:
      features: `[batch, d1, d2, channels]` (InternVL passes the patch grid reshaped row-major, so
        `d1` = patch rows, `d2` = patch columns; HF names them `width, height`).
      scale_factor: e.g. 0.5; `d1 * scale_factor`, `d2 * scale_factor`, `channels / scale_factor` and
        `channels / scale_factor ** 2` must be integers.
    Returns:
      `[batch, d1 * s, d2 * s, channels / s**2]`, computed with HF's exact sequence of row-major
      reshapes and transposes: reshape to `[b, d1, d2*s, c/s]`, swap axes 1 and 2, reshape to
      `[b, d2*s, d1*s, c/s**2]`, swap axes 1 and 2 back. For `s = 0.5` output cell `(i, j)` holds
      the 2x2 input block rows `2i, 2i+1`, columns `2j, 2j+1`, their channel vectors concatenated
      in the order `(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`.
    Raises:
      ValueError: (`features` / `scale_factor`) wrong rank or sizes that do not divide.
    """
    x = jnp.asarray(features)
    if x.ndim != 4:
        raise ValueError(f"features: expected shape [batch, d1, d2, channels], got {x.shape}")
    b, d1, d2, c = x.shape
    sizes = (d1 * scale_factor, d2 * scale_factor, c / scale_factor, c / scale_factor ** 2)
    if not scale_factor > 0 or any(abs(v - round(v)) > 1e-9 or round(v) < 1 for v in sizes):
        raise ValueError(f"scale_factor: {scale_factor!r} does not divide features of shape {x.shape} "
                         f"(need integer d1*s, d2*s, c/s, c/s**2)")
    n1, n2, c1, c2 = (int(round(v)) for v in sizes)
    x = x.reshape(b, d1, n2, c1)
    x = jnp.swapaxes(x, 1, 2)
    x = x.reshape(b, n2, n1, c2)
    return jnp.swapaxes(x, 1, 2)


def _linear(d_in: int, d_out: int, names: tuple, *, use_bias: bool, dtype, param_dtype, std: float,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.normal(std), names),
        bias_init=partitioned(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


class LlavaProjector(nnx.Module):
    """HF `LlavaMultiModalProjector`: `linear_2(act(linear_1(x)))`, `[..., in_features] -> [..., out_features]`.

    Args:
      in_features: vision hidden size (times the number of feature layers in HF; one here).
      out_features: text hidden size (`linear_1` and `linear_2` both output it).
      act: HF `projector_hidden_act` name (see `dfm.models.vision.ACTIVATION_NAMES`).
      use_bias: HF `multimodal_projector_bias`.
      dtype, param_dtype: computation / storage dtypes. initializer_range: normal init std.
    """

    def __init__(self, in_features: int, out_features: int, *, act: str = "gelu", use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, initializer_range: float = 0.02, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, std=initializer_range, rngs=rngs)
        self.linear_1 = _linear(in_features, out_features, ("embed", "mlp"), **kw)
        self.act = activation(act)
        self.linear_2 = _linear(out_features, out_features, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        """x: `[..., in_features]` -> `[..., out_features]`."""
        return dense(self.linear_2, self.act(dense(self.linear_1, x)))


class InternVLProjector(nnx.Module):
    """HF `InternVLMultiModalProjector`: `linear_2(act(linear_1(layer_norm(x))))`.

    Args:
      vision_hidden: vision hidden size; the input width is
        `vision_hidden * int(1 / downsample_ratio) ** 2` (the pixel-shuffled features).
      out_features: text hidden size.
      downsample_ratio: HF `downsample_ratio` (0.5 in InternVL 2.5 / 3).
      act: HF `projector_hidden_act`.
      dtype, param_dtype, initializer_range: as `LlavaProjector`.
    All three layers have biases (as HF); `layer_norm` epsilon is `PROJECTOR_LAYER_NORM_EPS`.
    """

    def __init__(self, vision_hidden: int, out_features: int, downsample_ratio: float, *, act: str = "gelu",
                 dtype=jnp.float32, param_dtype=jnp.float32, initializer_range: float = 0.02, rngs: nnx.Rngs):
        self.in_features = vision_hidden * int(1 / downsample_ratio) ** 2
        self.layer_norm = nnx.LayerNorm(
            self.in_features, epsilon=PROJECTOR_LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
            use_fast_variance=False, scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, std=initializer_range, rngs=rngs)
        self.linear_1 = _linear(self.in_features, out_features, ("embed", "mlp"), **kw)
        self.act = activation(act)
        self.linear_2 = _linear(out_features, out_features, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        """x: `[..., in_features]` -> `[..., out_features]`."""
        return dense(self.linear_2, self.act(dense(self.linear_1, self.layer_norm(x))))
