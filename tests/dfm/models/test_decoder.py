"""Tests for dfm.models: decoder (causality, GQA, RoPE, KV cache, greedy generation, config, axis
names, HF parity) and the sequence classifier."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.models import Decoder, DecoderConfig, SequenceClassifier, greedy_generate
from dfm.models.hf import assign_hf_weights, hf_name
from dfm.models.layers import apply_rope, rope_cos_sin

VOCAB = 50


def tiny(**kw) -> DecoderConfig:
    """Full float32 matmuls ("highest"): the exactness and HF-parity checks here hold on GPU / TPU too."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                matmul_precision="highest")
    base.update(kw)
    return DecoderConfig(**base)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def build(config, seed=0, scale=0.2, cls=Decoder, *args):
    """`cls(config, *args)` with every parameter (biases, norm scales too) drawn from a seeded numpy
    Generator, so no test passes by zeros. The module is traced abstractly (`nnx.eval_shape`) and
    then filled, which avoids compiling jax.random for every parameter shape (keeps tests fast)."""
    model = nnx.eval_shape(lambda: cls(config, *args, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_raw_value(jnp.asarray(base + scale * rng.standard_normal(var.shape), var.dtype))
    return model


@pytest.fixture(scope="module")
def causal_model():
    return build(tiny(attention_bias=True))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 10), 0, VOCAB, dtype=jnp.int32)


def test_causal_logits_ignore_future_tokens(causal_model, tokens):
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)
    a, b = forward(causal_model, tokens), forward(causal_model, changed)
    assert a.shape == (2, 10, VOCAB) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-3


def test_bidirectional_logits_see_future_tokens(tokens):
    model = build(tiny(causal=False))
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)
    a, b = forward(model, tokens), forward(model, changed)
    assert float(jnp.abs(a[:, :6] - b[:, :6]).min(axis=-1).max()) > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads(tokens):
    gqa = build(tiny(num_kv_heads=2, attention_bias=True), seed=3)
    mha = build(tiny(num_kv_heads=4, attention_bias=True), seed=1)
    groups, head_dim = 2, 8
    for src, dst in zip(gqa.layers, mha.layers):
        for name in ("k_proj", "v_proj"):
            s, d = getattr(src.self_attn, name), getattr(dst.self_attn, name)
            kernel = s.kernel[...].reshape(32, 2, head_dim)          # [embed, kv_heads, head_dim]
            d.kernel[...] = jnp.repeat(kernel, groups, axis=1).reshape(32, 4 * head_dim)
            d.bias[...] = jnp.repeat(s.bias[...].reshape(2, head_dim), groups, axis=0).reshape(-1)
    # every other parameter is shared as is
    src_flat = dict(nnx.to_flat_state(nnx.state(gqa, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(mha, nnx.Param)):
        if not any(p in ("k_proj", "v_proj") for p in path):
            var[...] = src_flat[path][...]
    nnx.update(mha, nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(nnx.state(mha, nnx.Param))]))
    np.testing.assert_allclose(forward(gqa, tokens), forward(mha, tokens), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    kq, kk = jax.random.split(jax.random.key(2))
    q = jax.random.normal(kq, (1, 1, 1, 16))
    k = jax.random.normal(kk, (1, 1, 1, 16))

    def score(pq, pk):
        cq, sq = rope_cos_sin(jnp.array([[pq]]), 16, 10000.0)
        ck, sk = rope_cos_sin(jnp.array([[pk]]), 16, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    for delta in (0, 1, 5):
        ref = score(3 + delta, 3)
        for shift in (1, 7, 20):
            assert score(3 + delta + shift, 3 + shift) == pytest.approx(ref, abs=1e-4)
    assert abs(score(8, 3) - score(4, 3)) > 1e-3  # but it does depend on the offset
    # rotation preserves norms
    c, s = rope_cos_sin(jnp.array([[11]]), 16, 10000.0)
    assert float(jnp.linalg.norm(apply_rope(q, c, s))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


def test_model_is_invariant_to_a_global_position_shift(causal_model, tokens):
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    shifted = nnx.jit(lambda m, t, p: m(t, positions=p))(causal_model, tokens, positions + 5)
    np.testing.assert_allclose(shifted, forward(causal_model, tokens), atol=2e-4)


def test_cached_decode_matches_full_forward_at_every_position(causal_model, tokens):
    full = forward(causal_model, tokens)

    @nnx.jit
    def cached(model, tokens):
        cache = model.init_cache(2, 10)
        prefix_logits, cache = model.prefill(tokens[:, :3], cache)

        def step(cache, position):
            logits, cache = model.decode_step(tokens[:, position], position, cache)
            return cache, logits

        _, rest = jax.lax.scan(step, cache, jnp.arange(3, 10))
        return prefix_logits, jnp.swapaxes(rest, 0, 1)

    prefix_logits, rest = cached(causal_model, tokens)
    np.testing.assert_allclose(prefix_logits, full[:, :3], atol=1e-5)
    np.testing.assert_allclose(rest, full[:, 3:], atol=1e-5)


def test_greedy_generate_equals_uncached_greedy_loop(causal_model, tokens):
    prompt = tokens[:, :3]
    out = greedy_generate(causal_model, prompt, 6)
    assert out.shape == (2, 9) and out.dtype == jnp.int32
    # uncached loop: re-run the full forward each step; the buffer is zero-padded to a fixed
    # length (one compile), which is harmless because row p - 1 only sees positions < p (tested above).
    seq = jnp.zeros((2, 9), jnp.int32).at[:, :3].set(prompt)
    for p in range(3, 9):
        nxt = jnp.argmax(forward(causal_model, seq)[:, p - 1], axis=-1).astype(jnp.int32)
        seq = seq.at[:, p].set(nxt)
    np.testing.assert_array_equal(out, seq)


def test_attention_mask_hides_padded_keys(tokens):
    model = build(tiny(causal=False))
    mask = jnp.ones((2, 10), jnp.int32).at[:, 7:].set(0)
    run = nnx.jit(lambda m, t: m(t, attention_mask=mask))
    changed = tokens.at[:, 8].set((tokens[:, 8] + 3) % VOCAB)
    np.testing.assert_allclose(run(model, tokens)[:, :7], run(model, changed)[:, :7], atol=1e-6)


def test_tied_embeddings_and_output_size(tokens):
    model = build(tiny(tie_word_embeddings=True, vocab_size=VOCAB + 1, output_size=VOCAB))
    assert model.lm_head is None
    logits = forward(model, tokens.at[0, 0].set(VOCAB))  # the mask id is a valid input
    assert logits.shape == (2, 10, VOCAB)
    hidden = nnx.jit(lambda m, t: m.norm(m.hidden_states(t)))(model, tokens)
    table = np.asarray(model.embed_tokens.embedding[...])[:VOCAB]
    np.testing.assert_allclose(logits[1], np.asarray(hidden[1]) @ table.T, atol=1e-5)   # numpy: full float32


def test_default_init_and_qkv_bias_only_when_configured():
    model = Decoder(tiny(attention_bias=True, intermediate_size=256), rngs=nnx.Rngs(0))
    attn = model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias.shape == (16,)
    assert attn.o_proj.bias is None
    np.testing.assert_array_equal(attn.k_proj.bias[...], 0.0)
    np.testing.assert_array_equal(model.norm.scale[...], 1.0)
    kernel = np.asarray(model.layers[0].mlp.up_proj.kernel[...])      # 8192 draws of normal(0, 0.02)
    assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001
    without = nnx.eval_shape(lambda: Decoder(tiny(), rngs=nnx.Rngs(0))).layers[0].self_attn
    assert without.q_proj.bias is None and without.k_proj.bias is None


def test_parameters_carry_logical_axis_names(causal_model):
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm"}
    flat = dict(nnx.to_flat_state(nnx.state(causal_model, nnx.Param)))
    assert len(flat) == 2 * 12 + 3
    for path, var in flat.items():
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.ndim and set(names) <= allowed, path
    expected = {
        ("embed_tokens", "embedding"): ("vocab", "embed"),
        ("layers", 0, "self_attn", "q_proj", "kernel"): ("embed", "heads"),
        ("layers", 1, "self_attn", "k_proj", "kernel"): ("embed", "kv_heads"),
        ("layers", 0, "self_attn", "o_proj", "kernel"): ("heads", "embed"),
        ("layers", 0, "mlp", "gate_proj", "kernel"): ("embed", "mlp"),
        ("layers", 0, "mlp", "down_proj", "kernel"): ("mlp", "embed"),
        ("norm", "scale"): ("norm",),
        ("lm_head", "kernel"): ("embed", "vocab"),
    }
    for path, names in expected.items():
        assert tuple(flat[path].get_metadata()["out_sharding"]) == names
    specs = nnx.get_partition_spec(nnx.state(causal_model, nnx.Param))
    assert tuple(specs["lm_head"]["kernel"].get_raw_value()) == ("embed", "vocab")


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=30), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(head_dim=7), "head_dim"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(dtype="int8"), "dtype"),
    (dict(tie_word_embeddings=True, output_size=VOCAB + 1), "output_size"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kwargs)


def test_explicit_head_dim_need_not_divide_hidden(tokens):
    model = build(tiny(hidden_size=30, head_dim=6, num_heads=3, num_kv_heads=1))
    assert model.layers[0].self_attn.q_proj.kernel.shape == (30, 18)
    assert forward(model, tokens).shape == (2, 10, VOCAB)


def test_bad_inputs_raise_value_errors(causal_model, tokens):
    with pytest.raises(ValueError, match="tokens"):
        causal_model(tokens.at[0, 0].set(VOCAB))
    with pytest.raises(ValueError, match="tokens"):
        causal_model(tokens[0])
    with pytest.raises(ValueError, match="start"):
        causal_model.prefill(tokens, causal_model.init_cache(2, 5))
    with pytest.raises(ValueError, match="num_tokens"):
        greedy_generate(causal_model, tokens, 0)
    bidirectional = nnx.eval_shape(lambda: Decoder(tiny(causal=False), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="causal"):
        bidirectional.init_cache(2, 5)


def test_bfloat16_compute_returns_float32_logits(tokens):
    model = build(tiny(dtype="bfloat16"), scale=0.05)
    ref = build(tiny(), scale=0.05)
    out = forward(model, tokens)
    assert out.dtype == jnp.float32
    assert model.embed_tokens.embedding.dtype == jnp.float32
    np.testing.assert_allclose(out, forward(ref, tokens), atol=5e-2)


def test_sequence_classifier_pools_real_tokens_and_uses_time(tokens):
    clf = build(tiny(vocab_size=VOCAB + 1), 0, 0.2, SequenceClassifier, 3)
    assert not clf.config.causal and clf.trunk.lm_head is None
    run = nnx.jit(lambda m, x, t, mask: m(x, t, attention_mask=mask))
    mask = jnp.ones((2, 10), jnp.int32).at[:, 8:].set(0)
    t = jnp.array([0.2, 0.7])
    out = run(clf, tokens, t, mask)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    padded_changed = tokens.at[:, 9].set(VOCAB)                 # the mask id is a valid input state
    np.testing.assert_allclose(run(clf, padded_changed, t, mask), out, atol=1e-6)
    assert float(jnp.abs(run(clf, tokens, t + 0.1, mask) - out).max()) > 1e-4
    assert float(jnp.abs(run(clf, tokens.at[:, 2].set(VOCAB), t, mask) - out).max()) > 1e-4
    no_time = nnx.jit(lambda m, x: m(x))(clf, tokens)
    assert no_time.shape == (2, 3)
    with pytest.raises(ValueError, match="t"):
        clf(tokens, jnp.zeros(3))
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(tiny(), 0, rngs=nnx.Rngs(0))


@pytest.mark.peer
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_hf_transformers(family, tokens):
    """Layout check against HF `LlamaForCausalLM` / `Qwen2ForCausalLM` (torch CPU)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    qwen = family == "qwen2"
    config = tiny(attention_bias=qwen, rope_theta=1e4 if qwen else 5e5, rms_norm_eps=1e-5)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    if qwen:
        hf_config = transformers.Qwen2Config(**kwargs, rope_theta=1e4)
        hf = transformers.Qwen2ForCausalLM(hf_config)
    else:
        hf_config = transformers.LlamaConfig(**kwargs, rope_theta=5e5)
        hf = transformers.LlamaForCausalLM(hf_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    hf.eval()
    model = build(config)
    assign_hf_weights(model, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    np.testing.assert_allclose(forward(model, tokens), ref, atol=2e-4, rtol=1e-4)


def test_hf_weight_names_round_trip_and_missing_tensor_is_named():
    model = build(tiny(attention_bias=True))
    flat = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert hf_name(("layers", 0, "self_attn", "q_proj", "kernel")) == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name(("layers", 1, "self_attn", "k_proj", "bias")) == "model.layers.1.self_attn.k_proj.bias"
    assert hf_name(("lm_head", "kernel")) == "lm_head.weight"
    hf_weights = {hf_name(p): (v.T if p[-1] == "kernel" else v) for p, v in flat.items()}
    other = build(tiny(attention_bias=True), seed=1)
    assign_hf_weights(other, hf_weights)
    for path, var in nnx.to_flat_state(nnx.state(other, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(var[...]), flat[path])
    del hf_weights["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'model.norm.weight'"):
        assign_hf_weights(other, hf_weights)
    hf_weights["model.norm.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        assign_hf_weights(other, hf_weights)
