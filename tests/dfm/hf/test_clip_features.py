"""`dfm.hf.clip_image_embeddings` against transformers' CLIP `get_image_features`, L2-normalised
(torch CPU, `peer` extra): tiny random `CLIPModel`, `CLIPVisionModelWithProjection` and
`CLIPVisionModel` (no projection: the pooled output) saved with `save_pretrained`."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.peer

from dfm.hf import clip_image_embeddings, load_clip_image_encoder
from dfm.hf.clip_features import image_stats
from dfm.hf.parity_tools import randomize_
from dfm.hf.safetensors_io import CheckpointError

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 16, "patch_size": 8, "projection_dim": 12}


def _pixels(n, seed=0):
    """NCHW float32 N(0, 1) (transformers' layout; ours is the NHWC transpose)."""
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def _normalised(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _save(model, directory):
    randomize_(model, 0)
    model.eval().save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind", ["CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionModel"])
def test_embeddings_match_transformers_get_image_features(tmp_path, kind):
    import transformers

    vision = transformers.CLIPVisionConfig(**VISION)
    if kind == "CLIPModel":
        text = transformers.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, projection_dim=12, max_position_embeddings=16)
        config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=12)
        hf = _save(transformers.CLIPModel(config), tmp_path)
    else:
        hf = _save(getattr(transformers, kind)(vision), tmp_path)
    px = _pixels(5)
    with torch.no_grad():
        if kind == "CLIPModel":
            ref = hf.get_image_features(pixel_values=torch.from_numpy(px)).pooler_output
        elif kind == "CLIPVisionModelWithProjection":
            ref = hf(pixel_values=torch.from_numpy(px)).image_embeds
        else:
            ref = hf(pixel_values=torch.from_numpy(px)).pooler_output
    want = _normalised(ref.numpy())
    encoder = load_clip_image_encoder(tmp_path)
    assert encoder.dim == (32 if kind == "CLIPVisionModel" else 12) == want.shape[1]
    got = clip_image_embeddings(encoder, px.transpose(0, 2, 3, 1), batch_size=2)   # 2 + 2 + 1 (padded)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-12)
    assert np.abs(got - want).max() < 1e-5
    # from the directory, one batch: the same numbers
    np.testing.assert_allclose(clip_image_embeddings(tmp_path, px.transpose(0, 2, 3, 1)), got, atol=1e-6)


def test_errors_name_the_input_and_stats_come_from_the_processor_file(tmp_path):
    import transformers

    _save(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), tmp_path)
    with pytest.raises(ValueError, match=r"pixel_values: expected NHWC \[n, 16, 16, 3\]"):
        clip_image_embeddings(tmp_path, np.zeros((2, 3, 16, 16), np.float32))
    assert image_stats(tmp_path) == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    assert image_stats(tmp_path) == ((0.5,) * 3, (0.25,) * 3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5], "image_std": [0.25] * 3}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json: image_mean / image_std"):
        image_stats(tmp_path)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="is not a CLIP checkpoint"):
        load_clip_image_encoder(llama)


def test_the_job_and_the_api_read_pixels_with_the_checkpoints_statistics(tmp_path):
    """An init_from checkpoint whose image processor uses ImageNet's statistics (InternVL's conversions):
    the data stage records them (`experiments.mllm.data.pixel_stats`) and `modeling.pixels` applies them;
    without init_from the job keeps CLIP's."""
    import json
    from types import SimpleNamespace

    from dfm.models.vision import CLIP_MEAN, CLIP_STD
    from experiments.mllm import modeling
    from experiments.mllm.data import pixel_stats

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    stats = pixel_stats(SimpleNamespace(init_from=str(tmp_path)))
    assert stats == (tuple(mean), tuple(std))
    assert pixel_stats(SimpleNamespace(init_from="")) == (CLIP_MEAN, CLIP_STD)
    img = np.full((1, 2, 2, 3), 200, np.uint8)
    np.testing.assert_allclose(modeling.pixels(img, stats)[0, 0, 0], (200 / 255 - np.array(mean)) / np.array(std),
                               rtol=1e-6)
