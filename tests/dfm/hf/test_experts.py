"""Decentralized model directories: K expert HF directories + partition + router settings."""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.decentral import BayesFilterRouter, CentroidRouter, Partition, mix_log_probs, mixture_token_log_probs
from dfm.hf import CheckpointError
from dfm.hf.experts import load_decentralized, save_decentralized
from dfm.hf.tokenizers import tokenizer_fingerprint
from dfm.models import Decoder, DecoderConfig

# "highest", the import default: loaded experts compute exactly like these originals on any backend
CONFIG = DecoderConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       tie_word_embeddings=True, matmul_precision="highest")


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
    assert all(m.config.matmul_precision == "highest" and m.config.attention == "auto" for m in dm.experts)
    fast = load_decentralized(root, matmul_precision="default", attention="xla")
    assert all((m.config.matmul_precision, m.config.attention) == ("default", "xla") for m in fast.experts)
    with pytest.raises(ValueError, match="^matmul_precision: must be one of"):
        load_decentralized(tmp_path / "nothing", matmul_precision="fast")   # checked before any file is read
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


@pytest.fixture(scope="module")
def valid_root(tmp_path_factory):
    part = partition()
    return save_decentralized(tmp_path_factory.mktemp("valid") / "dm", experts(), part,
                              router=CentroidRouter(part, temperature=0.5, top_k=1))


CENTROID = {"type": "centroid", "temperature": 0.5, "top_k": 1, "threshold": None}
# (edit of decentral.json, the field the error must name, a fragment of the message); K = 2 experts
MANIFEST_RULES = [
    ({"format": "dfm-other"}, "'format'", "must be 'dfm-decentralized'"),
    ({"version": 2}, "'version'", "2 is not supported"),
    ({"version": True}, "'version'", "True is not supported"),
    ({"experts": []}, "'experts'", "must be a non-empty list"),
    ({"experts": "experts/expert_00"}, "'experts'", "must be a non-empty list"),
    ({"experts": ["experts/expert_00", 3]}, "'experts[1]'", "must be a non-empty relative path string"),
    ({"experts": ["experts/expert_00", "/abs/expert_01"]}, "'experts[1]'", "got absolute '/abs/expert_01'"),
    ({"experts": ["experts/expert_00", "../expert_01"]}, "'experts[1]'", "must stay inside the model directory"),
    ({"experts": ["experts/expert_00", "experts/../../x"]}, "'experts[1]'", "must stay inside"),
    ({"experts": ["experts/expert_00", "."]}, "'experts[1]'", "must stay inside"),
    ({"experts": ["experts/expert_00", "./experts//expert_00/"]}, "'experts[1]'", "repeats experts[0]"),
    ({"partition": "../partition.npz"}, "'partition'", "must stay inside"),
    ({"tokenizer": "/tokenizer"}, "'tokenizer'", "got absolute"),
    ({"featurizer": "../f.pkl"}, "'featurizer'", "must stay inside"),
    ({"priors": [1.0]}, "'priors'", "must be a list of 2 numbers"),
    ({"priors": ["0.5", 0.5]}, "'priors'", "must be a list of 2 numbers"),
    ({"priors": 1.0}, "'priors'", "must be a list of 2 numbers"),
    ({"priors": [-0.5, 1.5]}, "'priors'", "must be finite and non-negative"),
    ({"priors": [float("nan"), 1.0]}, "'priors'", "must be finite and non-negative"),
    ({"priors": [0.5, 0.5 + 2e-6]}, "'priors'", "must sum to 1 (within 1e-6)"),
    ({"priors": [1, 2]}, "'priors'", "must sum to 1"),
    ({"mask_id": -1}, "'mask_id'", "must be null or an integer >= 0"),
    ({"mask_id": 12.0}, "'mask_id'", "must be null or an integer >= 0"),
    ({"mask_id": True}, "'mask_id'", "must be null or an integer >= 0"),
    ({"router": "centroid"}, "router type", "None is not one of"),
    ({"router": {"type": "learned"}}, "router type", "'learned' is not one of"),
    ({"router": {**CENTROID, "temperature": -0.5}}, "'router.temperature'", "must be a finite number > 0, got -0.5"),
    ({"router": {**CENTROID, "temperature": 0}}, "'router.temperature'", "must be a finite number > 0"),
    ({"router": {**CENTROID, "temperature": float("inf")}}, "'router.temperature'", "must be a finite number"),
    ({"router": {**CENTROID, "temperature": "1"}}, "'router.temperature'", "must be a finite number"),
    ({"router": {**CENTROID, "top_k": 0}}, "'router.top_k'", r"must be null or an integer in [1, 2], got 0"),
    ({"router": {**CENTROID, "top_k": 3}}, "'router.top_k'", "in [1, 2], got 3"),
    ({"router": {**CENTROID, "top_k": 1.0}}, "'router.top_k'", "in [1, 2], got 1.0"),
    ({"router": {**CENTROID, "threshold": 1.5}}, "'router.threshold'", "must be null or a number in [0, 1]"),
    ({"router": {**CENTROID, "threshold": -0.1}}, "'router.threshold'", "in [0, 1], got -0.1"),
]


@pytest.mark.parametrize("edit, field, message", MANIFEST_RULES, ids=[f"{f}-{i}" for i, (_, f, _) in
                                                                      enumerate(MANIFEST_RULES)])
def test_manifest_rules_name_the_file_and_field(valid_root, tmp_path, edit, field, message):
    root = shutil.copytree(valid_root, tmp_path / "dm")
    file = root / "decentral.json"
    manifest = {**json.loads(file.read_text()), **edit}
    file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: ") + ".*" + re.escape(field) + ".*"
                       + re.escape(message)):
        load_decentralized(root)


def test_manifest_edge_values_that_are_valid(valid_root, tmp_path):
    root = shutil.copytree(valid_root, tmp_path / "dm")
    file = root / "decentral.json"
    manifest = json.loads(file.read_text())
    edited = {**manifest, "priors": [0.25, 0.75 + 5e-7], "mask_id": 0,
              "experts": ["./experts/expert_00", manifest["experts"][1]],
              "router": {"type": "centroid", "temperature": 2, "top_k": 2, "threshold": 1}}
    file.write_text(json.dumps(edited))
    dm = load_decentralized(root)
    np.testing.assert_allclose(dm.priors, [0.25, 0.75], atol=1e-6)
    assert (dm.router.temperature, dm.router.top_k, dm.router.threshold, dm.mask_id) == (2.0, 2, 1, 0)
    file.write_text(json.dumps({**manifest, "priors": None}))            # null priors: the partition's sizes
    np.testing.assert_allclose(load_decentralized(root).priors, [1 / 3, 2 / 3])


def test_missing_experts_are_skipped_with_missing_ok(tmp_path):
    part = Partition(centroids=np.eye(3), mean=None, config={"algorithm": "test"}, sizes=np.array([10, 20, 30]))
    models = experts(3)
    root = save_decentralized(tmp_path / "dm", models, part, router=CentroidRouter(part, temperature=0.5))
    shutil.rmtree(root / "experts" / "expert_01")
    with pytest.raises(CheckpointError, match=re.escape(str(root / "experts" / "expert_01"))):
        load_decentralized(root)
    dm = load_decentralized(root, missing_ok=True)
    assert dm.experts[1] is None and dm.missing == (1,) and dm.num_experts == 3
    np.testing.assert_array_equal(dm.available, [True, False, True])
    assert dm.specs[1] == dm.specs[0] and dm.specs[2].vocab_size == 12
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 12, (2, 5)))
    np.testing.assert_array_equal(np.asarray(dm.experts[2](tokens)), np.asarray(models[2](tokens)))
    # weights renormalized over the available experts, before the router's top-k
    features = np.array([[0.1, 1.0, 0.2], [1.0, 0.1, 0.6]])
    cos = features / np.linalg.norm(features, axis=1, keepdims=True)          # centroids: the unit axes
    soft = np.exp(cos[:, [0, 2]] / 0.5)
    soft /= soft.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(dm.weights(features)), np.insert(soft, 1, 0.0, axis=1), rtol=1e-5)
    manifest = json.loads((root / "decentral.json").read_text())
    (root / "decentral.json").write_text(json.dumps({**manifest, "router": {**manifest["router"], "top_k": 1}}))
    top1 = load_decentralized(root, missing_ok=True).weights(features)      # row 0 is nearest the lost expert 1
    np.testing.assert_allclose(np.asarray(top1), [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], atol=1e-6)
    # uniform weights over the available; a directory without weights is missing too
    (root / "decentral.json").write_text(json.dumps({**manifest, "router": {"type": "uniform"}}))
    (root / "experts" / "expert_02" / "model.safetensors").unlink()
    dm = load_decentralized(root, missing_ok=True)
    assert dm.missing == (1, 2)
    np.testing.assert_allclose(np.asarray(dm.weights(batch=2)), [[1.0, 0.0, 0.0]] * 2)
    shutil.rmtree(root / "experts" / "expert_00")
    with pytest.raises(CheckpointError, match=r"decentral.json: none of the 3 expert directories"):
        load_decentralized(root, missing_ok=True)


def test_bayes_router_of_a_model_with_a_lost_expert(tmp_path):
    """`available=model.available` restricts the saved Bayes filter to the loaded experts: the scores
    are those of the mixture of the available experts with their priors renormalized (THEORY S9)."""
    part = Partition(centroids=np.eye(3), mean=None, config={"algorithm": "test"}, sizes=np.array([10, 20, 30]))
    root = save_decentralized(tmp_path / "dm", experts(3), part, router="bayes")
    shutil.rmtree(root / "experts" / "expert_00")
    dm = load_decentralized(root, missing_ok=True)
    tokens = np.random.default_rng(6).integers(0, 12, (2, 6))
    lp = np.zeros((3, 2, 5), np.float32)
    for k in (1, 2):
        logp = np.asarray(jax.nn.log_softmax(dm.experts[k](jnp.asarray(tokens)), axis=-1))
        lp[k] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    scores = mixture_token_log_probs(dm.router, jnp.asarray(lp), available=dm.available)
    assert scores.missing == (0,)
    priors = np.array([20, 30]) / 50
    want = np.log(np.exp(np.log(priors)[:, None] + lp[1:].sum(axis=2).astype(np.float64)).sum(axis=0))
    np.testing.assert_allclose(np.asarray(scores.log_probs, np.float64).sum(axis=1), want, rtol=1e-5)


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
