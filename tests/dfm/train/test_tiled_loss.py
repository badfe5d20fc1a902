"""dfm.train.tiled_loss: the vocabulary-tiled cross-entropy equals the plain path (logits ->
optax.softmax_cross_entropy_with_integer_labels) in value and in the gradients w.r.t. the hidden
states and the output projection, within 1e-5 in float32 (lengths not divisible by the chunk,
masks, both weight layouts, bfloat16 inputs with float32 accumulation); the compiled program never
holds a `[batch, length, vocab]` float32 buffer; `causal_lm_loss` on a Decoder (tied / untied) and
a MultimodalModel (packed rows too) equals the plain loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from tiny_models import build, cpu_devices, on_cpu, tiny_decoder

from dfm.models import Decoder, DecoderConfig, MultimodalConfig, MultimodalModel, VisionConfig
from dfm.sharding import MeshConfig, make_mesh
from dfm.train import make_grad_fn
from dfm.train.tiled_loss import causal_lm_loss, tiled_log_probs, tiled_nll

TOL = 1e-5


def problem(b, length, d, vocab, seed=0, dtype=jnp.float32, mask_p=0.7):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((b, length, d)), dtype)
    w = jnp.asarray(rng.standard_normal((d, vocab)) / np.sqrt(d) * 2.0, dtype)
    t = jnp.asarray(rng.integers(0, vocab, (b, length)), jnp.int32)
    m = jnp.asarray(rng.random((b, length)) < mask_p, jnp.float32)
    return h, w, t, m


def plain_loss(h, w, t, m):
    """The reference: float32 logits (float32 accumulation), optax CE, masked mean."""
    z = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32, precision="highest")
    ce = optax.softmax_cross_entropy_with_integer_labels(z, t)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def value_and_grads(fn, h, w):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, w)


def assert_close(got, want, tol=TOL):
    (v1, (dh1, dw1)), (v2, (dh2, dw2)) = got, want
    np.testing.assert_allclose(float(v1), float(v2), rtol=tol, atol=tol)
    for a, b in ((dh1, dh2), (dw1, dw2)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("b, length, d, vocab, chunk", [
    (2, 16, 8, 40, 4),      # chunk divides the length
    (2, 13, 8, 40, 5),      # it does not (zero-padded last chunk)
    (1, 7, 6, 33, 64),      # one chunk longer than the sequence
    (3, 9, 4, 17, 1),       # one position per chunk
])
@pytest.mark.parametrize("layout", ["hidden_vocab", "vocab_hidden"])
def test_value_and_gradients_equal_the_plain_path(b, length, d, vocab, chunk, layout):
    h, w, t, m = problem(b, length, d, vocab)
    want = value_and_grads(lambda h, w: plain_loss(h, w, t, m), h, w)
    if layout == "hidden_vocab":
        got = value_and_grads(lambda h, w: tiled_nll(h, w, t, m, chunk=chunk, matmul_precision="highest"), h, w)
    else:
        v, (dh, dwt) = value_and_grads(lambda h, wt: tiled_nll(h, wt, t, m, chunk=chunk, layout=layout,
                                                               matmul_precision="highest"), h, w.T)
        got = (v, (dh, dwt.T))
    assert_close(got, want)


@settings(max_examples=10)     # each example compiles two programs
@given(b=st.integers(1, 3), length=st.integers(1, 12), d=st.integers(1, 6), vocab=st.integers(2, 24),
       chunk=st.integers(1, 14), seed=st.integers(0, 2**16))
def test_property_equal_to_the_plain_path(b, length, d, vocab, chunk, seed):
    h, w, t, m = problem(b, length, d, vocab, seed=seed, mask_p=0.8)
    want = value_and_grads(lambda h, w: plain_loss(h, w, t, m), h, w)
    got = value_and_grads(lambda h, w: tiled_nll(h, w, t, m, chunk=chunk, matmul_precision="highest"), h, w)
    assert_close(got, want)


def test_sum_none_and_log_probs_are_the_plain_quantities():
    h, w, t, m = problem(2, 11, 8, 29, seed=1)
    z = jnp.einsum("bld,dv->blv", h, w, precision="highest")
    logp = jnp.take_along_axis(jax.nn.log_softmax(z), t[..., None], -1)[..., 0]
    got = tiled_log_probs(h, w, t, chunk=4, matmul_precision="highest")
    assert got.shape == (2, 11) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, logp, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(tiled_nll(h, w, t, m, chunk=4, reduction="none", matmul_precision="highest"),
                               -logp * m, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(tiled_nll(h, w, t, m, chunk=4, reduction="sum", matmul_precision="highest"),
                               -jnp.sum(logp * m), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(tiled_nll(h, w, t, chunk=4, matmul_precision="highest"), -jnp.mean(logp),
                               rtol=TOL, atol=TOL)


def test_masked_positions_contribute_nothing_even_with_out_of_range_targets():
    h, w, t, m = problem(2, 10, 8, 20, seed=2)
    bad = jnp.where(m > 0, t, -100)          # the usual ignore id at masked positions
    want = value_and_grads(lambda h, w: plain_loss(h, w, t, m), h, w)
    got = value_and_grads(lambda h, w: tiled_nll(h, w, bad, m, chunk=3, matmul_precision="highest"), h, w)
    assert_close(got, want)
    dh = got[1][0]
    assert float(jnp.abs(dh * (1 - m)[..., None]).max()) == 0.0   # no gradient reaches masked positions


def test_bfloat16_inputs_accumulate_in_float32():
    h, w, t, m = problem(2, 37, 16, 300, seed=3, dtype=jnp.bfloat16)
    got = value_and_grads(lambda h, w: tiled_nll(h, w, t, m, chunk=8), h, w)
    assert got[1][0].dtype == got[1][1].dtype == jnp.bfloat16
    # the loss: float32 logits of the same bfloat16 products in both paths
    want = value_and_grads(lambda h, w: plain_loss(h, w, t, m), h, w)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=TOL)
    # gradients: exact float32 gradient of the bfloat16-valued inputs, to bfloat16 rounding
    exact = value_and_grads(lambda h, w: plain_loss(h, w, t, m), h.astype(jnp.float32), w.astype(jnp.float32))
    for a, b in zip(got[1], exact[1]):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()


def test_the_compiled_program_holds_no_full_logits():
    """At [1, 512] tokens x 8192 ids the plain gradient needs several [512, 8192] float32 buffers
    (16 MiB each); the tiled one (chunk 64) needs one chunk's, far below one full buffer."""
    h, w, t, m = problem(1, 512, 32, 8192, seed=4)
    full = 512 * 8192 * 4

    def temp(fn):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp(lambda h, w: plain_loss(h, w, t, m))
    tiled = temp(lambda h, w: tiled_nll(h, w, t, m, chunk=64))
    assert plain >= full
    assert tiled < full / 2


@pytest.mark.parametrize("kw, match", [
    (dict(chunk=0), "chunk"), (dict(chunk=2.0), "chunk"), (dict(layout="vd"), "layout"),
    (dict(matmul_precision="fast"), "matmul_precision"), (dict(reduction="avg"), "reduction"),
])
def test_argument_errors_name_the_argument(kw, match):
    h, w, t, _ = problem(1, 4, 3, 5)
    with pytest.raises(ValueError, match=match):
        tiled_nll(h, w, t, **kw)


def test_shape_errors_name_the_argument():
    h, w, t, m = problem(1, 4, 3, 5)
    with pytest.raises(ValueError, match="weight"):
        tiled_nll(h, w.T, t)
    with pytest.raises(ValueError, match="targets"):
        tiled_nll(h, w, t[:, :3])
    with pytest.raises(ValueError, match="targets"):
        tiled_nll(h, w, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="hidden"):
        tiled_nll(h[0], w, t)
    with pytest.raises(ValueError, match="mask"):
        tiled_nll(h, w, t, m[:, :2])


# ----------------------------------------------------------------------------- the models
TEXT = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            matmul_precision="highest")


@nnx.jit(static_argnums=0)
def grads_of(tiled, model, kw):
    """`(loss, grads)` of `causal_lm_loss(model, **kw)` w.r.t. the Params, as training takes them."""
    return nnx.value_and_grad(lambda m: causal_lm_loss(m, tiled=tiled, chunk=5, **kw)[0])(model)


def assert_same_training_signal(model, **kw):
    plain, tiled = grads_of(False, model, kw), grads_of(True, model, kw)
    np.testing.assert_allclose(float(tiled[0]), float(plain[0]), rtol=TOL, atol=TOL)
    for a, b in zip(jax.tree.leaves(tiled[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("tied, output_size", [(True, None), (False, None), (True, 40)])
def test_causal_lm_loss_on_a_decoder(tied, output_size):
    model = build(Decoder, DecoderConfig(**TEXT, tie_word_embeddings=tied, output_size=output_size), scale=0.1)
    x = jnp.asarray(np.random.default_rng(5).integers(0, output_size or 48, (2, 14)), jnp.int32)
    mask = jnp.asarray(np.random.default_rng(6).random((2, 13)) < 0.6)
    assert_same_training_signal(model, tokens=x[:, :-1], targets=x[:, 1:], mask=mask)
    loss, count = causal_lm_loss(model, x[:, :-1], x[:, 1:], mask)
    assert float(count) == float(mask.sum())
    h, weight, layout = model.output_projection(model.hidden_states(x))
    z = jnp.einsum("bld,vd->blv" if layout == "vocab_hidden" else "bld,dv->blv", h, weight, precision="highest")
    np.testing.assert_allclose(z, model(x), rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_without_a_mask_is_the_mean_per_token():
    model = build(Decoder, DecoderConfig(**TEXT), scale=0.1)
    x = jnp.asarray(np.random.default_rng(7).integers(0, 48, (2, 9)), jnp.int32)
    logits = model(x[:, :-1])
    want = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
    loss, count = causal_lm_loss(model, x[:, :-1], x[:, 1:], chunk=3)
    np.testing.assert_allclose(float(loss), float(want), rtol=TOL)
    assert float(count) == 16


def test_causal_lm_loss_on_a_packed_multimodal_batch():
    vision = VisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_layers=2,
                          num_heads=2, matmul_precision="highest")
    config = MultimodalConfig(vision=vision, text=DecoderConfig(**TEXT), image_token_id=5)
    model = build(MultimodalModel, config, scale=0.1)
    n = config.num_image_tokens
    rng = np.random.default_rng(8)
    tokens = rng.integers(6, 48, (2, n + 8))
    tokens[0, 1:1 + n] = 5
    tokens[1, 3:3 + n] = 5
    segments = np.ones((2, n + 8), np.int32)
    segments[0, n + 4:] = 2
    segments[1, -2:] = 0
    pixels = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(tokens[:, 1:] != 5) & jnp.asarray(segments[:, 1:] > 0)
    assert_same_training_signal(model, tokens=tokens[:, :-1], targets=tokens[:, 1:], mask=mask, pixels=pixels,
                                segment_ids=jnp.asarray(segments[:, :-1]))
    hidden = model.hidden_states(tokens, pixels)
    np.testing.assert_allclose(model.language_model.logits(hidden), model(tokens, pixels), rtol=1e-6, atol=1e-6)


def test_causal_lm_loss_model_errors():
    model = build(Decoder, DecoderConfig(**TEXT), scale=0.1)
    x = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="pixels"):
        causal_lm_loss(model, x, x, pixels=jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(TypeError, match="model"):
        causal_lm_loss(object(), x, x)
    with pytest.raises(ValueError, match="causal"):
        causal_lm_loss(build(Decoder, DecoderConfig(**TEXT, causal=False)), x, x)


def _plain_lm(model, batch, key):
    del key
    return causal_lm_loss(model, batch[:, :-1], batch[:, 1:], tiled=False)[0], {}


def _tiled_lm(model, batch, key):
    del key
    return causal_lm_loss(model, batch[:, :-1], batch[:, 1:], chunk=4)[0], {}


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_tiled_loss_on_a_device_mesh_equals_the_plain_loss_on_one_device(mesh_shape):
    """The sharded step (batch split over data x fsdp, the vocabulary over tensor: the chunks'
    logits carry the model's "activation_vocab" constraint) gives the one-device plain gradients."""
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                           num_kv_heads=2)
    data = np.random.default_rng(9).integers(0, 64, (8, 11)).astype(np.int32)
    with on_cpu():
        loss, _, grads = make_grad_fn(_plain_lm, tiny_decoder(config))(jnp.asarray(data), jax.random.key(0))
        mesh = make_mesh(MeshConfig(*mesh_shape), devices=cpu_devices(8))
        got_loss, _, got = make_grad_fn(_tiled_lm, tiny_decoder(config), mesh=mesh)(data, jax.random.key(0))
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=TOL, atol=TOL)
    want = dict(nnx.to_flat_state(grads))
    for path, var in nnx.to_flat_state(got):
        np.testing.assert_allclose(np.asarray(var.get_value()), np.asarray(want[path].get_value()),
                                   rtol=TOL, atol=TOL)
