"""HF checkpoints, bad input: each error names the file, and the key or field involved."""
import json
import os
import re
import stat

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dfm.hf import (CheckpointError, SafetensorsCheckpoint, UnsupportedModelError, assign_weights, load_pretrained,
                    save_pretrained)
from dfm.hf.mapping import DECODER_RULES
from dfm.hf.safetensors_io import write_safetensors
from dfm.io import atomic_path, current_umask
from dfm.models import Decoder, DecoderConfig


@pytest.fixture
def checkpoint(tmp_path):
    config = DecoderConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    return save_pretrained(Decoder(config, rngs=nnx.Rngs(0)), tmp_path / "ckpt")


def tensors_of(directory):
    with SafetensorsCheckpoint(directory) as ckpt:
        return {k: ckpt.get(k) for k in ckpt.keys()}


def test_truncated_safetensors_names_the_file(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*truncated or corrupt"):
        load_pretrained(checkpoint)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        SafetensorsCheckpoint(checkpoint)


def test_unsupported_model_type_names_the_file_and_value(checkpoint):
    file = checkpoint / "config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match=re.escape(str(file)) + ".*model_type 'gpt2'"):
        load_pretrained(checkpoint)
    file.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}))
    with pytest.raises(UnsupportedModelError, match=re.escape(str(file)) + ".*rope type 'llama3'"):
        load_pretrained(checkpoint)
    file.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*not valid JSON"):
        load_pretrained(checkpoint)
    file.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ": no such config file"):
        load_pretrained(checkpoint)


def test_missing_tensor_names_the_file_and_key(checkpoint):
    tensors = tensors_of(checkpoint)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    write_safetensors(checkpoint / "model.safetensors", tensors)
    file = checkpoint / "model.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: missing tensor 'model.layers.0.mlp.up_proj.weight'")
                       + " for parameter layers.0.mlp.up_proj.kernel"):
        load_pretrained(checkpoint)


def test_wrong_shape_names_the_file_and_key(checkpoint):
    tensors = tensors_of(checkpoint)
    tensors["model.norm.weight"] = np.ones(3, np.float32)
    write_safetensors(checkpoint / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model.safetensors: 'model.norm.weight' has shape \(3,\)"):
        load_pretrained(checkpoint)


def test_sharded_index_errors_name_the_index_shard_and_key(checkpoint):
    tensors = tensors_of(checkpoint)
    keys = sorted(tensors)
    half = len(keys) // 2
    write_safetensors(checkpoint / "model-00001-of-00002.safetensors", {k: tensors[k] for k in keys[:half]})
    write_safetensors(checkpoint / "model-00002-of-00002.safetensors", {k: tensors[k] for k in keys[half:]})
    (checkpoint / "model.safetensors").unlink()
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_pretrained(checkpoint)                 # the sharded layout itself loads
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), tensors["model.norm.weight"])
    # the index names a key its shard lacks
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.extra.weight": weight_map[keys[0]]}}))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors: missing tensor 'model.extra.weight'"):
        load_pretrained(checkpoint)
    # a key the model needs is absent from the index: the index file is named
    index.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != "model.norm.weight"}}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: missing tensor 'model.norm.weight'")):
        load_pretrained(checkpoint)
    # the index names a shard that does not exist
    index.write_text(json.dumps({"weight_map": {**weight_map, keys[0]: "model-00009.safetensors"}}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: shard 'model-00009.safetensors'")):
        load_pretrained(checkpoint)


def test_missing_directory_or_weights(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        SafetensorsCheckpoint(tmp_path / "absent")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint)) + ": no model.safetensors"):
        load_pretrained(checkpoint)


def test_strict_reports_unused_tensors(checkpoint):
    tensors = tensors_of(checkpoint)
    tensors["model.layers.0.extra.weight"] = np.zeros(2, np.float32)
    write_safetensors(checkpoint / "model.safetensors", tensors)
    load_pretrained(checkpoint)                          # ignored by default
    with pytest.raises(CheckpointError, match=r"1 tensors not used.*model.layers.0.extra.weight"):
        load_pretrained(checkpoint, strict=True)


def test_multimodal_config_errors_name_the_file_and_field(tmp_path):
    text = {"model_type": "llama", "vocab_size": 20, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    llava = {"model_type": "llava", "text_config": text, "vision_config": vision, "image_token_index": 3}
    write_safetensors(tmp_path / "model.safetensors", {"x": np.zeros(1, np.float32)})
    file = tmp_path / "config.json"
    cases = [({**llava, "vision_config": {**vision, "model_type": "siglip_vision_model"}},
              "vision_config.model_type 'siglip_vision_model'"),
             ({**llava, "vision_feature_layer": [-2, -1]}, r"vision_feature_layer \[-2, -1\] is not supported"),
             ({**llava, "text_config": {**text, "hidden_act": "gelu"}}, "text_config.hidden_act 'gelu'"),
             ({**llava, "vision_config": {**vision, "image_size": [32, 48]}}, r"vision_config.image_size \[32, 48\]"),
             ({k: v for k, v in llava.items() if k != "image_token_index"}, "missing config field 'image_token_id'")]
    for config, message in cases:
        file.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=re.escape(str(file)) + ": .*" + message):
            load_pretrained(tmp_path)
    file.write_text(json.dumps(llava))                   # a valid config: now the weights are missing
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor 'language_model.model.embed_tokens"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_names_the_file_and_key(checkpoint, value):
    tensors = tensors_of(checkpoint)
    tensors["model.layers.0.mlp.up_proj.weight"][3, 1] = value
    file = checkpoint / "model.safetensors"
    write_safetensors(file, tensors)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: tensor 'model.layers.0.mlp.up_proj.weight' holds "
                                                        "1 non-finite values (NaN or inf)")):
        load_pretrained(checkpoint)


def test_non_finite_bfloat16_tensor_in_a_shard_names_the_shard(checkpoint):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors_of(checkpoint).items()}
    tensors["model.norm.weight"][:2] = np.nan
    keys = sorted(tensors)
    shard = checkpoint / "model-00002-of-00002.safetensors"
    write_safetensors(checkpoint / "model-00001-of-00002.safetensors",
                      {k: tensors[k] for k in keys if k != "model.norm.weight"})
    write_safetensors(shard, {"model.norm.weight": tensors["model.norm.weight"]})
    (checkpoint / "model.safetensors").unlink()
    weight_map = {k: ("model-00002-of-00002.safetensors" if k == "model.norm.weight"
                      else "model-00001-of-00002.safetensors") for k in keys}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: tensor 'model.norm.weight' holds 2 non-finite")):
        load_pretrained(checkpoint)


def test_non_finite_tensor_in_a_dict_names_the_source_and_key(checkpoint):
    tensors = tensors_of(checkpoint)
    model = load_pretrained(checkpoint)
    assign_weights(model, tensors, DECODER_RULES, source="my weights")     # finite: loads
    tensors["model.embed_tokens.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match=re.escape("my weights: tensor 'model.embed_tokens.weight' holds 1 "
                                                   "non-finite values")) as info:
        assign_weights(model, tensors, DECODER_RULES, source="my weights")
    assert not isinstance(info.value, CheckpointError)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomically_written_files_get_the_umask_mode(tmp_path, umask, mode):
    """`dfm.io.atomic_path` (every run-directory file, safetensors included) gives `0o666 & ~umask`,
    not mkstemp's 0o600."""
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_path(tmp_path / "run" / "metrics.json") as tmp:
            with open(tmp, "w") as f:
                f.write("{}")
        write_safetensors(tmp_path / "w.safetensors", {"x": np.zeros(2, np.float32)})
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"
    for file in (tmp_path / "run" / "metrics.json", tmp_path / "w.safetensors"):
        assert stat.S_IMODE(file.stat().st_mode) == mode, file
