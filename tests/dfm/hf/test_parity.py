"""HF checkpoints, text: Llama / Qwen2 import, export, round trip through transformers, bf16, tokenizers.

Parity is against transformers (torch CPU, the `peer` extra) on tiny random models saved with
`save_pretrained`: logits within 1e-4 (float32) and 16 greedy tokens identical.
"""
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dfm.hf import SafetensorsCheckpoint, load_pretrained, save_pretrained
from dfm.hf.configs import RUNTIME_FIELDS
from dfm.hf.tokenizers import (expand_internvl_prompt, expand_llava_prompt, load_tokenizer,
                               tokenizer_fingerprint)
from dfm.models import Decoder, DecoderConfig


def params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.peer
@pytest.mark.parametrize("family, tie, sharded", [("llama", False, True), ("qwen2", True, False)])
def test_import_roundtrip_and_greedy_match_transformers(tmp_path, family, tie, sharded):
    pytest.importorskip("torch")
    from dfm.hf.parity_tools import text_parity

    result = text_parity(family, tmp_path, tie=tie, sharded=sharded)
    if sharded:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    if tie:
        with SafetensorsCheckpoint(tmp_path / "hf") as ckpt:
            assert "lm_head.weight" not in ckpt     # tied: transformers writes no head
        assert load_pretrained(tmp_path / "hf").lm_head is None
    assert result.import_max_abs < 1e-4
    assert result.roundtrip_max_abs < 1e-4
    assert result.greedy_equal


@pytest.mark.peer
def test_bf16_checkpoint_loads_as_bf16_or_cast_to_float32(tmp_path):
    torch = pytest.importorskip("torch")
    from dfm.hf.parity_tools import hf_logits, tiny_text_model

    hf = tiny_text_model("qwen2", seed=3)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with SafetensorsCheckpoint(tmp_path / "bf16") as ckpt:
        assert ckpt.dtype("model.norm.weight") == "bfloat16"
        assert ckpt.get("model.norm.weight").dtype == ml_dtypes.bfloat16
    native = load_pretrained(tmp_path / "bf16")
    assert native.config.param_dtype == "bfloat16" and native.config.dtype == "bfloat16"
    cast = load_pretrained(tmp_path / "bf16", dtype="float32")
    assert cast.config.param_dtype == "float32"
    stored = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(cast.layers[0].self_attn.q_proj.kernel[...]), stored.T)  # exact
    np.testing.assert_array_equal(np.asarray(native.layers[0].self_attn.q_proj.kernel[...], np.float32), stored.T)
    tokens = np.random.default_rng(0).integers(0, 128, (2, 6))
    # transformers' float32 model of the bf16-rounded weights (a fresh load: `hf.float()` would keep
    # the RoPE `inv_freq` buffer rounded to bf16)
    import transformers

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ref = hf_logits(ref_model, tokens)
    np.testing.assert_allclose(np.asarray(cast(jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)
    # bf16 compute: same distribution up to bf16 rounding
    assert np.abs(np.asarray(native(jnp.asarray(tokens))) - ref).max() < 0.15 * np.abs(ref).max()


def test_export_masked_denoiser_round_trips_in_our_format(tmp_path):
    """A bidirectional denoiser with a mask state (vocab + 1 embeddings, vocab outputs) survives export."""
    config = DecoderConfig(vocab_size=41, output_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, causal=False, attention_bias=True, rope_theta=1e4,
                           matmul_precision="highest")     # the import default: `back` computes alike
    model = Decoder(config, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "m", dtype="bfloat16")
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf_config["model_type"] == "qwen2" and hf_config["dfm"] == {"causal": False, "output_size": 40}
    with SafetensorsCheckpoint(tmp_path / "m") as ckpt:
        assert ckpt.shape("lm_head.weight") == (41, 32)             # padded for transformers
        assert not ckpt.get("lm_head.weight")[40].astype(np.float32).any()
        assert ckpt.dtype("model.embed_tokens.weight") == "bfloat16"
    back = load_pretrained(tmp_path / "m", dtype="float32")
    assert back.config == config
    ours, theirs = params(model), params(back)
    assert ours.keys() == theirs.keys()
    for path in ours:   # equal up to the bf16 storage rounding
        np.testing.assert_array_equal(theirs[path], ours[path].astype(ml_dtypes.bfloat16).astype(np.float32))
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(model, tmp_path / "m")
    save_pretrained(model, tmp_path / "m", overwrite=True)          # float32 now, replacing the bf16 files
    exact = load_pretrained(tmp_path / "m")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 41, (2, 7)))
    np.testing.assert_array_equal(np.asarray(exact(tokens)), np.asarray(model(tokens)))
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["m"]    # no temporary directories left


def runtime_fields_in(hf_config: dict) -> set:
    """Our runtime-only field names anywhere in an HF config dict (nested ones too)."""
    found = set(RUNTIME_FIELDS) & set(hf_config)
    for value in hf_config.values():
        if isinstance(value, dict):
            found |= runtime_fields_in(value)
    return found


def test_import_knobs_go_into_the_config_and_never_into_config_json(tmp_path):
    config = DecoderConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                           attention="xla", matmul_precision="high", remat="dots", scan_layers=True)
    save_pretrained(Decoder(config, rngs=nnx.Rngs(0)), tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert runtime_fields_in(written) == set() and written["num_hidden_layers"] == 2
    with SafetensorsCheckpoint(tmp_path / "m") as ckpt:         # stacked layers are written per layer
        assert ckpt.shape("model.layers.1.mlp.up_proj.weight") == (32, 16)
    imported = load_pretrained(tmp_path / "m").config
    assert (imported.matmul_precision, imported.attention, imported.remat, imported.scan_layers) == (
        "highest", "auto", "none", False)
    assert imported == config.replace(attention="auto", matmul_precision="highest", remat="none", scan_layers=False)
    chosen = load_pretrained(tmp_path / "m", matmul_precision="default", attention="xla", scan_layers=True).config
    assert (chosen.matmul_precision, chosen.attention, chosen.scan_layers) == ("default", "xla", True)
    with pytest.raises(ValueError, match="^matmul_precision: must be one of"):
        load_pretrained(tmp_path / "nothing", matmul_precision="fast")     # before any file is read
    with pytest.raises(ValueError, match="^attention: must be one of"):
        load_pretrained(tmp_path / "m", attention="flash")


@pytest.mark.peer
def test_scan_layers_import_and_export_match_per_layer_and_transformers(tmp_path):
    pytest.importorskip("torch")
    import transformers

    from dfm.hf.load import load_decoder
    from dfm.hf.parity_tools import hf_logits, tiny_text_model

    hf = tiny_text_model("qwen2", seed=5)       # 2 layers, GQA, q/k/v biases
    hf.save_pretrained(tmp_path / "hf")
    per_layer = load_decoder(tmp_path / "hf")
    scanned = load_pretrained(tmp_path / "hf", scan_layers=True)
    assert scanned.config == per_layer.config.replace(scan_layers=True) and not per_layer.config.scan_layers
    assert scanned.layers.mlp.up_proj.kernel[...].shape == (2, 32, 64)    # [layers, in, out]
    tokens = np.random.default_rng(2).integers(0, 128, (2, 9))
    ref, a = hf_logits(hf, tokens), np.asarray(per_layer(jnp.asarray(tokens)))
    b = np.asarray(scanned(jnp.asarray(tokens)))
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)      # scan vs loop: float rounding
    assert np.abs(b - ref).max() < 1e-4
    save_pretrained(per_layer, tmp_path / "per_layer")
    save_pretrained(scanned, tmp_path / "scanned")
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("per_layer", "scanned")]
    assert configs[0] == configs[1] and runtime_fields_in(configs[1]) == set()
    with SafetensorsCheckpoint(tmp_path / "per_layer") as want, SafetensorsCheckpoint(tmp_path / "scanned") as got:
        keys = sorted(want.keys())
        assert sorted(got.keys()) == keys
        for key in keys:
            np.testing.assert_array_equal(got.get(key), want.get(key), err_msg=key)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "scanned").eval()
    assert np.abs(hf_logits(back, tokens) - b).max() < 1e-4


def tiny_tokenizer(words):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_tokenizer_saved_with_model_loads_and_fingerprints(tmp_path):
    words = ["<unk>", "<image>", "hello", "world", "a", "b"]
    tok = tiny_tokenizer(words)
    model = Decoder(DecoderConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2),
                    rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    loaded = load_tokenizer(tmp_path / "m")
    assert loaded("hello world b", add_special_tokens=False)["input_ids"] == [2, 3, 5]
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tiny_tokenizer(words[:-1] + ["c"])) != tokenizer_fingerprint(tok)
    assert load_pretrained(tmp_path / "m").config.vocab_size == 6
    with pytest.raises(ValueError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "nothing")


def test_image_placeholder_expansion():
    assert expand_llava_prompt("USER: <image>\nhi", 3) == "USER: <image><image><image>\nhi"
    assert expand_internvl_prompt("a <IMG_CONTEXT> b <IMG_CONTEXT>", 2) == (
        "a <img><IMG_CONTEXT><IMG_CONTEXT></img> b <img><IMG_CONTEXT><IMG_CONTEXT></img>")
    assert expand_internvl_prompt("<image>", 1, num_patches=2, placeholder="<image>") == (
        "<img><IMG_CONTEXT><IMG_CONTEXT></img>")
    with pytest.raises(ValueError, match="num_image_tokens"):
        expand_llava_prompt("<image>", 0)
