"""Evaluation of the multimodal job: every system answers the same test questions.

Systems: `stage1` (alignment only), `dense` (stage 2 on all data), and the ensemble of the K
experts under each router: centroid top-1 (the partition function: exact by THEORY S12), centroid
top-k with its temperature fitted on val (softmax over the top-k cosines, S13), the Bayes filter
(S9 for experts of p(answer | image, question): `rho_k` starts at the prior w_k and is updated by
every answer token), and the oracle (the test image's cluster, i.e. its nearest centroid — it
coincides with top-1 here, S12); plus the random-partition control (Bayes filter over the random
experts). Inference is the library's, shared with `dfm.DecentralizedModel`: prompts laid out by
`dfm.prompts`, greedy decoding by `dfm.decentral.mixture_generate`, teacher-forced log-probs by
`dfm.inference.token_log_probs` mixed with `dfm.decentral.mixture_token_log_probs`.

Metrics per system: answer NLL (teacher-forced reference answer incl. EOS, nats / token, and its
perplexity) and greedy answers (`eval.max_new_tokens` tokens, cut at EOS) scored by
`experiments.mllm.metrics`: exact match and VQA accuracy per question type, MME acc / acc+ on the
paired yes/no questions, and every question's own exact match and VQA accuracy
(``question_scores``, from which the report's intervals are computed: `experiments.mllm.report`).

Cost: greedy decoding dominates; it grows linearly with the test questions (`data.max_test`), one
decoding per system (the oracle reuses top-1's answers when their weights coincide).
"""
from __future__ import annotations

import time
from collections import defaultdict

import jax.numpy as jnp
import numpy as np

from dfm.decentral import (
    BayesFilterRouter,
    CentroidRouter,
    FixedRouter,
    Partition,
    fit_centroid_router,
    mixture_generate,
    mixture_token_log_probs,
)
from dfm.inference import token_log_probs
from dfm.progress import progress_bar
from dfm.prompts import decode_answer, encode_answer, encode_prompt, pad_rows
from experiments.engine.graph import available_experts, expert_names, load_assignments
from experiments.engine.rundir import RunDir, load_file, load_npz
from experiments.engine.training import load_stage_model
from experiments.mllm import modeling
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.mllm.data import MultimodalData
from experiments.mllm.metrics import question_scores, score_predictions
from experiments.mllm.scorers import score_by_metric


def select_questions(rows: list[dict], limit: int) -> list[dict]:
    """At most about `limit` rows (0 = all), taken in turn from each question type; the two
    questions of an MME pair are kept together (so the count may exceed `limit` by one)."""
    if not limit or limit >= len(rows):
        return rows
    units = defaultdict(dict)   # question type -> {pair id or row id: [rows]} (insertion ordered)
    for r in rows:
        key = r["pair_id"] if r.get("pair_id") is not None else r["id"]
        units[r["question_type"]].setdefault(key, []).append(r)
    queues = {t: list(u.values()) for t, u in sorted(units.items())}
    out, i = [], 0
    while len(out) < limit and any(i < len(q) for q in queues.values()):
        for q in queues.values():
            if i < len(q) and len(out) < limit:
                out += q[i]
        i += 1
    return out


class QuestionSet:
    """Token layout of one split's questions: prompts, answers and the teacher-forced sequences.

    Images stay uint8 (`images [n_images, S, S, 3]`, `image [n]` index per question) and are
    normalized per batch (`pixels`, with the run's `stats` = (mean, std); default CLIP's), so memory
    does not grow with the number of questions.

    Raises:
      ValueError: no rows, or a prompt whose image tokens are not exactly `num_image_tokens`
        (naming the question id): the image features would land on the wrong rows.
    """

    def __init__(self, rows, tokenizer, images_uint8, num_image_tokens: int, image_id: int, stats=None):
        if not rows:
            raise ValueError("rows: no questions to evaluate")
        self.rows = rows
        self.prompts = [encode_prompt(tokenizer, r["question"], num_image_tokens) for r in rows]
        for r, p in zip(rows, self.prompts):
            if int((p == image_id).sum()) != num_image_tokens:
                raise ValueError(f"question {r['id']!r}: its prompt has {int((p == image_id).sum())} image tokens, "
                                 f"expected {num_image_tokens} (one <image> in the first turn)")
        self.answers = [encode_answer(tokenizer, r["answer"]) for r in rows]
        self.prompt_len = np.asarray([len(p) for p in self.prompts])
        self.answer_len = np.asarray([len(a) for a in self.answers])
        length = int((self.prompt_len + self.answer_len).max())
        self.seqs = pad_rows([np.concatenate([p, a]) for p, a in zip(self.prompts, self.answers)], length,
                             tokenizer.pad_token_id)
        self.images, self.stats = images_uint8, stats
        self.image = np.asarray([r["image"] for r in rows], np.int64)
        # targets j+1 of the teacher-forced rows: question text (not BOS, not image tokens) / answer
        tgt = self.seqs[:, 1:]
        pos = np.arange(tgt.shape[1])[None]
        self.question_mask = (pos < self.prompt_len[:, None] - 1) & (tgt != image_id)
        self.answer_index = self.prompt_len[:, None] - 1 + np.arange(self.answer_len.max())[None]
        self.answer_mask = np.arange(self.answer_len.max())[None] < self.answer_len[:, None]
        self.answer_index = np.minimum(self.answer_index, tgt.shape[1] - 1)

    def pixels(self, rows: np.ndarray) -> np.ndarray:
        """Normalized pixels `[len(rows), S, S, 3]` of the questions `rows`."""
        return modeling.pixels(self.images[self.image[rows]], self.stats)

    def log_probs(self, model, batch_size: int) -> np.ndarray:
        """`dfm.inference.token_log_probs` of the teacher-forced rows given their images, `[n, L-1]`."""
        return token_log_probs(model, self.seqs, pixels=self.pixels, batch_size=batch_size)

    def split_log_probs(self, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(question log-lik [n], answer token log-probs [n, A] (0 where padded))` from `[n, L-1]`."""
        q = (lp * self.question_mask).sum(axis=1)
        a = np.take_along_axis(lp, self.answer_index, axis=1) * self.answer_mask
        return q, a


def _nll(sys_nll: np.ndarray, mask: np.ndarray) -> float:
    return float((sys_nll * mask).sum() / mask.sum())


def _generate(models, qs: QuestionSet, router_for, batch_size: int, max_new_tokens: int, tokenizer,
              progress) -> list[str]:
    """Greedy answers of one system for every question; `router_for(rows)` is the `Router` of the
    question rows `rows`. Prompts are bucketed by length; every batch is padded to `batch_size`
    rows (repeating its last row) and every KV cache has the same length, so decoding compiles
    once per system kind, not once per prompt length."""
    preds = [""] * len(qs.rows)
    buckets = defaultdict(list)
    for i, p in enumerate(qs.prompt_len):
        buckets[int(p)].append(i)
    cache_length = int(qs.prompt_len.max()) + max_new_tokens
    for plen in sorted(buckets):
        idx_all = np.asarray(buckets[plen])
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            rows = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
            prompts = np.stack([qs.prompts[i] for i in rows])
            gen = mixture_generate(models, prompts, max_new_tokens, router_for(rows), pixels=qs.pixels(rows),
                                   cache_length=cache_length)
            for i, g in zip(idx, gen):
                preds[i] = decode_answer(tokenizer, g)
            progress(len(idx))
    return preds


def _answer_nll(lp_answer: np.ndarray, router, answer_mask: np.ndarray):
    """Teacher-forced mixture NLL of the reference answers ``[n, A]`` (THEORY S8 / S9) and the
    router state after the answer (`dfm.decentral.mixture_token_log_probs`)."""
    scores = mixture_token_log_probs(router, jnp.asarray(lp_answer, jnp.float32), valid=answer_mask)
    return -np.asarray(scores.log_probs, np.float64), scores.final_state


def evaluate(config: MultimodalExperimentConfig, run: RunDir, data: MultimodalData, stages: list[str], *,
             skip_experts: tuple[int, ...] = (), progress: bool = True) -> dict:
    """Score every system on the test questions; returns the results dict the report renders.

    Args:
      stages: the run's training stages (`experiments.engine.graph.training_stages`), whose
        markers the results carry.
      skip_experts: experts left out: the ensembles route among the others, the oracle is dropped.
    """
    c, a, tok = config, data.arrays, data.tokenizer
    test_rows = select_questions(data.questions["test"], c.data.max_test)
    val_rows = data.questions["val"]
    nit, img_id = data.summary["num_image_tokens"], data.image_token_id
    test = QuestionSet(test_rows, tok, a["images_test"], nit, img_id, data.pixel_stats)
    val = QuestionSet(val_rows, tok, a["images_val"], nit, img_id, data.pixel_stats)
    k = c.partition.num_clusters
    avail = np.flatnonzero(available_experts(c, skip_experts))
    experts, randoms = [expert_names(c)[i] for i in avail], expert_names(c, random=True)
    names = ["stage1", "dense"] + experts + randoms
    models = {n: load_stage_model(run, n, lambda: modeling.run_model(c, data.vocab_size, data.image_token_id))
              for n in names}
    bs = c.eval.batch_size

    t0 = time.perf_counter()
    lp_a = {}   # answer-token log-probs [n, A] of every model
    bar = progress_bar(len(names), desc="score", disable=not progress)
    for n in names:
        lp_a[n] = test.split_log_probs(test.log_probs(models[n], bs))[1]
        bar.update(1)
    bar.close()
    val_ll = np.stack([val.split_log_probs(val.log_probs(models[e], bs))[1].sum(1) for e in experts], axis=1)
    score_s = time.perf_counter() - t0

    feats = load_npz(run.partition / "features.npz")
    assignments = load_assignments(run, k)
    partition = load_file(run.partition / "partition.npz", Partition.load, "partition")
    routed = partition if len(avail) == k else partition.subset(avail)   # lost experts: route among the rest
    f_test = feats["test"][test.image]
    top1 = CentroidRouter(routed, temperature=1.0, top_k=1)
    topk = fit_centroid_router(CentroidRouter(routed, temperature=1.0, top_k=min(c.eval.top_k, len(avail))),
                               feats["val"][val.image], val_ll)
    priors = assignments.priors(k)[avail]
    test_clusters = assignments.units["test"][test.image]
    # top-1 keeps one expert with weight exactly 1 (float32 renormalization would leave 1 - 6e-8)
    weights = {"centroid-top1": np.eye(len(avail))[np.asarray(top1.route(f_test)).argmax(axis=1)]}
    if c.eval.top_k > 1:
        weights[f"centroid-top{c.eval.top_k}"] = np.asarray(topk.route(f_test), np.float64)
    if len(avail) == k:                     # the oracle needs every cluster's expert
        weights["oracle"] = np.eye(k)[test_clusters]

    def fixed(w):
        return lambda rows: FixedRouter(jnp.asarray(w[rows], jnp.float32))

    # Bayes filter over the answer tokens from the prior w_k (THEORY S9 for experts of
    # p(answer | image, question)): the question tokens are not trained on (LLaVA's loss), so
    # their likelihoods are no evidence, and no expert models the image itself.
    bayes = BayesFilterRouter.from_priors(priors)
    plan = [("stage1", "single", "stage 1 only", ["stage1"], fixed(np.ones((len(test_rows), 1)))),
            ("dense", "dense", "", ["dense"], fixed(np.ones((len(test_rows), 1))))]
    for rname, w in weights.items():
        label = f"{rname}, T={topk.temperature:.3g} fitted on val" if rname == f"centroid-top{c.eval.top_k}" else rname
        plan.append((f"ensemble/{rname}", "ensemble", label, experts, fixed(w)))
    plan.append(("ensemble/bayes", "ensemble", "bayes filter (S9)", experts, lambda rows: bayes))
    if randoms:
        random_bayes = BayesFilterRouter.from_priors(assignments.priors(k, random=True))
        plan.append(("random-ensemble/bayes", "random ensemble", "bayes filter (S9)", randoms,
                     lambda rows: random_bayes))
    bar = progress_bar(len(plan) * len(test_rows), desc="generate", disable=not progress)
    preds, per_question, systems, final_states = {}, {}, [], {}
    all_rows = np.arange(len(test_rows))
    for name, kind, router, members, router_for in plan:
        t1 = time.perf_counter()
        ms = [models[m] for m in members]
        if name == "ensemble/oracle" and np.array_equal(weights.get("oracle"), weights["centroid-top1"]):
            preds[name] = preds["ensemble/centroid-top1"]   # identical weights (THEORY S12): same answers
            bar.update(len(test_rows))
        else:
            preds[name] = _generate(ms, test, router_for, bs, c.eval.max_new_tokens, tok, bar.update)
        nll_tok, final_states[name] = _answer_nll(np.stack([lp_a[m] for m in members]), router_for(all_rows),
                                                  test.answer_mask)
        nll = _nll(nll_tok, test.answer_mask)
        pred_by_id = {r["id"]: p for r, p in zip(test_rows, preds[name])}
        scores = score_predictions(test_rows, pred_by_id)
        per_question[name] = question_scores(test_rows, pred_by_id)
        if any(r.get("task") is not None or r.get("metric") is not None for r in test_rows):
            scores["by_task"] = score_by_metric(test_rows, pred_by_id, default="vqa")   # per-record scorers
        systems.append({"name": name, "kind": kind, "router": router, "answer_nll": nll,
                        "answer_ppl": float(np.exp(nll)), "scores": scores,
                        "generate_s": time.perf_counter() - t1})
    bar.close()
    return {
        "systems": systems, "num_test_questions": len(test_rows), "num_val_questions": len(val_rows),
        "skipped_experts": list(skip_experts),
        "temperature": float(topk.temperature), "priors": priors.tolist(), "score_s": score_s,
        "weights": {n: w.tolist() for n, w in weights.items()},
        "bayes_weights_after_answer": np.asarray(bayes.weights(final_states["ensemble/bayes"]), np.float64).tolist(),
        "test_clusters": test_clusters.tolist(),
        "test_rows": [{k2: r.get(k2) for k2 in ("id", "image", "question", "answer", "answers", "question_type",
                                                "pair_id", "source")} for r in test_rows],
        "predictions": preds, "question_scores": per_question,
        "train_clusters_by_source": _composition(data.train_sources, assignments.examples(), k),
        "stages": {n: run.stage_info(n) for n in stages},
        "partition": run.stage_info("partition"), "data": data.summary,
    }


def _composition(sources: list, train_labels: np.ndarray, k: int) -> dict:
    """`{source: [train conversations per cluster]}` (sources from ``data/train_sources.json``)."""
    out = defaultdict(lambda: [0] * k)
    for src, lab in zip(sources, train_labels):
        out[src][int(lab)] += 1
    return dict(sorted(out.items()))
