"""`dfm.DecentralizedModel` on the tiny multimodal job's export (`<run>/decentralized`, LLaVA-style
experts): route / score / generate with images check against the job's own computations
(experiments/mllm: its report, `image_features`, `mixture_generate`, `sequence_log_probs`)."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from experiments.cli import main

pytestmark = pytest.mark.slow
GEN_QUESTIONS = [0, 1]   # two prompt lengths (34 and 29 tokens in the tiny run): one KV-cache length


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm-images") / "run"
    assert main(["run", "--config", "mllm-tiny", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def job(run_dir):
    """The job's context, data, report, test questions (as its evaluation lays them out) and experts."""
    from experiments.engine import stages
    from experiments.mllm.evaluate import QuestionSet, select_questions
    from experiments.registry import load_job

    task, config = load_job("mllm-tiny")
    ctx = stages.open_context(task, config, run_dir, progress=False, log=lambda *a: None)
    data = task.prepare_data(ctx)
    rep = json.loads((run_dir / "report.json").read_text())
    rows = select_questions(data.questions["test"], ctx.config.data.max_test)
    assert [r["id"] for r in rows] == [r["id"] for r in rep["test_rows"]]
    qs = QuestionSet(rows, data.tokenizer, data.arrays["images_test"], data.summary["num_image_tokens"],
                     data.image_token_id)
    experts = [stages.load_stage_model(ctx, data, f"expert-{k}") for k in range(2)]
    return {"ctx": ctx, "data": data, "rep": rep, "qs": qs, "experts": experts}


@pytest.fixture(scope="module")
def model(run_dir, job):
    from dfm import DecentralizedModel

    # the trained models' own matmul precision: the same numerics as the job's evaluation
    precision = job["experts"][0].config.text.matmul_precision
    return DecentralizedModel.load(run_dir / "decentralized", matmul_precision=precision)


def _images(job, idx=None):
    qs = job["qs"]
    idx = np.arange(len(qs.rows)) if idx is None else np.asarray(idx)
    return qs.images[qs.image[idx]], idx


def test_route_is_the_jobs_centroid_routing_of_the_images(model, job):
    from dfm.decentral import CentroidRouter, Partition
    from experiments.engine import stages
    from experiments.mllm import modeling

    assert model.multimodal and isinstance(model.router, CentroidRouter)
    images, _ = _images(job)
    texts = [r["question"] for r in job["qs"].rows]
    w = model.route(texts, images=images)
    assert w.shape == (len(texts), 2) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(model.route(None, images=images), w)      # texts do not enter
    # the job's evaluation (report.json) routed the same test images with the same top-2 router
    np.testing.assert_allclose(w, np.asarray(job["rep"]["weights"]["centroid-top2"]), atol=1e-6)
    # recomputed with the job's functions: stage-1 tower features (the partition's) + the exported router
    ctx, data = job["ctx"], job["data"]
    stage1 = stages.load_stage_model(ctx, data, "stage1")
    feats = modeling.image_features(stage1, images, 8)
    np.testing.assert_allclose(model.image_features(images), feats, atol=1e-5)
    np.testing.assert_allclose(feats, np.load(ctx.run.partition / "features.npz")["test"][job["qs"].image], atol=1e-5)
    router = CentroidRouter(Partition.load(ctx.run.partition / "partition.npz"),
                            temperature=job["rep"]["temperature"], top_k=2)
    np.testing.assert_allclose(w, np.asarray(router.route(feats), np.float64), atol=1e-6)
    # top-1 (an override at load) is the partition function: the report's centroid-top1 / test clusters
    from dfm import DecentralizedModel

    top1 = DecentralizedModel(model.checkpoint, model.tokenizer, model.available, top_k=1).route(texts, images=images)
    np.testing.assert_array_equal(top1, np.asarray(job["rep"]["weights"]["centroid-top1"]))
    np.testing.assert_array_equal(top1.argmax(axis=1), job["rep"]["test_clusters"])


def test_generate_greedy_matches_the_jobs_mixture_generate(model, job):
    from dfm.decentral import BayesFilterRouter, FixedRouter
    from experiments.mllm import modeling
    from experiments.mllm.text import decode_answer

    qs, tok, rep = job["qs"], job["data"].tokenizer, job["rep"]
    images, idx = _images(job, GEN_QUESTIONS)
    questions = [qs.rows[i]["question"] for i in idx]
    assert all(q.startswith("<image>\n") for q in questions)
    got = model.generate(questions, images=images, max_new_tokens=3)
    # without the placeholder the prompt gets "<image>\n" in front: the same prompt ids
    bare = [q[len("<image>\n"):] for q in questions]
    assert model.generate(bare, images=images, max_new_tokens=3) == got
    w = model.route(questions, images=images)
    want, cache_length = [], int(qs.prompt_len[idx].max()) + 3
    for j, i in enumerate(idx):   # the job's path: encode_prompt ids, its pixels, its prefill + mixture decoding
        gen = modeling.mixture_generate(job["experts"], qs.prompts[i][None], qs.pixels(np.array([i])), 3,
                                        FixedRouter(jnp.asarray(w[j:j + 1], jnp.float32)), cache_length=cache_length)
        want.append(decode_answer(tok, gen[0]))
    assert got == want
    assert got == [rep["predictions"]["ensemble/centroid-top2"][i] for i in idx]
    # the Bayes filter from the priors (S9), updated by each generated token: the job's ensemble/bayes
    bayes = dataclasses.replace(model.checkpoint, router=BayesFilterRouter.from_priors(model.checkpoint.priors))
    from dfm import DecentralizedModel

    bm = DecentralizedModel(bayes, model.tokenizer, model.available)
    np.testing.assert_allclose(bm.route(questions, images=images), np.tile(model.checkpoint.priors, (len(idx), 1)))
    assert bm.generate(bare, images=images, max_new_tokens=3) == [rep["predictions"]["ensemble/bayes"][i] for i in idx]
    # sampling is reproducible by seed
    hot = model.generate(bare[:1], images=images[:1], max_new_tokens=3, temperature=1.0, seed=5)
    assert hot == model.generate(bare[:1], images=images[:1], max_new_tokens=3, temperature=1.0, seed=5)


def test_score_is_the_mixture_of_the_experts_token_log_probs(model, job):
    from experiments.mllm import modeling
    from experiments.mllm.text import expand_image_tokens

    tok, summary = job["data"].tokenizer, job["data"].summary
    images, _ = _images(job, [0, 1, 2])
    texts = [" " + job["qs"].rows[0]["answer"], "USER: <image>\nWhat digit is shown? ASSISTANT: 7", " odd"]
    w = model.route(texts, images=images)
    mix, lp, valid = model.token_log_probs(texts, images=images)
    scores = model.score(texts, images=images)
    assert np.isfinite(scores).all() and (scores > 0).all()
    # by hand: each expert's log p of the text tokens after [BOS] (+ image tokens in front or in place)
    bos, img, nit = summary["bos_id"], summary["image_token_id"], summary["num_image_tokens"]
    expected = []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seq = [bos] + (expand_image_tokens(ids, img, nit) if img in ids else [img] * nit + ids)
        seq = np.asarray(seq, np.int32)[None]
        targets = seq[0, 1:] != img
        per = np.stack([modeling.sequence_log_probs(e, seq, lambda r, i=i: modeling.pixels(images[[i]]), 1)[0][targets]
                        for e in job["experts"]])                       # [K, tokens]
        n = targets.sum()
        assert valid[i].sum() == n
        np.testing.assert_allclose(lp[:, i, :n], per, atol=1e-5)
        token_mix = logsumexp(per + np.log(w[i])[:, None], axis=0)    # THEORY S8, fixed weights
        np.testing.assert_allclose(mix[i, :n], token_mix, atol=1e-5)
        expected.append(-token_mix.mean())
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_image_errors_name_the_argument(model, job):
    images, _ = _images(job, [0, 1])
    with pytest.raises(ValueError, match="images: this directory's experts are image-text"):
        model.score(["a", "b"])
    with pytest.raises(ValueError, match="images: one image per text"):
        model.route(["a"], images=images)
    with pytest.raises(ValueError, match="images: expected uint8"):
        model.route(["a", "b"], images=images.astype(np.float32))
    with pytest.raises(ValueError, match="images: expected uint8"):
        model.generate(["a"], images=images[:1, :8])
    with pytest.raises(ValueError, match="placeholders"):
        model.score(["<image> <image> x"], images=images[:1])
    with pytest.raises(ValueError, match="no tokens besides"):
        model.score(["<image>"], images=images[:1])
