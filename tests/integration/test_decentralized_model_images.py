"""`dfm.DecentralizedModel` on the tiny multimodal job's export (`<run>/decentralized`, LLaVA-style
experts): route / score / generate with images check against the job's report and against
independent references: plain full forward passes of the experts (no KV cache) mixed in NumPy."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from experiments.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GEN_QUESTIONS = [0, 1]   # two prompt lengths (34 and 29 tokens in the tiny run): one KV-cache length


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm-images") / "run"
    assert main(["run", "--config", "mllm-tiny", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def job(run_dir):
    """The job's run directory, data, report, test questions (as its evaluation lays them out), experts
    and a loader of each stage's model."""
    from experiments.engine.pipeline import open_run
    from experiments.engine.training import load_stage_model
    from experiments.mllm.evaluate import QuestionSet, select_questions
    from experiments.registry import load_job

    task, config = load_job("mllm-tiny")
    run = open_run(config, run_dir)
    data = task.prepare_data(config, run, log=lambda *a: None)

    def stage_model(stage):
        return load_stage_model(run, stage, lambda: task.new_model(config, data))

    rep = json.loads((run_dir / "report.json").read_text())
    rows = select_questions(data.questions["test"], config.data.max_test)
    assert [r["id"] for r in rows] == [r["id"] for r in rep["test_rows"]]
    qs = QuestionSet(rows, data.tokenizer, data.arrays["images_test"], data.summary["num_image_tokens"],
                     data.image_token_id)
    experts = [stage_model(f"expert-{k}") for k in range(2)]
    return {"run": run, "model": stage_model, "data": data, "rep": rep, "qs": qs, "experts": experts}


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
    run = job["run"]
    stage1 = job["model"]("stage1")
    feats = modeling.image_features(stage1, images, 8)
    np.testing.assert_allclose(model.image_features(images), feats, atol=1e-5)
    np.testing.assert_allclose(feats, np.load(run.partition / "features.npz")["test"][job["qs"].image], atol=1e-5)
    router = CentroidRouter(Partition.load(run.partition / "partition.npz"),
                            temperature=job["rep"]["temperature"], top_k=2)
    np.testing.assert_allclose(w, np.asarray(router.route(feats), np.float64), atol=1e-6)
    # top-1 (an override at load) is the partition function: the report's centroid-top1 / test clusters
    from dfm import DecentralizedModel

    top1 = DecentralizedModel(model.checkpoint, model.tokenizer, model.available, top_k=1).route(texts, images=images)
    np.testing.assert_array_equal(top1, np.asarray(job["rep"]["weights"]["centroid-top1"]))
    np.testing.assert_array_equal(top1.argmax(axis=1), job["rep"]["test_clusters"])


def _numpy_greedy(experts, prompt, px, steps, log_w, update):
    """Greedy decoding of the mixture from full forward passes: at each step
    `argmax_y sum_k w_k p_k(y | prompt, generated, image)`; with `update` the weights are the Bayes
    posterior `w_k ∝ prior_k prod p_k(generated tokens)` (THEORY S9)."""
    seq, out = list(prompt), []
    for _ in range(steps):
        logp = np.stack([np.asarray(jax.nn.log_softmax(e(jnp.asarray([seq], jnp.int32), px)[0, -1]), np.float64)
                         for e in experts])                                   # [K, vocab]
        w = np.exp(log_w - logsumexp(log_w))
        y = int(np.argmax(logsumexp(logp + np.log(np.maximum(w, 1e-300))[:, None], axis=0)))
        if update:
            log_w = log_w + logp[:, y]
        seq.append(y)
        out.append(y)
    return out


def test_generate_greedy_is_the_numpy_mixture_argmax_and_the_jobs_answers(model, job):
    from dfm import DecentralizedModel
    from dfm.decentral import BayesFilterRouter

    qs, tok, rep = job["qs"], job["data"].tokenizer, job["rep"]
    summary = job["data"].summary
    images, idx = _images(job, GEN_QUESTIONS)
    questions = [qs.rows[i]["question"] for i in idx]
    assert all(q.startswith("<image>\n") for q in questions)
    got = model.generate(questions, images=images, max_new_tokens=3)
    # without the placeholder the prompt gets "<image>\n" in front: the same prompt ids
    bare = [q[len("<image>\n"):] for q in questions]
    assert model.generate(bare, images=images, max_new_tokens=3) == got
    assert got == [rep["predictions"]["ensemble/centroid-top2"][i] for i in idx]
    w = model.route(questions, images=images)
    bayes = dataclasses.replace(model.checkpoint, router=BayesFilterRouter.from_priors(model.checkpoint.priors))
    bm = DecentralizedModel(bayes, model.tokenizer, model.available)
    np.testing.assert_allclose(bm.route(questions, images=images), np.tile(model.checkpoint.priors, (len(idx), 1)))
    by_bayes = bm.generate(bare, images=images, max_new_tokens=3)
    assert by_bayes == [rep["predictions"]["ensemble/bayes"][i] for i in idx]
    img, bos, nit = summary["image_token_id"], summary["bos_id"], summary["num_image_tokens"]
    for j, i in enumerate(idx):    # the prompt written out by hand: BOS USER: <image> x nit \n question ASSISTANT:
        before, after = "USER: ", questions[j][len("<image>"):].strip()
        prompt = ([bos] + tok(before, add_special_tokens=False)["input_ids"] + [img] * nit
                  + tok("\n" + after + " ASSISTANT:", add_special_tokens=False)["input_ids"])
        assert prompt == qs.prompts[i].tolist()
        px = jnp.asarray(model.pixels(images[j:j + 1]))
        for answer, log_w, update in ((got[j], np.log(np.maximum(w[j], 1e-300)), False),
                                      (by_bayes[j], np.log(model.checkpoint.priors), True)):
            ids = _numpy_greedy(job["experts"], prompt, px, 3, log_w, update)
            if tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id)]
            assert answer == tok.decode(ids, skip_special_tokens=True).strip()
    # sampling is reproducible by seed
    hot = model.generate(bare[:1], images=images[:1], max_new_tokens=3, temperature=1.0, seed=5)
    assert hot == model.generate(bare[:1], images=images[:1], max_new_tokens=3, temperature=1.0, seed=5)


def test_score_is_the_mixture_of_the_experts_token_log_probs(model, job):
    tok, summary = job["data"].tokenizer, job["data"].summary
    images, _ = _images(job, [0, 1, 2])
    texts = [" " + job["qs"].rows[0]["answer"], "USER: <image>\nWhat digit is shown? ASSISTANT: 7", " odd"]
    w = model.route(texts, images=images)
    mix, lp, valid = model.token_log_probs(texts, images=images)
    scores = model.score(texts, images=images)
    assert np.isfinite(scores).all() and (scores > 0).all()
    # by hand: each expert's log p of the text tokens after [BOS] (+ image tokens in front or in place),
    # from one plain forward pass of the whole sequence
    bos, img, nit = summary["bos_id"], summary["image_token_id"], summary["num_image_tokens"]
    expected = []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seq = [bos] + ([u for t in ids for u in ([img] * nit if t == img else [t])] if img in ids
                       else [img] * nit + ids)
        seq = np.asarray(seq, np.int32)[None]
        targets = seq[0, 1:] != img
        px = jnp.asarray(model.pixels(images[i:i + 1]))
        per = []
        for e in job["experts"]:
            logp = np.asarray(jax.nn.log_softmax(e(jnp.asarray(seq[:, :-1]), px)[0], axis=-1), np.float64)
            per.append(logp[np.arange(seq.shape[1] - 1), seq[0, 1:]][targets])
        per = np.stack(per)                                                  # [K, tokens]
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
    with pytest.raises(ValueError, match=r"^texts\[0\]: has 2 '<image>' placeholders \(one image per entry\)$"):
        model.score(["<image> <image> x"], images=images[:1])
    with pytest.raises(ValueError, match=r"^texts\[0\]: has no tokens besides '<image>'$"):
        model.score(["<image>"], images=images[:1])
    with pytest.raises(ValueError, match=r"^prompts\[1\]: has 2 '<image>' placeholders"):
        model.generate(["a", "<image> <image> b"], images=images)
