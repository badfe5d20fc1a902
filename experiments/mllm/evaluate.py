"""Evaluation of the multimodal job: every system answers the same test questions.

Systems: `stage1` (alignment only), `dense` (stage 2 on all data), and the ensemble of the K
experts under each router: centroid top-1 (the partition function: exact by THEORY S12), centroid
top-k with its temperature fitted on val (softmax over the top-k cosines, S13), the Bayes filter
(S9 for experts of p(answer | image, question): `rho_k` starts at the prior w_k and is updated by
every answer token), and the oracle (the test
image's cluster, i.e. its nearest centroid — it coincides with top-1 here, S12); plus the
random-partition control (Bayes filter over the random experts).

Metrics per system: answer NLL (teacher-forced reference answer incl. EOS, nats / token, and its
perplexity) and greedy answers (`eval.max_new_tokens` tokens, cut at EOS) scored by
`experiments.mllm.metrics`: exact match and VQA accuracy per question type, MME acc / acc+ on the
paired yes/no questions.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from scipy.special import logsumexp
from tqdm import tqdm

from experiments.mllm import modeling
from experiments.mllm.data import load_questions, tokenizer_of
from experiments.mllm.stages import arrays, data_summary, load_stage_model, stage_names
from experiments.mllm.text import decode_answer, encode_answer, encode_prompt, pad_rows
from experiments.rundir import read_json
from experiments.stages import Context


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
    normalized per batch (`pixels`), so memory does not grow with the number of questions.

    Raises:
      ValueError: no rows, or a prompt whose image tokens are not exactly `num_image_tokens`
        (naming the question id): the image features would land on the wrong rows.
    """

    def __init__(self, rows, tokenizer, images_uint8, num_image_tokens: int, image_id: int):
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
        self.images = images_uint8
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
        return modeling.pixels(self.images[self.image[rows]])

    def log_probs(self, model, batch_size: int) -> np.ndarray:
        """`modeling.sequence_log_probs` of the teacher-forced rows, `[n, L-1]`."""
        return modeling.sequence_log_probs(model, self.seqs, self.pixels, batch_size)

    def split_log_probs(self, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(question log-lik [n], answer token log-probs [n, A] (0 where padded))` from `[n, L-1]`."""
        q = (lp * self.question_mask).sum(axis=1)
        a = np.take_along_axis(lp, self.answer_index, axis=1) * self.answer_mask
        return q, a


def _nll(sys_nll: np.ndarray, mask: np.ndarray) -> float:
    return float((sys_nll * mask).sum() / mask.sum())


def _generate(models, qs: QuestionSet, cfg, progress, desc, weights=None, log_prior=None) -> list[str]:
    """Greedy answers of one system for every question (prompts bucketed by length)."""
    preds = [""] * len(qs.rows)
    tok = cfg["tokenizer"]
    if weights is None and log_prior is None:   # one model: weight 1
        weights = np.ones((len(qs.rows), len(models)))
    buckets = defaultdict(list)
    for i, p in enumerate(qs.prompt_len):
        buckets[int(p)].append(i)
    bs = cfg["batch_size"]
    for plen in sorted(buckets):
        idx_all = np.asarray(buckets[plen])
        for s in range(0, len(idx_all), bs):
            idx = idx_all[s:s + bs]
            prompts = np.stack([qs.prompts[i] for i in idx])
            gen = modeling.mixture_generate(
                models, prompts, qs.pixels(idx), cfg["max_new_tokens"],
                weights=None if weights is None else weights[idx],
                log_prior=None if log_prior is None else log_prior[idx])
            for i, g in zip(idx, gen):
                preds[i] = decode_answer(tok, g)
            progress(len(idx))
    return preds


def evaluate(ctx: Context) -> dict:
    """Score every system on the test questions; returns the results dict the report renders."""
    from dfm.decentral import CentroidRouter, Partition
    from experiments.mllm.metrics import score_predictions

    c = ctx.config
    summary, a = data_summary(ctx), arrays(ctx)
    tok = tokenizer_of(ctx.run.root)
    questions = load_questions(ctx.run.root)
    test_rows = select_questions(questions["test"], c.data.max_test)
    val_rows = questions["val"]
    nit, img_id = summary["num_image_tokens"], summary["image_token_id"]
    test = QuestionSet(test_rows, tok, a["images_test"], nit, img_id)
    val = QuestionSet(val_rows, tok, a["images_val"], nit, img_id)
    k = c.partition.num_clusters
    experts = [f"expert-{i}" for i in range(k)]
    randoms = [f"random-{i}" for i in range(k)] if c.partition.random_control else []
    names = ["stage1", "dense"] + experts + randoms
    models = {n: load_stage_model(ctx, n) for n in names}
    bs = c.eval.batch_size

    t0 = time.perf_counter()
    lp_a = {}   # answer-token log-probs [n, A] of every model
    for n in tqdm(names, desc="score", disable=not ctx.progress, leave=False):
        lp_a[n] = test.split_log_probs(test.log_probs(models[n], bs))[1]
    val_ll = np.stack([val.split_log_probs(val.log_probs(models[e], bs))[1].sum(1) for e in experts], axis=1)
    score_s = time.perf_counter() - t0

    feats = np.load(ctx.run.partition / "features.npz")
    assignments = read_json(ctx.run.partition / "assignments.json")
    partition = Partition.load(ctx.run.partition / "partition.npz")
    f_test = feats["test"][test.image]
    top1 = CentroidRouter(partition, temperature=1.0, top_k=1)
    topk = CentroidRouter(partition, temperature=1.0, top_k=c.eval.top_k).fit_temperature(
        feats["val"][val.image], val_ll)
    train_labels = np.asarray(assignments["train"])[a["image"]]
    priors = np.bincount(train_labels, minlength=k) / len(train_labels)
    oracle_w = np.eye(k)[np.asarray(assignments["test"])[test.image]]
    # top-1 keeps one expert with weight exactly 1 (float32 renormalization would leave 1 - 6e-8)
    weights = {"centroid-top1": np.eye(k)[np.asarray(top1.weights(f_test)).argmax(axis=1)]}
    if c.eval.top_k > 1:
        weights[f"centroid-top{c.eval.top_k}"] = np.asarray(topk.weights(f_test), np.float64)
    weights["oracle"] = oracle_w
    # Bayes filter over the answer tokens from the prior w_k (THEORY S9 for experts of
    # p(answer | image, question)): the question tokens are not trained on (LLaVA's loss), so
    # their likelihoods are no evidence, and no expert models the image itself.
    log_prior = np.repeat(np.log(priors)[None], len(test_rows), axis=0)
    stack_a = np.stack([lp_a[e] for e in experts])

    systems = []
    gen_cfg = {"tokenizer": tok, "batch_size": bs, "max_new_tokens": c.eval.max_new_tokens}
    plan = [("stage1", "single", "stage 1 only", [models["stage1"]], None, None),
            ("dense", "dense", "", [models["dense"]], None, None)]
    for rname, w in weights.items():
        plan.append((f"ensemble/{rname}", "ensemble", rname if rname != f"centroid-top{c.eval.top_k}" else
                     f"{rname}, T={topk.temperature:.3g} fitted on val", [models[e] for e in experts], w, None))
    plan.append(("ensemble/bayes", "ensemble", "bayes filter (S9)", [models[e] for e in experts], None, log_prior))
    if randoms:
        rl = np.asarray(assignments["random"])[a["image"]]
        rprior = np.bincount(rl, minlength=k) / len(rl)
        rlog = np.repeat(np.log(rprior)[None], len(test_rows), axis=0)
        plan.append(("random-ensemble/bayes", "random ensemble", "bayes filter (S9)", [models[e] for e in randoms],
                     None, rlog))
    bar = tqdm(total=len(plan) * len(test_rows), desc="generate", disable=not ctx.progress, leave=False)
    preds = {}
    for name, kind, router, ms, w, lprior in plan:
        t1 = time.perf_counter()
        if name == "ensemble/oracle" and np.array_equal(w, weights["centroid-top1"]):
            preds[name] = preds["ensemble/centroid-top1"]   # identical weights (THEORY S12): same answers
            bar.update(len(test_rows))
        else:
            preds[name] = _generate(ms, test, gen_cfg, bar.update, name, weights=w, log_prior=lprior)
        if len(ms) == 1:
            nll_tok = -lp_a[name] if name in lp_a else None
        elif name.startswith("random"):
            nll_tok = modeling.mix_answer_nll(np.stack([lp_a[e] for e in randoms]), None, lprior)
        else:
            nll_tok = modeling.mix_answer_nll(stack_a, w, lprior)
        nll = _nll(nll_tok, test.answer_mask)
        scores = score_predictions(test_rows, {r["id"]: p for r, p in zip(test_rows, preds[name])})
        systems.append({"name": name, "kind": kind, "router": router, "answer_nll": nll,
                        "answer_ppl": float(np.exp(nll)), "scores": scores,
                        "generate_s": time.perf_counter() - t1})
    bar.close()
    return {
        "systems": systems, "num_test_questions": len(test_rows), "num_val_questions": len(val_rows),
        "temperature": float(topk.temperature), "priors": priors.tolist(), "score_s": score_s,
        "weights": {n: w.tolist() for n, w in weights.items()},
        "bayes_weights_after_answer": _posterior(log_prior, stack_a.sum(axis=2).T).tolist(),
        "test_clusters": np.asarray(assignments["test"])[test.image].tolist(),
        "test_rows": [{k2: r[k2] for k2 in ("id", "image", "question", "answer", "question_type", "source")}
                      for r in test_rows],
        "predictions": preds,
        "train_clusters_by_source": _composition(ctx, train_labels),
        "stages": {n: ctx.run.stage_info(n) for n in stage_names(c)},
        "partition": ctx.run.stage_info("partition"), "data": summary,
    }


def _posterior(log_prior: np.ndarray, loglik: np.ndarray) -> np.ndarray:
    """`rho_k ∝ exp(log_prior_k + loglik_k)` per row, `[n, K]`."""
    z = log_prior + loglik
    return np.exp(z - logsumexp(z, axis=1, keepdims=True))


def _composition(ctx: Context, train_labels: np.ndarray) -> dict:
    """`{source: [train conversations per cluster]}` (sources from ``data/train_sources.json``)."""
    path = ctx.run.root / "data" / "train_sources.json"
    if not path.is_file():
        return {}
    k = ctx.config.partition.num_clusters
    out = defaultdict(lambda: [0] * k)
    for src, lab in zip(read_json(path), train_labels):
        out[src][int(lab)] += 1
    return dict(sorted(out.items()))
