"""`dfm.models.attention` against an independent float64 NumPy attention, every case the models use.

Cases: causal, bidirectional, padded keys, GQA, a KV-cache mask (queries at an offset over a
longer key axis), a fully masked row (uniform weights), bfloat16 inputs; and the decoder /
vision models with `attention="xla"` against HF-style numerics already covered by the parity
tests. cuDNN runs only on a GPU (tests/dfm/models/test_attention_gpu.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.models import Decoder, DecoderConfig
from dfm.models.attention import (
    dot_product_attention,
    reference_attention,
    resolve_implementation,
)
from dfm.models.layers import apply_rope, dense, rope_cos_sin


def numpy_attention(q, k, v, allowed):
    """float64 loop over heads: HF `repeat_kv`, softmax over allowed keys; a row with none allowed
    is uniform over all keys (what a large negative fill gives)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, n, h, d = q.shape
    groups = h // k.shape[2]
    out = np.zeros((b, n, h, d))
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, :, hi // groups], v[bi, :, hi // groups]
            scores = q[bi, :, hi] @ kh.T / np.sqrt(d)
            for qi in range(n):
                row = allowed[bi, qi]
                w = np.where(row, np.exp(scores[qi] - scores[qi][row].max()), 0.0) if row.any() \
                    else np.ones(kh.shape[0])
                out[bi, qi, hi] = (w / w.sum()) @ vh
    return out


def inputs(seed, b, n, s, h, kv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, n, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kv, d), dtype)
    return q, k, v


def check(q, k, v, allowed, *, causal=False, mask=None, atol=2e-6):
    expected = numpy_attention(q, k, v, allowed)
    with jax.default_matmul_precision("highest"):          # full float32 on GPU / TPU too (a no-op on CPU)
        outputs = (dot_product_attention(q, k, v, causal=causal, mask=mask, implementation="xla"),
                   dot_product_attention(q, k, v, causal=causal, mask=mask, implementation="auto"),
                   reference_attention(q, k, v, causal=causal, mask=mask))
    for got in outputs:
        assert got.shape == q.shape and got.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=atol, rtol=0)


@settings(max_examples=12)
@given(st.integers(1, 2), st.integers(1, 9), st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]),
       st.sampled_from([8, 16]), st.booleans(), st.integers(0, 10_000))
def test_causal_and_bidirectional_with_gqa(b, n, heads, d, causal, seed):
    h, kv = heads
    q, k, v = inputs(seed, b, n, n, h, kv, d)
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    check(q, k, v, np.broadcast_to(allowed, (b, n, n)), causal=causal)


def test_padded_keys_and_a_fully_masked_row():
    b, n, h, kv, d = 2, 6, 4, 2, 8
    q, k, v = inputs(1, b, n, n, h, kv, d)
    key_mask = np.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
    allowed = np.tril(np.ones((n, n), bool))[None] & key_mask[:, None, :]
    assert not allowed[1, 0].any()                       # query 0 of row 1 sees nothing: uniform
    check(q, k, v, allowed, mask=jnp.asarray(allowed)[:, None])


def test_cache_mask_queries_at_an_offset():
    """Queries at positions start..start+n-1 over a cache of max_length keys (keys > position hidden)."""
    b, n, s, h, kv, d, start = 2, 3, 10, 4, 2, 8, 4
    q, k, v = inputs(2, b, n, s, h, kv, d)
    allowed = np.arange(s)[None, :] <= (start + np.arange(n))[:, None]
    allowed = np.broadcast_to(allowed, (b, n, s))
    check(q, k, v, allowed, mask=jnp.asarray(allowed)[:, None])
    # causal with k_len > q_len is top-left aligned: query i sees keys 0..i
    top_left = np.broadcast_to(np.arange(s)[None, :] <= np.arange(n)[:, None], (b, n, s))
    check(q, k, v, top_left, causal=True)


def test_bfloat16_inputs_float32_softmax():
    q, k, v = inputs(3, 2, 16, 16, 4, 2, 16, jnp.bfloat16)
    allowed = np.broadcast_to(np.tril(np.ones((16, 16), bool)), (2, 16, 16))
    check(q, k, v, allowed, causal=True, atol=3e-2)


def test_implementation_choice():
    assert resolve_implementation("xla", jnp.bfloat16, 64) == "xla"
    assert resolve_implementation("cudnn", jnp.float32, 64) == "cudnn"
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_implementation("auto", jnp.bfloat16, 64) == ("cudnn" if on_gpu else "xla")
    assert resolve_implementation("auto", jnp.float32, 64) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 64, has_mask=True) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 12) == "xla"        # not a multiple of 8
    with pytest.raises(ValueError, match="attention"):
        resolve_implementation("flash", jnp.float32, 64)
    with pytest.raises(ValueError, match="attention"):
        DecoderConfig(vocab_size=8, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2,
                      attention="flash")


def test_decoder_attention_paths_agree_with_the_numpy_reference():
    """A decoder layer's attention output from the model equals the NumPy attention of its own
    q / k / v (causal, GQA, padded), so the model wires the kernel in correctly."""
    c = DecoderConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=2)
    model = Decoder(c, rngs=nnx.Rngs(0))
    with jax.default_matmul_precision("highest"):          # full float32 on GPU / TPU too
        _check_decoder_attention(model, c)


def _check_decoder_attention(model, c):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 7)))
    key_mask = np.array([[1] * 7, [1] * 5 + [0] * 2], bool)
    layer, attn = model.layers[0], model.layers[0].self_attn
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    cos, sin = rope_cos_sin(positions, c.head_size, c.rope_theta)
    h = layer.input_layernorm(model.embed(tokens))
    k, v = attn.project_kv(h, cos, sin)
    q = apply_rope(dense(attn.q_proj, h).reshape(2, 7, 4, c.head_size), cos, sin)
    allowed = np.tril(np.ones((7, 7), bool))[None] & key_mask[:, None, :]
    expected = numpy_attention(q, k, v, allowed).reshape(2, 7, -1) @ np.asarray(attn.o_proj.kernel[...], np.float64)
    got = attn.attend(h, cos, sin, k, v, mask=jnp.asarray(allowed)[:, None])
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=2e-6)
    got = attn.attend(h, cos, sin, k, v, causal=True)
    full = np.tril(np.ones((7, 7), bool))[None].repeat(2, 0)
    expected = numpy_attention(q, k, v, full).reshape(2, 7, -1) @ np.asarray(attn.o_proj.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=2e-6)
