"""GPU-only checks (the `gpu` marker: skipped unless `jax.default_backend() == "gpu"`, tests/conftest.py).

- cuDNN flash attention (`implementation="cudnn"`) against the einsum reference on the same bf16
  inputs, causal and bidirectional, with GQA: outputs and gradients within bf16 tolerance;
- a bf16-compute decoder (float32 parameters) with `attention="auto"` (cuDNN here) against the same
  weights with `attention="xla"`;
- a float32 decoder at `matmul_precision="highest"` on the GPU against the same model on the CPU.

Run on a GPU machine: `PYTHONPATH=. python -m pytest -m gpu tests/dfm/models/test_attention_gpu.py` (docs/accelerators.md).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.models import Decoder, DecoderConfig
from dfm.models.attention import (
    dot_product_attention,
    reference_attention,
    resolve_implementation,
)

pytestmark = pytest.mark.gpu

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 256, 8, 2, 64
BF16_ATOL = 2e-2


def qkv(seed=0):
    """bf16 queries `[2, 256, 8, 64]` and GQA keys / values `[2, 256, 2, 64]`, N(0, 1)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (BATCH, LENGTH, HEADS, HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (BATCH, LENGTH, KV_HEADS, HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (BATCH, LENGTH, KV_HEADS, HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
    return q, k, v


def max_abs(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_matches_the_reference_on_the_same_bf16_inputs(causal):
    q, k, v = qkv()
    cudnn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=causal, implementation="cudnn"))
    assert "cudnn" in cudnn.lower(q, k, v).compile().as_text().lower()     # the fused kernel really runs
    out = cudnn(q, k, v)
    ref = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=causal))(q, k, v)
    assert out.shape == ref.shape == (BATCH, LENGTH, HEADS, HEAD_DIM) and out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    # bf16 tolerance: atol 2e-2, plus 1% of the value (one bf16 ulp at |x| >= 4 is 0.031)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=BF16_ATOL, rtol=1e-2)
    assert float(jnp.std(ref.astype(jnp.float32))) > 0.05          # not trivially small outputs


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_gradients_match_the_reference(causal):
    q, k, v = qkv(1)
    weights = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, HEADS, HEAD_DIM), jnp.float32)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)

    def cudnn(q, k, v):
        return dot_product_attention(q, k, v, causal=causal, implementation="cudnn")

    def ref(q, k, v):
        return reference_attention(q, k, v, causal=causal)

    got = jax.jit(jax.grad(loss(cudnn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name
        scale = max(1.0, float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
        assert max_abs(g, w) <= BF16_ATOL * scale, (name, max_abs(g, w), scale)


def _same_weights(model: Decoder, config: DecoderConfig) -> Decoder:
    """A `Decoder(config)` holding `model`'s parameters (configs differing only in runtime knobs)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
    return nnx.merge(graphdef, state)


def test_bf16_decoder_with_cudnn_attention_matches_xla_attention():
    config = DecoderConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                           num_kv_heads=2, dtype="bfloat16", param_dtype="float32", attention="auto")
    assert resolve_implementation("auto", jnp.bfloat16, config.head_size) == "cudnn"
    auto = Decoder(config, rngs=nnx.Rngs(0))
    xla = _same_weights(auto, config.replace(attention="xla"))
    tokens = jax.random.randint(jax.random.key(3), (2, LENGTH), 0, config.vocab_size, dtype=jnp.int32)
    forward = nnx.jit(lambda m, t: m(t))
    a, b = forward(auto, tokens), forward(xla, tokens)
    assert a.dtype == b.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))
    assert float(jnp.std(b)) > 0.1
    assert max_abs(a, b) <= BF16_ATOL, max_abs(a, b)


def test_highest_precision_float32_decoder_matches_the_cpu():
    config = DecoderConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                           num_kv_heads=2, matmul_precision="highest")
    model = Decoder(config, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(4), (2, 64), 0, config.vocab_size, dtype=jnp.int32)
    on_gpu = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    assert jax.tree.leaves(nnx.state(model))[0].devices().pop().platform == "gpu"
    cpu = jax.devices("cpu")[0]
    graphdef, state = nnx.split(model)
    with jax.default_device(cpu):
        cpu_model = nnx.merge(graphdef, jax.device_put(state, cpu))
        on_cpu = np.asarray(nnx.jit(lambda m, t: m(t))(cpu_model, jax.device_put(tokens, cpu)))
    assert float(np.std(on_cpu)) > 0.1
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-5, rtol=0)
