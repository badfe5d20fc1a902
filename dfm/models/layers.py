"""Building blocks of the LLaMA / Qwen2 decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, block.

Layout follows HF `LlamaDecoderLayer` / `Qwen2DecoderLayer` so checkpoints map one-to-one:
`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`. Linear kernels are stored flax-style as `kernel [in, out]` (HF
`weight [out, in]` transposed), norm weights as `scale`, biases as `bias`.

Every parameter carries logical axis names (`nnx.with_partitioning`): "embed" (hidden),
"mlp" (SwiGLU width), "heads" (the fused `num_heads * head_dim` axis of q / o), "kv_heads" (the
fused `num_kv_heads * head_dim` axis of k / v), "norm" (norm scales), "vocab". A sharding
issue only adds a mesh and logical-to-mesh rules; without a mesh the names are inert metadata.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.attention import dot_product_attention
from dfm.models.config import DecoderConfig
from dfm.sharding.rules import constrain

Array = jax.Array


def partitioned(init, names: tuple[str, ...]):
    """`init` annotated with logical axis `names` (`nnx.with_partitioning`).

    Parameters are placed eagerly only when a mesh is active at construction (`jax.set_mesh`
    plus flax logical axis rules, e.g. inside `dfm.sharding.use_rules`); with no mesh (plain
    CPU) the names are kept as metadata only, readable with `nnx.get_partition_spec`. The
    recommended placement is after construction (`dfm.sharding.shard_module`) or jitted
    (`dfm.sharding.init_sharded`), which also handle sizes a mesh axis does not divide.
    """
    has_mesh = not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, names, eager_sharding=has_mesh and nnx.using_eager_sharding())


def dense_init(config: DecoderConfig, names: tuple[str, ...]):
    """Normal(0, initializer_range) initializer carrying logical axis `names`."""
    return partitioned(nnx.initializers.normal(config.initializer_range), names)


def linear(config: DecoderConfig, d_in: int, d_out: int, names: tuple[str, str], *, rngs: nnx.Rngs,
           use_bias: bool = False) -> nnx.Linear:
    """An `nnx.Linear` `[d_in] -> [d_out]` with logical names on kernel (and bias: `names[1:]`)."""
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
        kernel_init=dense_init(config, names),
        bias_init=partitioned(nnx.initializers.zeros_init(), names[1:]), rngs=rngs,
    )


def dense(layer: nnx.Linear, x: Array) -> Array:
    """Apply `layer` to `x [..., d_in]` as one 2-D matmul: `[prod(...), d_in] -> [..., d_out]`.

    Same values as `layer(x)`. Flattening the leading axes first matters for speed: with a 3-D
    input XLA:CPU builds the weight gradient (a contraction over two axes) through transposing
    copies of the `[batch * length, d]` activations (~40% of a decoder training step; see
    benchmarks/README.md, fix A).
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, HF `LlamaRMSNorm`: `scale * x / sqrt(mean(x**2) + eps)`.

    The statistic is computed in float32 and cast back to the input dtype before scaling (as HF).
    Parameter: `scale [hidden]`, logical axes ("norm",).
    """

    def __init__(self, size: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        init = partitioned(nnx.initializers.ones_init(), ("norm",))
        self.scale = nnx.Param(init(jax.random.key(0), (size,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """x: `[..., hidden]` -> `[..., hidden]` in x's dtype."""
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rotate_half(x: Array) -> Array:
    """HF `rotate_half`: `[x1, x2] -> [-x2, x1]` over the last axis split in halves."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """RoPE tables, HF `LlamaRotaryEmbedding` (default rope type).

    Args:
      positions: `[batch, length]` int positions.
      head_dim: even per-head width.
      theta: base frequency (`rope_theta`).
    Returns:
      `(cos, sin)`, each `[batch, length, head_dim]` float32 with frequencies
      `theta ** (-2j / head_dim)` repeated over both halves.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                        # [B, L, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array, *, heads_axis: int = 2) -> Array:
    """Rotate `x` by position: `x cos + rotate_half(x) sin` (HF `apply_rotary_pos_emb`).

    x: `[batch, length, heads, head_dim]` (`heads_axis=2`) or `[batch, heads, length, head_dim]`
    (`heads_axis=1`); cos, sin: `[batch, length, head_dim]`. Returns x's shape and dtype.
    """
    cos, sin = jnp.expand_dims(cos, heads_axis), jnp.expand_dims(sin, heads_axis)
    out = x.astype(jnp.float32) * cos + rotate_half(x.astype(jnp.float32)) * sin
    return out.astype(x.dtype)


def attention_weights_mask(q_positions: Array, k_positions: Array, *, causal: bool,
                           key_mask: Array | None = None, q_segments: Array | None = None,
                           k_segments: Array | None = None) -> Array:
    """Boolean mask `[batch, 1, q_len, k_len]`: True where query i may attend to key j.

    Causal: `k_positions[j] <= q_positions[i]`. `key_mask [batch, k_len]` (True = real token)
    removes padded / unwritten keys. `q_segments [batch, q_len]` / `k_segments [batch, k_len]`
    (int, packed sequences; both or neither): only keys of the query's own segment,
    `k_segments[j] == q_segments[i]` (segment 0, the padding, sees only padding: never an empty
    row for a padding query that sees itself).
    """
    if causal:
        mask = k_positions[:, None, :] <= q_positions[:, :, None]
    else:
        mask = jnp.ones((q_positions.shape[0], q_positions.shape[1], k_positions.shape[1]), bool)
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].astype(bool)
    if (q_segments is None) != (k_segments is None):
        raise ValueError("q_segments, k_segments: give both or neither")
    if q_segments is not None:
        mask = mask & (k_segments[:, None, :] == q_segments[:, :, None])
    return mask[:, None]


def segment_positions(segment_ids: Array) -> Array:
    """Positions restarting at 0 in every segment of packed rows.

    segment_ids: `[batch, length]` int, each segment one contiguous run of equal ids (0 = padding).
    Returns `[batch, length]` int32: the index minus the index where its run starts (the positions
    each sequence would have alone; a new run starts wherever the id changes), 0 on padding.
    """
    segment_ids = jnp.asarray(segment_ids)
    n = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.where(segment_ids == 0, 0, index - first)


class Attention(nnx.Module):
    """Multi-head attention with GQA and RoPE, HF `LlamaAttention` / `Qwen2Attention`.

    Query head h reads key/value head `h // (num_heads // num_kv_heads)` (HF `repeat_kv`).
    Softmax in float32 with scale `head_dim ** -0.5`, through
    `dfm.models.attention.dot_product_attention` (`config.attention`: XLA, or cuDNN flash
    attention on a GPU). Queries, keys and values are laid out `[batch, length, heads,
    head_dim]`, the layout `jax.nn.dot_product_attention` takes (the KV cache keeps HF's
    `[batch, kv_heads, max_length, head_dim]`; see `DecoderLayer`). Projections run on 2-D
    inputs (`dense`).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, d = config, config.head_size
        bias = c.attention_bias
        self.q_proj = linear(c, c.hidden_size, c.num_heads * d, ("embed", "heads"), rngs=rngs, use_bias=bias)
        self.k_proj = linear(c, c.hidden_size, c.kv_heads * d, ("embed", "kv_heads"), rngs=rngs, use_bias=bias)
        self.v_proj = linear(c, c.hidden_size, c.kv_heads * d, ("embed", "kv_heads"), rngs=rngs, use_bias=bias)
        self.o_proj = linear(c, c.num_heads * d, c.hidden_size, ("heads", "embed"), rngs=rngs)

    def project_kv(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """Keys (rotated) and values `[batch, length, kv_heads, head_dim]` of `x [batch, length, hidden]`.

        cos, sin: RoPE tables `[batch, length, head_dim]` of the positions of `x`.
        """
        b, n, _ = x.shape
        c = self.config
        k = dense(self.k_proj, x).reshape(b, n, c.kv_heads, c.head_size)
        v = dense(self.v_proj, x).reshape(b, n, c.kv_heads, c.head_size)
        return apply_rope(k, cos, sin), v

    def attend(self, x: Array, cos: Array, sin: Array, k: Array, v: Array, *, causal: bool = False,
               mask: Array | None = None) -> Array:
        """Attention of queries from `x [batch, q_len, hidden]` over `k, v [batch, k_len, kv_heads, head_dim]`.

        cos, sin: RoPE tables of the queries `[batch, q_len, head_dim]`. `causal`: query i sees
        keys j <= i (by index); `mask`: optional `[batch, 1, q_len, k_len]` bool (True = may
        attend), combined with `causal`. Returns `[batch, q_len, hidden]`. A query row whose mask
        is all False gets uniform weights (never NaN).
        """
        c = self.config
        b, n, _ = x.shape
        q = apply_rope(dense(self.q_proj, x).reshape(b, n, c.num_heads, c.head_size), cos, sin)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=causal, mask=mask,
                                    implementation=c.attention)
        return dense(self.o_proj, out.reshape(b, n, c.num_heads * c.head_size))


class MLP(nnx.Module):
    """SwiGLU feed-forward, HF `LlamaMLP`: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = linear(c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs=rngs)
        self.up_proj = linear(c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs=rngs)
        self.down_proj = linear(c, c.intermediate_size, c.hidden_size, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """x: `[..., hidden]` -> `[..., hidden]`. The hidden `[batch, length, mlp]` is constrained to
        ("activation_batch", "activation_length", "activation_mlp") under `dfm.sharding.use_rules`."""
        hidden = jax.nn.silu(dense(self.gate_proj, x)) * dense(self.up_proj, x)
        if hidden.ndim == 3:
            hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(self.down_proj, hidden)


class DecoderLayer(nnx.Module):
    """Pre-norm block, HF `LlamaDecoderLayer`: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.parameter_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, param_dtype=config.parameter_dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, *, causal: bool = False, mask: Array | None = None,
                 kv: tuple[Array, Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """One block.

        Args:
          x: `[batch, q_len, hidden]`.
          cos, sin: RoPE tables of the queries `[batch, q_len, head_dim]`.
          causal: query i sees keys j <= i (by index).
          mask: optional `[batch, 1, q_len, k_len]` bool, True = may attend (with `causal`).
          kv: None (keys = this chunk, `k_len = q_len`) or `(k_cache, v_cache, start)`: caches
            `[batch, kv_heads, max_length, head_dim]` (HF's cache layout) into which this chunk's
            keys/values are written at position `start` (scalar int, may be traced);
            `k_len = max_length`. The attention reads them through a swapped view, which XLA
            folds into its matmuls (on CPU, the `[batch, max_length, ...]` layout made XLA copy
            the whole cache at every decode step: benchmarks/README.md, fix B).
        Returns:
          `(x_out [batch, q_len, hidden], (k, v))` where `(k, v)` are the updated caches (or this
          chunk's keys/values `[batch, q_len, kv_heads, head_dim]` when `kv` is None).
        """
        h = self.input_layernorm(x)
        k, v = self.self_attn.project_kv(h, cos, sin)
        if kv is not None:   # caches in HF layout [batch, kv_heads, max_length, head_dim]
            k_cache, v_cache, start = kv
            zero = jnp.zeros((), jnp.int32)
            idx = (zero, zero, jnp.asarray(start, jnp.int32), zero)
            k_cache = jax.lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2).astype(k_cache.dtype), idx)
            v_cache = jax.lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), idx)
            k, v = jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2)
        x = x + self.self_attn.attend(h, cos, sin, k, v, causal=causal, mask=mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if kv is not None:
            return x, (k_cache, v_cache)
        return x, (k, v)


def make_layers(config: DecoderConfig, rngs: nnx.Rngs):
    """The decoder's `num_layers` blocks: an `nnx.List` of `DecoderLayer`s, or with
    `config.scan_layers` one `DecoderLayer` whose parameters are stacked on a leading axis of size
    `num_layers` (logical axis name "layers", built with `nnx.vmap` over split rngs; run with
    `nnx.scan`)."""
    if not config.scan_layers:
        return nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return DecoderLayer(config, rngs=rngs)

    return create(rngs)
