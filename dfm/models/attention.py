"""Scaled dot-product attention for every model: `jax.nn.dot_product_attention`, XLA or cuDNN.

One entry point, `dot_product_attention`, for the cases the models need: causal (AR decoder),
bidirectional (masked DFM denoiser, vision towers), padded (a boolean key mask), grouped-query
(GQA: `kv_heads` divides `heads`), and the KV cache (queries at positions `start..start+n-1`
over a cache of `max_length` keys, a mask saying which are written and visible).
`reference_attention` is the plain einsum form the models used before (float32 scores
`[batch, heads, q_len, k_len]`, float32 softmax), kept as the exactness reference for tests.

Implementations (the `attention` field of `DecoderConfig` / `VisionConfig`; `dfm.models.numerics`):
"xla" materialises the scores like the reference; "cudnn" is cuDNN flash attention (NVIDIA GPU,
bfloat16 / float16 inputs, head size a multiple of 8 up to 128; fused, never materialises the
scores); "auto" takes cuDNN where it applies (GPU backend, such dtypes, no explicit mask: causal
or unmasked attention) and XLA elsewhere. A query row whose mask is all False gets uniform
weights under XLA and the reference (never NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfm.models.numerics import ATTENTION_IMPLEMENTATIONS, check_choice

Array = jax.Array
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_applies(dtype, head_dim: int) -> bool:
    """True when cuDNN flash attention can run here: a GPU backend, `dtype` bfloat16 / float16 and
    `head_dim` a multiple of 8 no larger than 128."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES
            and head_dim % 8 == 0 and head_dim <= 128)


def resolve_implementation(implementation: str, dtype, head_dim: int, *, has_mask: bool = False) -> str:
    """"xla" or "cudnn" for a config's `attention` value (see module doc for "auto").

    Raises ValueError naming `attention` for an unknown value.
    """
    check_choice("attention", implementation, ATTENTION_IMPLEMENTATIONS)
    if implementation != "auto":
        return implementation
    return "cudnn" if (not has_mask and cudnn_applies(dtype, head_dim)) else "xla"


def dot_product_attention(q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None,
                          implementation: str = "auto") -> Array:
    """softmax(q k^T / sqrt(head_dim), masked) v for every query head.

    Args:
      q: `[batch, q_len, heads, head_dim]` queries.
      k, v: `[batch, k_len, kv_heads, head_dim]` keys / values (q's dtype); `kv_heads` divides
        `heads`, query head h reads key/value head `h // (heads // kv_heads)` (HF `repeat_kv`).
      causal: query i sees keys j <= i (indices, top-left aligned when k_len > q_len).
      mask: optional `[batch, 1, q_len, k_len]` bool, True = may attend (padding, cache slots,
        position-based causality); combined with `causal`.
      implementation: "auto" | "xla" | "cudnn" (module doc).
    Returns:
      `[batch, q_len, heads, head_dim]` in q's dtype. Scores and softmax are float32.

    Raises:
      ValueError: an unknown `implementation`, or shapes / dtypes `jax.nn.dot_product_attention`
        rejects (e.g. "cudnn" with float32 inputs or off a GPU).
    """
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1], has_mask=mask is not None)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)


def reference_attention(q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None) -> Array:
    """The einsum reference of `dot_product_attention` (same arguments and result; XLA only).

    Scores `[batch, kv_heads, groups, q_len, k_len]` in float32, masked entries set to the float32
    minimum (a fully masked row is uniform), float32 softmax cast to v's dtype.
    """
    b, n, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, n, kv, h // kv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    allowed = jnp.ones((b, 1, n, k.shape[1]), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((n, k.shape[1]), bool))[None, None]
    if mask is not None:
        allowed = allowed & mask
    scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, n, h, d)
