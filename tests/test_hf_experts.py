"""Decentralized model directories: K expert HF directories + partition + router settings."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.decentral import BayesFilterRouter, CentroidRouter, Partition, mix_log_probs
from dfm.hf import CheckpointError
from dfm.hf.experts import load_decentralized, save_decentralized
from dfm.hf.tokenizers import tokenizer_fingerprint
from dfm.models import Decoder, DecoderConfig

CONFIG = DecoderConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       tie_word_embeddings=True)


def partition(k=2):
    centroids = np.eye(k, 3)
    return Partition(centroids=centroids, mean=None, config={"algorithm": "test"}, sizes=np.arange(1, k + 1) * 10)


def experts(k=2, config=CONFIG):
    return [Decoder(config, rngs=nnx.Rngs(seed)) for seed in range(k)]


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(12)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0")


def test_save_load_centroid_router_and_mix(tmp_path):
    models, part, tok = experts(), partition(), tokenizer()
    router = CentroidRouter(part, temperature=0.5, top_k=1)
    root = save_decentralized(tmp_path / "dm", models, part, router=router, tokenizer=tok)
    manifest = json.loads((root / "decentral.json").read_text())
    assert manifest["experts"] == ["experts/expert_00", "experts/expert_01"]
    assert manifest["router"] == {"type": "centroid", "temperature": 0.5, "top_k": 1, "threshold": None}
    assert manifest["priors"] == pytest.approx([1 / 3, 2 / 3]) and manifest["mask_id"] is None
    assert (root / "experts" / "expert_01" / "config.json").is_file()

    dm = load_decentralized(root)
    assert dm.num_experts == 2 and dm.mask_id is None
    assert [s.vocab_size for s in dm.specs] == [12, 12]
    assert dm.specs[0].tokenizer_fingerprint == tokenizer_fingerprint(tok)
    np.testing.assert_array_equal(dm.partition.centroids, part.centroids)
    np.testing.assert_allclose(dm.priors, [1 / 3, 2 / 3])
    assert isinstance(dm.router, CentroidRouter) and (dm.router.temperature, dm.router.top_k) == (0.5, 1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 12, (2, 5)))
    logits = jnp.stack([m(tokens) for m in dm.experts])
    for original, loaded in zip(models, dm.experts):
        np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(original(tokens)))
    # features nearest centroid 1, then 0: top-1 routes row 0 to expert 1 and row 1 to expert 0
    weights = dm.weights(np.array([[0.1, 1.0, 0.0], [1.0, 0.2, 0.0]]))
    np.testing.assert_allclose(np.asarray(weights), [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)
    mixed = mix_log_probs(logits, weights)
    np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(jax.nn.log_softmax(logits[1, 0])), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed[1]), np.asarray(jax.nn.log_softmax(logits[0, 1])), atol=1e-6)


def test_bayes_router_masked_experts_and_uniform(tmp_path):
    masked = CONFIG.replace(vocab_size=13, output_size=12, causal=False)
    root = save_decentralized(tmp_path / "dm", experts(3, masked), partition(3),
                              router=BayesFilterRouter.from_priors([0.5, 0.25, 0.25]))
    dm = load_decentralized(root)
    assert dm.mask_id == 12 and all(s.mask_id == 12 and s.vocab_size == 12 for s in dm.specs)
    assert isinstance(dm.router, BayesFilterRouter)
    np.testing.assert_allclose(np.exp(np.asarray(dm.router.log_priors)), [0.5, 0.25, 0.25], rtol=1e-6)
    assert not dm.experts[0].config.causal
    with pytest.raises(ValueError, match="Bayes filter has no fixed weights"):
        dm.weights(np.zeros((1, 3)))
    uniform = load_decentralized(save_decentralized(tmp_path / "u", experts(), partition()))
    assert uniform.router is None
    np.testing.assert_allclose(np.asarray(uniform.weights(batch=3)), np.full((3, 2), 0.5))


def test_bad_layouts_are_named(tmp_path):
    with pytest.raises(ValueError, match="3 experts for a partition of 2 clusters"):
        save_decentralized(tmp_path / "x", experts(3), partition(2))
    with pytest.raises(ValueError, match="differing"):
        save_decentralized(tmp_path / "x", [experts(1)[0], experts(1, CONFIG.replace(vocab_size=13))[0]], partition())
    root = save_decentralized(tmp_path / "dm", experts(), partition())
    manifest_file = root / "decentral.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "router": {"type": "learned"}}))
    with pytest.raises(CheckpointError, match=r"decentral.json: router type 'learned'"):
        load_decentralized(root)
    manifest_file.write_text(json.dumps({**manifest, "experts": manifest["experts"][:1]}))
    with pytest.raises(CheckpointError, match=r"decentral.json: 1 experts but partition.npz has 2 clusters"):
        load_decentralized(root)
    manifest_file.write_text(json.dumps(manifest))
    tokenizer().save_pretrained(root / "experts" / "expert_01")      # only expert 1 has a tokenizer
    with pytest.raises(ValueError, match=r"experts\[1\].tokenizer_fingerprint=.* differs from experts\[0\]"):
        load_decentralized(root)
    (root / "experts" / "expert_01" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"expert_01: no model.safetensors"):
        load_decentralized(root)
    with pytest.raises(CheckpointError, match=r"decentral.json: no such file"):
        load_decentralized(tmp_path)


@pytest.mark.peer
def test_expert_directories_load_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    models = experts()
    root = save_decentralized(tmp_path / "dm", models, partition())
    tokens = np.random.default_rng(1).integers(0, 12, (2, 6))
    for i, model in enumerate(models):
        hf = transformers.AutoModelForCausalLM.from_pretrained(root / "experts" / f"expert_{i:02d}").eval()
        with torch.no_grad():
            ref = hf(torch.from_numpy(tokens)).logits.numpy()
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)
