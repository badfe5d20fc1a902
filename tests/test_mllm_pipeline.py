"""The multimodal job end to end (`dfm run --config mllm-tiny`), its CLI errors, and mixture decoding."""
import json
import tomllib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.cli import main
from experiments.config import ConfigError, load_config, resolve_path
from experiments.mllm import config as mconfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm") / "run"
    assert main(["run", "--config", "mllm-tiny", "--out", str(out), "--quiet"]) == 0
    return out


def test_tiny_run_writes_the_report_with_every_system(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    names = [s["name"] for s in rep["systems"]]
    assert names == ["stage1", "dense", "ensemble/centroid-top1", "ensemble/centroid-top2", "ensemble/oracle",
                     "ensemble/bayes", "random-ensemble/bayes"]
    n = rep["num_test_questions"]
    available = json.loads((run_dir / "data" / "summary.json").read_text())["questions"]["test"]
    assert n == min(available, 24) or (available > 24 and n == 25)   # max_test = 24, MME pairs kept whole
    for s in rep["systems"]:
        assert np.isfinite(s["answer_nll"]) and s["answer_nll"] > 0
        assert s["scores"]["all"]["n"] == n
        assert 0.0 <= s["scores"]["all"]["exact_match"] <= 1.0 and 0.0 <= s["scores"]["all"]["vqa_accuracy"] <= 1.0
        assert len(rep["predictions"][s["name"]]) == n
    # S12: the oracle (test image's cluster) is the nearest centroid, i.e. top-1: same answers and NLL
    by = {s["name"]: s for s in rep["systems"]}
    assert rep["predictions"]["ensemble/oracle"] == rep["predictions"]["ensemble/centroid-top1"]
    assert by["ensemble/oracle"]["answer_nll"] == pytest.approx(by["ensemble/centroid-top1"]["answer_nll"], rel=1e-12)
    # compute matching: the experts' steps add up to the dense model's
    steps = [rep["stages"][f"expert-{k}"]["steps"] for k in range(2)]
    assert sum(steps) == rep["stages"]["dense"]["steps"] == 8
    assert rep["stages"]["expert-0"]["frozen"] == ["vision_tower"]
    md = (run_dir / "report.md").read_text()
    assert "| ensemble/bayes |" in md and "EM digit" in md
    for png in ("loss_curves", "routing", "partition", "examples"):
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000


def test_experts_share_the_frozen_stage1_tower(run_dir):
    from dfm.train import load_model
    from experiments.mllm.config import load
    from experiments.mllm import modeling

    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    cfg = load(resolve_path("mllm-tiny"))
    factory = lambda: modeling.new_model(  # noqa: E731
        modeling.model_config(cfg, summary["vocab_size"], summary["image_token_id"]), 0)
    base, expert = load_model(factory, run_dir / "models" / "stage1"), load_model(factory, run_dir / "models" / "expert-1")
    tower = lambda m: nnx.to_flat_state(nnx.state(m.vision_tower, nnx.Param))  # noqa: E731
    for (p, a), (_, b) in zip(tower(base), tower(expert)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    moved = [np.abs(np.asarray(a[...]) - np.asarray(b[...])).max() for (_, a), (_, b) in
             zip(nnx.to_flat_state(nnx.state(base.language_model, nnx.Param)),
                 nnx.to_flat_state(nnx.state(expert.language_model, nnx.Param)))]
    assert max(moved) > 0


def test_rerun_is_idempotent(run_dir, capsys):
    before = (run_dir / "report.json").read_text()
    assert main(["run", "--config", "mllm-tiny", "--out", str(run_dir), "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (run_dir / "report.json").read_text() == before


def test_mixture_generation_with_one_hot_weights_is_that_experts_greedy_decoding(run_dir):
    from dfm.models.multimodal import greedy_generate
    from dfm.train import load_model
    from experiments.mllm import modeling
    from experiments.mllm.config import load

    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    cfg = load(resolve_path("mllm-tiny"))
    factory = lambda: modeling.new_model(  # noqa: E731
        modeling.model_config(cfg, summary["vocab_size"], summary["image_token_id"]), 0)
    experts = [load_model(factory, run_dir / "models" / f"expert-{k}") for k in range(2)]
    arrays = np.load(run_dir / "data" / "arrays.npz")
    px = modeling.pixels(arrays["images_test"][:3])
    nit = summary["num_image_tokens"]
    prompt = np.asarray([summary["bos_id"]] + [summary["image_token_id"]] * nit + [5, 6, 7], np.int32)
    prompts = np.stack([prompt] * 3)
    w = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = modeling.mixture_generate(experts, prompts, px, 4, weights=w)
    for i in range(3):
        want = np.asarray(greedy_generate(experts[int(w[i, 1])], jnp.asarray(prompts[i:i + 1]),
                                          jnp.asarray(px[i:i + 1]), 4))[0, len(prompt):]
        np.testing.assert_array_equal(got[i], want)
    # a Bayes filter whose prior puts (numerically) all mass on expert 1 decodes as expert 1
    lp = np.log(np.asarray([[1e-300, 1.0]] * 3))
    np.testing.assert_array_equal(modeling.mixture_generate(experts, prompts, px, 4, log_prior=lp),
                                  modeling.mixture_generate(experts, prompts, px, 4, weights=np.eye(2)[[1, 1, 1]]))


def test_multimodal_configs_parse_and_errors_name_the_field(tmp_path):
    for name in ("mllm-digits", "mllm-tiny"):
        cfg = mconfig.load(resolve_path(name))
        assert cfg.task == "mllm" and cfg.stage2.train == "projector+llm"
        again = mconfig.from_dict(tomllib.loads(mconfig.to_toml(cfg)), name)
        assert again == cfg
    with pytest.raises(ConfigError, match="multimodal config"):
        load_config("mllm-tiny")
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "mllm"\n[stage1]\nsteps = 0\n')
    with pytest.raises(ConfigError, match="stage1.steps: must be >= 1, got 0"):
        mconfig.load(bad)
    bad.write_text('task = "mllm"\n[vision]\npatch = 4\n')
    with pytest.raises(ConfigError, match="unknown key 'patch' in section \\[vision\\]"):
        mconfig.load(bad)
    bad.write_text('task = "mllm"\n[stage2]\ntrain = "all"\n')
    with pytest.raises(ConfigError, match="stage2.train: the tower must stay frozen"):
        mconfig.load(bad)
    for text, match in [('[projector]\nkind = "internvl"\ndownsample_ratio = 0.5\n', "projector.kind"),
                        ('[projector]\ndownsample_ratio = 0.5\n', "projector.downsample_ratio: LLaVA"),
                        ('[projector]\nvision_feature_layer = -5\n', "projector.vision_feature_layer"),
                        ('[stage2]\nsteps = 2\n', "stage2.steps: must be >= partition.num_clusters"),
                        ('[data]\nsource = "llava"\ntrain = "a.jsonl"\ntest = "b.jsonl"\n', "data.val")]:
        bad.write_text('task = "mllm"\n' + text)
        with pytest.raises(ConfigError, match=match):
            mconfig.load(bad)
    bad.write_text('task = "mllm"\n[data]\nimage_size = 30\n')
    with pytest.raises(ConfigError, match="vision.patch_size: must divide data.image_size"):
        mconfig.load(bad)


def test_cli_errors_for_the_multimodal_job(tmp_path, capsys):
    assert main(["run", "--config", "mllm-tiny", "--schedule", "masked", "--out", str(tmp_path / "x")]) == 2
    assert "--schedule" in capsys.readouterr().err
    assert main(["train", "--router", "--config", "mllm-tiny", "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--expert", "5", "--config", "mllm-tiny", "--out", str(tmp_path / "y"), "--quiet"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["evaluate", "--config", "mllm-tiny", "--out", str(tmp_path / "z"), "--quiet"]) == 1
    assert "unfinished stages" in capsys.readouterr().err


def test_internvl_variant_builds_and_trains_one_step():
    import jax

    from experiments.mllm import modeling

    raw = tomllib.loads(resolve_path("mllm-tiny").read_text())
    raw["vision"] |= {"arch": "internvit", "patch_size": 4}
    raw["projector"] = {"kind": "internvl", "downsample_ratio": 0.5, "vision_feature_layer": -1}
    cfg = mconfig.from_dict(raw, "mllm-tiny-internvl")
    assert modeling.num_image_tokens(cfg) == 4          # 16 px / 4 = 4x4 patches, pixel shuffle 0.5 -> 2x2
    mc = modeling.model_config(cfg, vocab_size=40, image_token_id=39)
    model = modeling.new_model(mc, 0)
    tokens = np.asarray([[0] + [39] * 4 + [5, 6, 7, 1, 2]] * 2, np.int32)
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray((tokens > 4) & (tokens != 39)),
             "pixels": jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)}
    loss, aux = modeling.llava_loss(model, batch, jax.random.key(0))
    assert float(aux["tokens"]) == 6.0          # targets 5, 6, 7 per row (mask shifted by one)
    assert abs(float(loss) - np.log(40)) < 0.5  # near-uniform predictions at init


def _inputs(run_dir):
    from experiments.mllm import modeling

    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    arrays = np.load(run_dir / "data" / "arrays.npz")
    px = modeling.pixels(arrays["images_test"][:2])
    tokens = np.asarray([[summary["bos_id"]] + [summary["image_token_id"]] * summary["num_image_tokens"] + [5, 9, 7]] * 2,
                        np.int32)
    return summary, tokens, px


def _run_model(run_dir, stage):
    from dfm.train import load_model
    from experiments.mllm import modeling
    from experiments.mllm.config import load

    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    cfg = load(resolve_path("mllm-tiny"))
    return load_model(lambda: modeling.new_model(
        modeling.model_config(cfg, summary["vocab_size"], summary["image_token_id"]), 0), run_dir / "models" / stage)


def test_exported_decentralized_directory_rebuilds_the_ensemble(run_dir):
    from dfm.hf import load_decentralized

    dec = load_decentralized(run_dir / "decentralized")
    _, tokens, px = _inputs(run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    assert dec.router.top_k == 2 and dec.router.temperature == pytest.approx(rep["temperature"])
    for k, expert in enumerate(dec.experts):
        ours = _run_model(run_dir, f"expert-{k}")
        np.testing.assert_allclose(np.asarray(expert(jnp.asarray(tokens), jnp.asarray(px))),
                                   np.asarray(ours(jnp.asarray(tokens), jnp.asarray(px))), atol=1e-6)


@pytest.mark.peer
def test_exported_dense_model_loads_in_transformers_with_the_same_logits(run_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    _, tokens, px = _inputs(run_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(run_dir / "hf" / "dense").eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                    pixel_values=torch.tensor(px.transpose(0, 3, 1, 2))).logits.numpy()
    ours = np.asarray(_run_model(run_dir, "dense")(jnp.asarray(tokens), jnp.asarray(px)))
    assert np.abs(theirs - ours).max() < 1e-4
    tok = AutoTokenizer.from_pretrained(run_dir / "hf" / "dense")
    assert tok.convert_tokens_to_ids("<image>") == hf.config.image_token_index


def _llava_files(root, first_turn_image=True):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        lines = []
        for i in range(n):
            name = f"{split}{i}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name)
            q1, q2 = ("<image>\nWhat is it?", "And now?") if first_turn_image or split != "train" or i else \
                ("What is it?", "<image>\nAnd now?")
            lines.append(json.dumps({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": q1}, {"from": "gpt", "value": "a cat"},
                {"from": "human", "value": q2}, {"from": "gpt", "value": "a dog"}]}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_llava_source_data_stage_and_placeholder_errors(tmp_path):
    from experiments.mllm import stages
    from experiments.mllm.data import DataError

    data = tmp_path / "llava"
    _llava_files(data, first_turn_image=False)
    raw = tomllib.loads(resolve_path("mllm-tiny").read_text())
    raw["data"] = {"source": "llava", "train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"),
                   "test": str(data / "test.jsonl"), "image_root": str(data), "image_size": 16, "vocab_size": 300}
    cfg = mconfig.from_dict(raw, "llava-small")
    ctx = stages.open_context(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    with pytest.raises(DataError, match="record 'train-0'.*first human turn"):
        stages.data_summary(ctx)
    _llava_files(data, first_turn_image=True)
    (tmp_path / "run" / "tokenizer").mkdir()                     # debris of an interrupted stage
    (tmp_path / "run" / "tokenizer" / "stale.txt").write_text("x")
    ctx = stages.open_context(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    summary = stages.data_summary(ctx)
    assert summary["records"] == {"train": 6, "val": 2, "test": 2}
    assert not (tmp_path / "run" / "tokenizer" / "stale.txt").exists()
    arrays = stages.arrays(ctx)
    # both turns trained on: " a cat<eos>" and " a dog<eos>"; the image expanded to 4 tokens, once
    assert (arrays["tokens"] == summary["image_token_id"]).sum(axis=1).tolist() == [4] * 6
