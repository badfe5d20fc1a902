"""Featurizer files without pickle, sharded HF export, the decentralized directory's featurizer."""
import json

import numpy as np
import pytest
from flax import nnx

from dfm.decentral import PrecomputedFeaturizer, TextFeaturizer
from dfm.hf import SafetensorsCheckpoint, load_pretrained, save_pretrained
from dfm.models import Decoder, DecoderConfig

TEXTS = [f"the rocket {i} moon launch orbit" if i % 2 else f"def mean(xs): return sum(xs) / len(xs) {i} python"
         for i in range(30)] + ["The quick brown fox jumps", "Étude café naïve"]


def test_text_featurizer_roundtrip_without_pickle(tmp_path):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    f = TextFeaturizer(n_components=4, seed=0).fit(TEXTS)
    tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit(TEXTS)
    svd = TruncatedSVD(4, random_state=0).fit(tfidf.transform(TEXTS))
    q = TEXTS[:4] + ["zzz unknown", "ROCKET rocket python"]
    reference = svd.transform(tfidf.transform(q))
    np.testing.assert_allclose(f.transform(q), reference, atol=1e-6)
    f.save(tmp_path / "featurizer.npz")
    assert (tmp_path / "featurizer.npz").read_bytes()[:4] == b"PK\x03\x04"     # a zip of arrays, not a pickle
    with np.load(tmp_path / "featurizer.npz", allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert set(z.files) == {"meta", "idf", "components"}
    assert meta["format"] == "dfm-featurizer" and meta["version"] == 1 and meta["class"] == "TextFeaturizer"
    back = TextFeaturizer.load(tmp_path / "featurizer.npz")
    np.testing.assert_allclose(back.transform(q), reference, atol=1e-6)
    with pytest.raises(ValueError, match="not a PrecomputedFeaturizer"):
        PrecomputedFeaturizer.load(tmp_path / "featurizer.npz")


def test_a_file_that_is_not_a_featurizer_is_named(tmp_path):
    (tmp_path / "junk").write_bytes(b"nope")
    with pytest.raises(ValueError, match="junk.*not a featurizer file"):
        TextFeaturizer.load(tmp_path / "junk")


def _tiny_decoder():
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           tie_word_embeddings=False)
    return Decoder(config, rngs=nnx.Rngs(0))


def test_sharded_export_loads_in_transformers_and_here(tmp_path):
    model = _tiny_decoder()
    path = save_pretrained(model, tmp_path / "sharded", max_shard_size=20_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and not (path / "model.safetensors").exists()
    tokens = np.arange(10, dtype=np.int32)[None]
    ours = np.asarray(model(tokens))
    np.testing.assert_allclose(np.asarray(load_pretrained(path)(tokens)), ours, atol=1e-6)
    with SafetensorsCheckpoint(path) as ckpt:
        assert ckpt.index_file is not None
    single = save_pretrained(model, tmp_path / "single")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
