"""Tests for dfm.models.vision / internvit: VisionConfig validation, CLIP and InternViT towers
(patch flattening by hand, layer scale, shapes, jit) and HF parity of every hidden state (peer)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import build, load_hf, perturb

from dfm.models import CLIPVisionTower, InternVisionTower, VisionConfig

# full float32 matmuls: the exactness and HF-parity checks hold on GPU / TPU too
TINY = dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
            matmul_precision="highest")


def tiny(**kw) -> VisionConfig:
    return VisionConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(7).standard_normal((2, 8, 8, 3)).astype(np.float32)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [
    (dict(image_size=10), "image_size"),
    (dict(num_heads=3), "num_heads"),
    (dict(arch="vit"), "arch"),
    (dict(hidden_act="tanh"), "hidden_act"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="int8"), "dtype"),
    (dict(use_qk_norm=True), "use_qk_norm"),            # clip has no qk norm
    (dict(attention_bias=False), "attention_bias"),     # clip always has biases
    (dict(norm_type="rms_norm"), "norm_type"),
    (dict(arch="internvit", norm_type="batch_norm"), "norm_type"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_vision_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_vision_config_properties_and_replace():
    c = tiny(image_size=12, patch_size=4)
    assert (c.grid_size, c.num_patches, c.head_size) == (3, 9, 8)
    d = c.replace(arch="internvit", use_qk_norm=True)
    assert d.arch == "internvit" and d.use_qk_norm and c.arch == "clip"
    with pytest.raises(ValueError, match="image_size"):
        c.replace(image_size=13)


def test_towers_refuse_wrong_arch():
    with pytest.raises(ValueError, match="arch"):
        CLIPVisionTower(tiny(arch="internvit"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="arch"):
        InternVisionTower(tiny(), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------- CLIP
def test_clip_embeddings_flatten_patches_row_major(pixels):
    """Conv patch embedding = hand-made patch vectors [kh, kw, c] @ kernel, patches row-major."""
    model = build(CLIPVisionTower, tiny())
    emb = model.embeddings
    kernel = np.asarray(emb.patch_embedding.kernel[...]).reshape(4 * 4 * 3, 16)
    patches = pixels.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    cls = np.broadcast_to(np.asarray(emb.class_embedding[...]), (2, 1, 16))
    want = np.concatenate([cls, patches @ kernel], axis=1) + np.asarray(emb.position_embedding.embedding[...])
    np.testing.assert_allclose(emb(pixels), want, atol=1e-5)


def test_clip_tower_shapes_and_jit(pixels):
    model = build(CLIPVisionTower, tiny(num_layers=3))
    states = nnx.jit(lambda m, x: m.hidden_states(x))(model, pixels)
    assert len(states) == 4 and all(s.shape == (2, 5, 16) for s in states)
    np.testing.assert_allclose(states[-1], model(pixels), atol=1e-5)
    pooled = model.pooled(pixels)
    assert pooled.shape == (2, 16)
    np.testing.assert_allclose(pooled, model.post_layernorm(states[-1][:, 0]), atol=1e-5)
    # the layers mix tokens: changing one pixel patch changes the CLS state of the last layer
    changed = pixels.copy()
    changed[:, :4, :4] += 1.0
    assert float(jnp.abs(model(changed)[:, 0] - states[-1][:, 0]).max()) > 1e-3


def test_pixel_values_shape_is_checked():
    model = build(CLIPVisionTower, tiny())
    with pytest.raises(ValueError, match="pixel_values"):
        model(np.zeros((2, 3, 8, 8), np.float32))           # NCHW given
    inner = build(InternVisionTower, tiny(arch="internvit"))
    with pytest.raises(ValueError, match="pixel_values"):
        inner.hidden_states(np.zeros((8, 8, 3), np.float32))


@pytest.mark.peer
def test_clip_tower_matches_hf_clip_vision_model(pixels):
    torch = pytest.importorskip("torch")
    from transformers import CLIPVisionConfig, CLIPVisionModel
    hf = CLIPVisionModel(CLIPVisionConfig(
        image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2)).eval()
    perturb(torch, hf)
    model = build(CLIPVisionTower, tiny())
    assert load_hf(model, hf.state_dict()) == set()
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    ours = model.hidden_states(pixels)
    assert len(ours) == len(ref.hidden_states) == 3
    for a, b in zip(ours, ref.hidden_states):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)
    np.testing.assert_allclose(model(pixels), ref.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(model.pooled(pixels), ref.pooler_output.numpy(), atol=1e-5)


# ---------------------------------------------------------------------- InternViT
def test_internvit_zero_layer_scale_makes_layers_identity(pixels):
    model = build(InternVisionTower, tiny(arch="internvit", use_qk_norm=True))
    for layer in model.encoder.layer:
        layer.lambda_1[...] = jnp.zeros(16)
        layer.lambda_2[...] = jnp.zeros(16)
    states = model.hidden_states(pixels)
    assert len(states) == 3
    for s in states[1:]:
        np.testing.assert_allclose(s, states[0], atol=1e-6)


def test_internvit_pooling_modes(pixels):
    mean = build(InternVisionTower, tiny(arch="internvit", use_mean_pooling=True))
    assert mean.layernorm is None
    last = mean(pixels)
    np.testing.assert_allclose(last, mean.hidden_states(pixels)[-1], atol=1e-6)
    np.testing.assert_allclose(mean.pooled(pixels), np.asarray(last)[:, 1:].mean(axis=1), atol=1e-5)
    cls = build(InternVisionTower, tiny(arch="internvit", use_mean_pooling=False))
    last = cls(pixels)
    np.testing.assert_allclose(last, cls.layernorm(cls.hidden_states(pixels)[-1]), atol=1e-6)
    np.testing.assert_allclose(cls.pooled(pixels), last[:, 0], atol=1e-6)


@pytest.mark.peer
@pytest.mark.parametrize("options", [
    dict(use_qk_norm=True, attention_bias=True, use_mean_pooling=False),   # final layernorm present
    dict(norm_type="rms_norm", attention_bias=False),                      # InternViT-6B style norms
])
def test_internvit_tower_matches_hf_internvl_vision_model(pixels, options):
    torch = pytest.importorskip("torch")
    from transformers import InternVLVisionConfig, InternVLVisionModel
    hf = InternVLVisionModel(InternVLVisionConfig(
        image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, **options)).eval()
    perturb(torch, hf, seed=1)
    model = build(InternVisionTower, tiny(arch="internvit", hidden_act="gelu", layer_norm_eps=1e-6, **options))
    assert load_hf(model, hf.state_dict()) == set()
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    ours = model.hidden_states(pixels)
    assert len(ours) == len(ref.hidden_states) == 3
    for a, b in zip(ours, ref.hidden_states):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)
    np.testing.assert_allclose(model(pixels), ref.last_hidden_state.numpy(), atol=1e-5)
