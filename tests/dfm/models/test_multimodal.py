"""Tests for dfm.models.multimodal / projector and the Decoder's `inputs_embeds`: config validation,
pixel shuffle (by hand and vs HF), image-token scatter order, count errors, KV-cache generation vs
full forwards, and end-to-end logits parity with HF LLaVA / InternVL (peer)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import build, load_hf, perturb

from dfm.models import (Decoder, DecoderConfig, MultimodalConfig, MultimodalModel, VisionConfig,
                        multimodal_greedy_generate, pixel_shuffle)

VOCAB, IMG = 64, 5
# full float32 matmuls: the exactness and HF-parity checks hold on GPU / TPU too
VISION = dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
              matmul_precision="highest")
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            matmul_precision="highest")


def llava_config(**kw) -> MultimodalConfig:
    base = dict(vision=VisionConfig(**VISION), text=DecoderConfig(**TEXT), image_token_id=IMG)
    return MultimodalConfig(**{**base, **kw})


def internvl_config(**kw) -> MultimodalConfig:
    vision = VisionConfig(**VISION, arch="internvit", hidden_act="gelu", layer_norm_eps=1e-6, use_mean_pooling=False)
    base = dict(vision=vision, text=DecoderConfig(**TEXT, attention_bias=True), image_token_id=IMG,
                vision_feature_layer=-1, projector="internvl", downsample_ratio=0.5)
    return MultimodalConfig(**{**base, **kw})


def prompt(config, n_images=2, seed=0):
    """`[2, L]` tokens whose image tokens straddle the two rows: row 0 holds all of image 0 and the
    first 3 tokens of image 1, row 1 the rest of image 1."""
    t = config.num_image_tokens
    rng = np.random.default_rng(seed)
    length = t + 6
    tokens = rng.integers(IMG + 1, VOCAB, (2, length))
    assert n_images == 2
    tokens[0, 2:2 + t + 3] = IMG
    tokens[1, 1:1 + t - 3] = IMG
    return jnp.asarray(tokens, jnp.int32)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def llava():
    return build(MultimodalModel, llava_config())


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("make, kw, field", [
    (llava_config, dict(image_token_id=VOCAB), "image_token_id"),
    (llava_config, dict(image_token_id=-1), "image_token_id"),
    (llava_config, dict(vision_feature_layer=3), "vision_feature_layer"),
    (llava_config, dict(vision_feature_layer=-4), "vision_feature_layer"),
    (llava_config, dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
    (llava_config, dict(projector="mlp"), "projector"),
    (llava_config, dict(downsample_ratio=0.5), "downsample_ratio"),
    (llava_config, dict(projector_hidden_act="tanh"), "projector_hidden_act"),
    (llava_config, dict(text=DecoderConfig(**TEXT, causal=False)), "text"),
    (llava_config, dict(vision=dict(VISION)), "vision"),
    (internvl_config, dict(downsample_ratio=0.3), "downsample_ratio"),
    (internvl_config, dict(downsample_ratio=0.125), "downsample_ratio"),     # 8 does not divide the 4x4 grid
    (internvl_config, dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
])
def test_multimodal_config_errors_name_the_field(make, kw, field):
    with pytest.raises(ValueError, match=field):
        make(**kw)


def test_num_image_tokens():
    assert llava_config().num_image_tokens == 16                                  # 4x4 patches, CLS dropped
    assert llava_config(vision_feature_select_strategy="full").num_image_tokens == 17
    assert internvl_config().num_image_tokens == 4                                 # 4x4 grid shuffled to 2x2
    assert internvl_config(downsample_ratio=0.25).num_image_tokens == 1


# ---------------------------------------------------------------------- pixel shuffle
def test_pixel_shuffle_by_hand():
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
    out = np.asarray(pixel_shuffle(x, 0.5))
    assert out.shape == (2, 2, 3, 12)
    for i in range(2):
        for j in range(3):
            want = np.concatenate([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1],
                                   x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], axis=-1)
            np.testing.assert_array_equal(out[:, i, j], want)
    np.testing.assert_array_equal(pixel_shuffle(x, 1.0), x)
    with pytest.raises(ValueError, match="scale_factor"):
        pixel_shuffle(np.zeros((1, 3, 4, 4)), 0.5)


@pytest.mark.peer
def test_pixel_shuffle_matches_hf():
    torch = pytest.importorskip("torch")
    from transformers.models.internvl.modeling_internvl import InternVLModel
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 6)).astype(np.float32)
    for scale in (0.5, 0.25):
        ref = InternVLModel.pixel_shuffle(None, torch.from_numpy(x), scale_factor=scale).numpy()
        np.testing.assert_array_equal(pixel_shuffle(x, scale), ref)


# ---------------------------------------------------------------------- image-token scatter
def test_embed_inputs_scatters_features_in_row_major_order(llava, pixels):
    tokens = prompt(llava.config)
    t = llava.config.num_image_tokens
    feats = np.asarray(llava.image_features(pixels))
    assert feats.shape == (2, t, 32)
    embedded = np.asarray(nnx.jit(lambda m, tok, px: m.embed_inputs(tok, px))(llava, tokens, pixels))
    table = np.asarray(llava.language_model.embed_tokens.embedding[...])
    # image 0 -> row 0 positions 2..2+t-1; image 1 -> row 0 positions 2+t..2+t+2, then row 1 positions 1..t-3
    np.testing.assert_allclose(embedded[0, 2:2 + t], feats[0], atol=1e-6)
    np.testing.assert_allclose(embedded[0, 2 + t:5 + t], feats[1, :3], atol=1e-6)
    np.testing.assert_allclose(embedded[1, 1:t - 2], feats[1, 3:], atol=1e-6)
    text = np.asarray(tokens) != IMG
    np.testing.assert_allclose(embedded[text], table[np.asarray(tokens)[text]], atol=1e-6)


def test_image_token_count_mismatch_raises(llava, pixels):
    tokens = prompt(llava.config)
    with pytest.raises(ValueError, match=r"found 33 image tokens.*32 features"):
        llava.embed_inputs(tokens.at[1, 0].set(IMG), pixels)
    with pytest.raises(ValueError, match=r"found 32 image tokens.*16 features"):
        llava(tokens, pixels[:1])
    with pytest.raises(ValueError, match=r"found 32 image tokens.*0 features"):
        llava(tokens)
    with pytest.raises(ValueError, match="tokens"):
        llava(tokens.at[0, 0].set(VOCAB))


def test_pooled_image_features(llava, pixels):
    pooled = llava.pooled_image_features(pixels)
    assert pooled.shape == (2, 16)
    np.testing.assert_allclose(pooled, llava.vision_tower.pooled(pixels), atol=1e-6)


# ---------------------------------------------------------------------- decoder inputs_embeds
def test_decoder_inputs_embeds_equal_token_path():
    model = build(Decoder, DecoderConfig(**TEXT))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 7)), jnp.int32)

    @nnx.jit
    def run(m, tokens):
        embeds = m.embed(tokens)
        cache = m.init_cache(2, 9)
        first, cache = m.prefill(None, cache, inputs_embeds=embeds[:, :4])
        rest, _ = m.extend(None, 4, cache, inputs_embeds=embeds[:, 4:])
        return (m(tokens), m(None, inputs_embeds=embeds), jnp.concatenate([first, rest], axis=1),
                m(tokens, inputs_embeds=embeds.at[:, 3].add(1.0)), embeds)

    ref, from_embeds, cached, moved, embeds = run(model, tokens)
    np.testing.assert_allclose(from_embeds, ref, atol=1e-5)
    np.testing.assert_allclose(cached, ref, atol=1e-5)
    # a different embedding at one position changes the logits from there on only
    np.testing.assert_allclose(moved[:, :3], ref[:, :3], atol=1e-5)
    assert float(jnp.abs(moved[:, 3:] - ref[:, 3:]).max()) > 1e-3
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(None, inputs_embeds=embeds[..., :8])
    with pytest.raises(ValueError, match="tokens"):
        model(tokens[:, :3], inputs_embeds=embeds)
    with pytest.raises(ValueError, match="tokens"):
        model(None)


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("make", [llava_config, internvl_config])
def test_greedy_generate_equals_argmax_of_full_forwards(make, pixels):
    """Reference: argmax of full (no-cache) forwards, one token at a time. The forward runs at the
    final length with not-yet-generated slots filled by a text token; causality makes row p depend
    only on tokens <= p, so one compiled shape serves every step."""
    model = build(MultimodalModel, make(), seed=4, scale=0.3)
    tokens = prompt(model.config)
    p, n_new = tokens.shape[1], 4
    forward = nnx.jit(lambda m, tok, px: m(tok, px))
    cache = model.init_cache(2, p)
    logits, _ = nnx.jit(lambda m, tok, px, c: m.prefill(tok, px, c))(model, tokens, pixels, cache)
    seq = jnp.concatenate([tokens, jnp.full((2, n_new), IMG + 1, jnp.int32)], axis=1)
    np.testing.assert_allclose(logits, forward(model, seq, pixels)[:, :p], atol=2e-5)
    out = multimodal_greedy_generate(model, tokens, pixels, n_new)
    assert out.shape == (2, p + n_new) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :p], tokens)
    for i in range(n_new):
        nxt = jnp.argmax(forward(model, seq, pixels)[:, p - 1 + i], axis=-1).astype(jnp.int32)
        seq = seq.at[:, p + i].set(nxt)
    np.testing.assert_array_equal(out, seq)
    assert len(set(np.asarray(out[:, p:]).ravel().tolist())) > 1   # not a constant output
    with pytest.raises(ValueError, match="num_tokens"):
        multimodal_greedy_generate(model, tokens, pixels, 0)
    with pytest.raises(ValueError, match="image tokens"):
        multimodal_greedy_generate(model, tokens, pixels[:1], 2)


# ---------------------------------------------------------------------- HF parity (end to end)
def _hf_key(name: str) -> str:
    name = name.replace("language_model.lm_head", "lm_head")
    return name if name.startswith("lm_head") else "model." + name


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["llava", "internvl"])
def test_logits_match_hf_conditional_generation(kind, pixels):
    torch = pytest.importorskip("torch")
    import transformers
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6)
    vision = dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    if kind == "llava":
        hf_config = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **vision), text_config=dict(model_type="llama", **text),
            image_token_id=IMG)
        hf = transformers.LlavaForConditionalGeneration(hf_config).eval()
        config = llava_config()
    else:
        hf_config = transformers.InternVLConfig(
            vision_config=dict(**vision, attention_bias=True, use_mean_pooling=False),
            text_config=dict(model_type="qwen2", **text), image_token_id=IMG, downsample_ratio=0.5,
            vision_feature_layer=-1, tie_word_embeddings=False)
        hf = transformers.InternVLForConditionalGeneration(hf_config).eval()
        config = internvl_config()
    assert config.text.rope_theta == hf_config.text_config.rope_parameters["rope_theta"]
    perturb(torch, hf, seed=2)
    model = build(MultimodalModel, config)
    assert load_hf(model, hf.state_dict(), _hf_key) == set()
    tokens = prompt(config)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                 pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(model(tokens, pixels), ref, atol=1e-5)
