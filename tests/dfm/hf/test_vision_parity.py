"""HF checkpoints, vision: CLIP tower, LLaVA, InternVL against transformers (torch CPU, `peer` extra).

Tiny random models saved with `save_pretrained`, loaded with `dfm.hf.load_pretrained`: outputs
within 1e-4 (float32), 16 greedy tokens identical, our export loads back in transformers; the key
layouts of other writers (hub `vision_model.` prefixes, in-memory `model.language_model.` names)
load to the same model.
"""
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.peer

from dfm.hf import SafetensorsCheckpoint, load_pretrained  # noqa: E402
from dfm.hf.parity_tools import hf_logits  # noqa: E402
from dfm.hf.safetensors_io import write_safetensors  # noqa: E402
from dfm.hf.tokenizers import (expand_internvl_prompt, expand_llava_prompt, internvl_num_image_tokens,  # noqa: E402
                               llava_num_image_tokens)
from dfm.hf.vision_parity import (IMAGE_TOKEN, clip_parity, images, multimodal_parity,  # noqa: E402
                                  prompt_with_images, tiny_internvl, tiny_llava)


def rewrite_keys(directory, rename):
    """Rewrite `directory/model.safetensors` with every key passed through `rename`."""
    with SafetensorsCheckpoint(directory) as ckpt:
        tensors = {rename(k): ckpt.get(k) for k in ckpt.keys()}
    write_safetensors(directory / "model.safetensors", tensors)


def test_clip_tower_matches_transformers_with_either_prefix(tmp_path):
    result = clip_parity(tmp_path)
    assert result.import_max_abs < 1e-4 and result.roundtrip_max_abs < 1e-4
    reference = load_pretrained(tmp_path / "hf")
    rewrite_keys(tmp_path / "hf", lambda k: "vision_model." + k)      # transformers-4 / CLIPModel layout
    prefixed = load_pretrained(tmp_path / "hf", strict=True)
    pixels = jnp.asarray(images(1).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(prefixed(pixels)), np.asarray(reference(pixels)))


def test_llava_matches_transformers_in_every_key_layout(tmp_path):
    hf = tiny_llava()
    result = multimodal_parity("llava", hf, tmp_path)
    assert result.import_max_abs < 1e-4 and result.roundtrip_max_abs < 1e-4 and result.greedy_equal
    with SafetensorsCheckpoint(tmp_path / "hf") as ckpt:     # what transformers 5 writes
        assert "language_model.model.embed_tokens.weight" in ckpt and "vision_tower.pre_layrnorm.weight" in ckpt
    tokens = prompt_with_images(16)
    pixels = images(2)
    ref = hf_logits(hf, tokens, pixel_values=pixels)
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    # in-memory names (`model.language_model.*`, `model.vision_tower.*`, `lm_head.weight`)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert "model.language_model.embed_tokens.weight" in state
    write_safetensors(tmp_path / "hf" / "model.safetensors", state)
    in_memory = load_pretrained(tmp_path / "hf", strict=True)
    np.testing.assert_allclose(np.asarray(in_memory(jnp.asarray(tokens), nhwc)), ref, atol=1e-4, rtol=0)
    # hub llava-hf layout: `language_model.model.*`, `vision_tower.vision_model.*`
    hub = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
           "model.vision_tower.": "vision_tower.vision_model.", "model.multi_modal_projector.": "multi_modal_projector."}
    rewrite_keys(tmp_path / "hf", lambda k: next(new + k[len(old):] for old, new in hub.items() if k.startswith(old)))
    hub_model = load_pretrained(tmp_path / "hf", strict=True)
    np.testing.assert_allclose(np.asarray(hub_model(jnp.asarray(tokens), nhwc)), ref, atol=1e-4, rtol=0)


def test_llava_full_strategy_last_layer_tied_qwen2(tmp_path):
    hf = tiny_llava(seed=1, vision_feature_layer=-1, strategy="full", text="qwen2", tie=True)
    result = multimodal_parity("llava full", hf, tmp_path, seed=1, full=False)
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.num_image_tokens == 17 and ours.config.text.tie_word_embeddings
    assert ours.config.text.matmul_precision == ours.config.vision.matmul_precision == "highest"   # the default
    knobs = load_pretrained(tmp_path / "hf", matmul_precision="default", attention="xla").config
    assert (knobs.text.matmul_precision, knobs.vision.matmul_precision, knobs.text.attention,
            knobs.vision.attention) == ("default", "default", "xla", "xla")
    with pytest.raises(ValueError, match="^scan_layers: only a text decoder"):
        load_pretrained(tmp_path / "hf", scan_layers=True)
    assert ours.config.text.attention_bias and ours.language_model.lm_head is None
    assert result.import_max_abs < 1e-4


def test_llava_with_a_scanned_language_model_exports_per_layer(tmp_path):
    import json

    from flax import nnx

    from dfm.hf import save_pretrained
    from dfm.hf.configs import RUNTIME_FIELDS
    from dfm.models import MultimodalModel, stack_layers

    hf = tiny_llava(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    config = ours.config.replace(text=ours.config.text.replace(scan_layers=True))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MultimodalModel(config, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(nnx.state(ours))
    pure["language_model"] = nnx.to_pure_dict(nnx.state(stack_layers(ours.language_model)))
    nnx.replace_by_pure_dict(state, pure)
    scanned = nnx.merge(graphdef, state)
    tokens, pixels = prompt_with_images(16, seed=2), images(2, seed=2)
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    logits = np.asarray(scanned(jnp.asarray(tokens), nhwc))
    np.testing.assert_allclose(logits, np.asarray(ours(jnp.asarray(tokens), nhwc)), atol=1e-5, rtol=0)
    save_pretrained(ours, tmp_path / "per_layer")
    save_pretrained(scanned, tmp_path / "scanned")
    written = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("per_layer", "scanned")]
    assert written[0] == written[1]
    assert not set(RUNTIME_FIELDS) & (set(written[1]) | set(written[1]["text_config"]) | set(written[1]["vision_config"]))
    with SafetensorsCheckpoint(tmp_path / "per_layer") as want, SafetensorsCheckpoint(tmp_path / "scanned") as got:
        keys = sorted(want.keys())
        assert sorted(got.keys()) == keys
        for key in keys:
            np.testing.assert_array_equal(got.get(key), want.get(key), err_msg=key)
    back = type(hf).from_pretrained(tmp_path / "scanned").eval()
    assert np.abs(hf_logits(back, tokens, pixel_values=pixels) - logits).max() < 1e-4


@pytest.mark.parametrize("variant", ["base", "qk_norm"])
def test_internvl_matches_transformers(tmp_path, variant):
    hf = tiny_internvl(variant=variant)
    result = multimodal_parity("internvl", hf, tmp_path, full=variant == "base")
    assert result.import_max_abs < 1e-4
    if variant == "base":
        assert result.roundtrip_max_abs < 1e-4 and result.greedy_equal
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.num_image_tokens == 4 and ours.language_model.lm_head is None   # InternVL ties by default
    assert ours.config.vision.use_qk_norm == (variant == "qk_norm")


def test_prompt_expansion_matches_llava_processor_and_configs(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "hello", "world"] + [f"w{i}" for i in range(4)] + ["<image>"]   # "<image>" = id 7
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                               extra_special_tokens={"image_token": "<image>"})
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    text = "hello <image> world"
    expected = processor(images=[np.zeros((32, 32, 3), np.uint8)], text=[text], return_tensors="np")["input_ids"]
    hf = tiny_llava()
    config = hf.config.to_dict()
    n = llava_num_image_tokens(config)
    assert n == 16
    ours = tok(expand_llava_prompt(text, n), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray([ours]), expected)
    assert ours.count(IMAGE_TOKEN) == 16
    internvl = tiny_internvl().config.to_dict()
    assert internvl_num_image_tokens(internvl) == 4
    assert expand_internvl_prompt("<IMG_CONTEXT>", internvl_num_image_tokens(internvl)) == (
        "<img>" + "<IMG_CONTEXT>" * 4 + "</img>")
