"""The multimodal job end to end (`dfm run --config mllm-tiny`), its CLI errors, and mixture decoding."""
import json
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp

from experiments.cli import main
from experiments.engine import graph, pipeline, training
from experiments.engine.config import ConfigError, parse_config, read_toml, resolve_path
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.mllm.task import MultimodalTask
from experiments.registry import load_job
from experiments.text.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TASK = MultimodalTask()


def _load(path):
    return parse_config(MultimodalExperimentConfig, read_toml(path), path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm") / "run"
    assert main(["run", "--config", "mllm-tiny", "--out", str(out), "--quiet"]) == 0
    return out


def test_tiny_run_writes_the_report_with_every_system(run_dir):
    from experiments.mllm.metrics import exact_match

    rep = json.loads((run_dir / "report.json").read_text())
    names = [s["name"] for s in rep["systems"]]
    assert names == ["stage1", "dense", "ensemble/centroid-top1", "ensemble/centroid-top2", "ensemble/oracle",
                     "ensemble/bayes", "random-ensemble/bayes"]
    n = rep["num_test_questions"]
    available = json.loads((run_dir / "data" / "summary.json").read_text())["questions"]["test"]
    assert n == min(available, 24) or (available > 24 and n == 25)   # max_test = 24, MME pairs kept whole
    for s in rep["systems"]:
        preds = rep["predictions"][s["name"]]
        assert len(preds) == s["scores"]["all"]["n"] == n
        em = np.mean([exact_match(p, r["answer"]) for p, r in zip(preds, rep["test_rows"])])
        assert s["scores"]["all"]["exact_match"] == pytest.approx(em, abs=1e-12), s["name"]
        assert s["answer_ppl"] == pytest.approx(np.exp(s["answer_nll"]), rel=1e-12)
    # compute matching: the experts' steps add up to the dense model's
    steps = [rep["stages"][f"expert-{k}"]["steps"] for k in range(2)]
    assert sum(steps) == rep["stages"]["dense"]["steps"] == 8
    assert rep["stages"]["expert-0"]["frozen"] == ["vision_tower"]
    md = (run_dir / "report.md").read_text()
    assert "| ensemble/bayes |" in md and "what (n=" in md and "Δ EM vs dense" in md
    # per-question scores are kept, and Δ vs dense is the difference of the systems' EM on them
    dense_em = np.asarray(rep["question_scores"]["dense"]["exact_match"], float)
    for s in rep["systems"]:
        em_q = np.asarray(rep["question_scores"][s["name"]]["exact_match"], float)
        assert em_q.mean() == pytest.approx(s["scores"]["all"]["exact_match"], abs=1e-12), s["name"]
        if s["name"] != "dense":
            assert s["delta_vs_dense"]["mean"] == pytest.approx(em_q.mean() - dense_em.mean(), abs=1e-12)
    for png in ("loss_curves", "routing", "partition", "examples"):
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000


class _Job:
    """The finished mllm-tiny run in `run_dir`: its task, config, `RunDir` and data."""

    def __init__(self, run_dir):
        self.task, self.config = load_job("mllm-tiny")
        self.run = pipeline.open_run(self.config, run_dir)
        self.data = self.task.prepare_data(self.config, self.run, log=lambda *a: None)

    def model(self, stage):
        return training.load_stage_model(self.run, stage, lambda: self.task.new_model(self.config, self.data))


def _open_job(run_dir):
    job = _Job(run_dir)
    return job, job.data


def _test_questions(config, data, rep):
    from experiments.mllm.evaluate import QuestionSet, select_questions

    rows = select_questions(data.questions["test"], config.data.max_test)
    assert [r["id"] for r in rows] == [r["id"] for r in rep["test_rows"]]
    return QuestionSet(rows, data.tokenizer, data.arrays["images_test"], data.summary["num_image_tokens"],
                       data.image_token_id)


def test_top1_routing_is_the_partition_function_and_decodes_as_that_expert(run_dir):
    """THEORY S12: the nearest centroid of a test image's features (recomputed here) is its cluster
    in assignments.json and the top-1 router's choice; the top-1 ensemble's answers are that
    expert's own greedy decoding (`greedy_generate`, no mixture code) question by question."""
    from dfm.models.multimodal import greedy_generate
    from dfm.prompts import decode_answer

    rep = json.loads((run_dir / "report.json").read_text())
    job, data = _open_job(run_dir)
    qs = _test_questions(job.config, data, rep)
    feats = np.load(run_dir / "partition" / "features.npz")["test"]
    part = np.load(run_dir / "partition" / "partition.npz")
    z = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if "mean" in part.files and part["mean"].size:
        z = z - part["mean"]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
    nearest = np.argmax(z @ part["centroids"].T, axis=1)
    assignments = json.loads((run_dir / "partition" / "assignments.json").read_text())
    np.testing.assert_array_equal(nearest, assignments["test"])
    chosen = nearest[qs.image]
    np.testing.assert_array_equal(np.argmax(np.asarray(rep["weights"]["centroid-top1"]), axis=1), chosen)
    np.testing.assert_array_equal(rep["test_clusters"], chosen)
    experts = [job.model(f"expert-{k}") for k in range(2)]
    new = job.config.eval.max_new_tokens
    want = []
    for i in range(len(qs.rows)):
        out = greedy_generate(experts[chosen[i]], jnp.asarray(qs.prompts[i][None]), jnp.asarray(qs.pixels(np.array([i]))),
                              new)
        want.append(decode_answer(data.tokenizer, np.asarray(out)[0, len(qs.prompts[i]):]))
    assert rep["predictions"]["ensemble/centroid-top1"] == want
    assert rep["predictions"]["ensemble/oracle"] == want


def test_answer_nll_of_every_system_recomputes(run_dir):
    """Single models: mean -log p of the reference answer tokens; fixed-weight ensembles: the
    mixture of the experts' token probabilities (THEORY S8); the Bayes filter by telescoping:
    per question -log sum_k w_k p_k(answer | image, question) (THEORY S9)."""
    rep = json.loads((run_dir / "report.json").read_text())
    job, data = _open_job(run_dir)
    qs = _test_questions(job.config, data, rep)
    names = ["stage1", "dense", "expert-0", "expert-1", "random-0", "random-1"]
    lp = {n: qs.split_log_probs(qs.log_probs(job.model(n), 8))[1] for n in names}
    mask = qs.answer_mask
    count = mask.sum()
    by = {s["name"]: s for s in rep["systems"]}
    for name in ("stage1", "dense"):
        assert by[name]["answer_nll"] == pytest.approx(-(lp[name] * mask).sum() / count, rel=1e-5)
    experts = np.stack([lp["expert-0"], lp["expert-1"]])
    for router in ("centroid-top1", "centroid-top2", "oracle"):
        w = np.asarray(rep["weights"][router])
        with np.errstate(divide="ignore"):
            mix = logsumexp(np.log(w).T[:, :, None] + experts, axis=0)
        assert by[f"ensemble/{router}"]["answer_nll"] == pytest.approx(-(mix * mask).sum() / count, rel=1e-5)
    assignments = graph.load_assignments(job.run, 2)
    for system, members, priors in (("ensemble/bayes", experts, assignments.priors(2)),
                                    ("random-ensemble/bayes", np.stack([lp["random-0"], lp["random-1"]]),
                                     assignments.priors(2, random=True))):
        seq = (members * mask).sum(axis=2)                                            # [K, n]
        total = -logsumexp(np.log(priors)[:, None] + seq, axis=0).sum()
        assert by[system]["answer_nll"] == pytest.approx(total / count, rel=1e-5)


def test_experts_share_the_frozen_stage1_tower(run_dir):
    job, data = _open_job(run_dir)
    base, expert = job.model("stage1"), job.model("expert-1")
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
    from dfm.decentral import BayesFilterRouter, FixedRouter, mixture_generate
    from dfm.models.multimodal import greedy_generate
    from experiments.mllm import modeling

    job, data = _open_job(run_dir)
    summary = data.summary
    experts = [job.model(f"expert-{k}") for k in range(2)]
    px = modeling.pixels(data.arrays["images_test"][:3])
    nit = summary["num_image_tokens"]
    prompt = np.asarray([summary["bos_id"]] + [summary["image_token_id"]] * nit + [5, 6, 7], np.int32)
    prompts = np.stack([prompt] * 3)
    w = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = mixture_generate(experts, prompts, 4, FixedRouter(jnp.asarray(w)), pixels=px)
    longer = mixture_generate(experts, prompts, 4, FixedRouter(jnp.asarray(w)), pixels=px,
                              cache_length=len(prompt) + 9)
    for i in range(3):
        want = np.asarray(greedy_generate(experts[int(w[i, 1])], jnp.asarray(prompts[i:i + 1]),
                                          jnp.asarray(px[i:i + 1]), 4))[0, len(prompt):]
        np.testing.assert_array_equal(got[i], want)
        np.testing.assert_array_equal(longer[i], want)
    # a Bayes filter whose prior puts (numerically) all mass on expert 1 decodes as expert 1
    np.testing.assert_array_equal(
        mixture_generate(experts, prompts, 4, BayesFilterRouter.from_priors([1e-30, 1.0]), pixels=px),
        mixture_generate(experts, prompts, 4, FixedRouter(jnp.asarray(np.eye(2)[[1, 1, 1]])), pixels=px))
    with pytest.raises(ValueError, match="^cache_length: 5 < prompt"):
        mixture_generate(experts, prompts, 4, FixedRouter(jnp.asarray(w)), pixels=px, cache_length=5)


def test_multimodal_configs_parse_and_errors_name_the_field(tmp_path):
    for name in ("mllm-digits", "mllm-tiny"):
        task, cfg = load_job(name)
        assert task.name == cfg.task == "mllm" and cfg.stage2.train == "projector+llm"
        again = MultimodalExperimentConfig.from_dict(tomllib.loads(cfg.to_toml()), name)
        assert again == cfg
    with pytest.raises(ConfigError, match="a config of the 'mllm' task, not the text job"):
        load_config("mllm-tiny")
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "mllm"\n[stage1]\nsteps = 0\n')
    with pytest.raises(ConfigError, match="stage1.steps: must be >= 1, got 0"):
        _load(bad)
    bad.write_text('task = "mllm"\n[vision]\npatch = 4\n')
    with pytest.raises(ConfigError, match="unknown key 'patch' in section \\[vision\\]"):
        _load(bad)
    bad.write_text('task = "mllm"\n[stage2]\ntrain = "all"\n')
    with pytest.raises(ConfigError, match="stage2.train: the tower must stay frozen"):
        _load(bad)
    for text, match in [('[projector]\nkind = "internvl"\ndownsample_ratio = 0.5\n', "projector.kind"),
                        ('[projector]\ndownsample_ratio = 0.5\n', "projector.downsample_ratio: LLaVA"),
                        ('[projector]\nvision_feature_layer = -5\n', "projector.vision_feature_layer"),
                        ('[stage2]\nsteps = 2\n', "stage2.steps: must be >= partition.num_clusters"),
                        ('[data]\nsource = "llava"\ntrain = "a.jsonl"\ntest = "b.jsonl"\n', "data.val")]:
        bad.write_text('task = "mllm"\n' + text)
        with pytest.raises(ConfigError, match=match):
            _load(bad)
    bad.write_text('task = "mllm"\n[data]\nimage_size = 30\n')
    with pytest.raises(ConfigError, match="vision.patch_size: must divide data.image_size"):
        _load(bad)


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
    cfg = MultimodalExperimentConfig.from_dict(raw, "mllm-tiny-internvl")
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
    job, data = _open_job(run_dir)
    return job.model(stage)


def test_exported_decentralized_directory_rebuilds_the_ensemble(run_dir):
    from dfm.hf import load_decentralized

    # the trained models' own matmul precision (the import default is "highest"): same numerics on any backend
    trained = _run_model(run_dir, "expert-0").config.text.matmul_precision
    dec = load_decentralized(run_dir / "decentralized", matmul_precision=trained)
    assert all(e.config.text.matmul_precision == trained for e in dec.experts)
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
    with jax.default_matmul_precision("highest"):      # a parity check: full float32 on any backend
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
    from experiments.mllm.data import DataError

    data = tmp_path / "llava"
    _llava_files(data, first_turn_image=False)
    raw = tomllib.loads(resolve_path("mllm-tiny").read_text())
    raw["data"] = {"source": "llava", "train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"),
                   "test": str(data / "test.jsonl"), "image_root": str(data), "image_size": 16, "vocab_size": 300}
    cfg = MultimodalExperimentConfig.from_dict(raw, "llava-small")
    with pytest.raises(DataError, match="record 'train-0'.*first human turn"):
        TASK.prepare_data(cfg, pipeline.open_run(cfg, tmp_path / "run"), log=lambda *a: None)
    _llava_files(data, first_turn_image=True)
    (tmp_path / "run" / "tokenizer").mkdir()                     # debris of an interrupted stage
    (tmp_path / "run" / "tokenizer" / "stale.txt").write_text("x")
    loaded = TASK.prepare_data(cfg, pipeline.open_run(cfg, tmp_path / "run"), log=lambda *a: None)
    summary = loaded.summary
    assert summary["records"] == {"train": 6, "val": 2, "test": 2}
    assert not (tmp_path / "run" / "tokenizer" / "stale.txt").exists()
    arrays = loaded.arrays
    # both turns trained on: " a cat<eos>" and " a dog<eos>"; the image expanded to 4 tokens, once
    assert (arrays["tokens"] == summary["image_token_id"]).sum(axis=1).tolist() == [4] * 6
