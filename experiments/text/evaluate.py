"""Evaluation: every system scored on the same held-out test tokens.

Held-out tokens: the test documents with at least two full chunks (at most `data.max_eval_docs`,
taken in turn from each true cluster in id order; at most `eval.max_scored_per_doc` scored chunks
each). Chunk 0 of each document is CONTEXT ONLY: it is never scored, and it is the only text
the centroid routers see (tf-idf + SVD features of its decoded text -> cosine to the centroids);
the Bayes filter also conditions on it (the experts' likelihoods of it). Chunks 1.. are scored by
every system, so all systems are scored on exactly the same tokens. The oracle router uses the
document's true cluster: the partition's nearest-centroid assignment of the whole document.

Systems: dense; base (stage 1 only); the ensemble of the K experts with the Bayes filter (AR,
THEORY S9), centroid top-1, centroid top-k with the temperature fitted on val documents
(THEORY S12, S13), the learned router (masked, THEORY S10) and the oracle; the random-partition
ensemble (Bayes filter under AR, uniform weights under masked). The AR metric is the exact
negative log-likelihood; the masked metric is the DFM loss, an ELBO: its perplexity is an UPPER
BOUND on the sampler's perplexity (THEORY S5(e)).

S11 terms: dense loss; ``sum_k w_k L_k`` with L_k expert k's loss on the scored tokens of its own
cluster and w_k the share of scored tokens in cluster k (this equals the oracle ensemble's loss);
their difference, the measured ``I(X; K)`` (nats per token).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from experiments import scoring
from experiments.samples import generate
from experiments.stages import (Context, data_summary, load_assignments, load_stage_model, sequences,
                                split, stage_names, tokenizer, train_labels)


@dataclass(frozen=True)
class EvalSet:
    """The evaluation sequences of one split.

    Attributes:
      ids: evaluated document ids ``[D]``; labels: their true clusters ``[D]``.
      x1: ``[n, L]`` all full chunks of those documents, in document then chunk order.
      doc: ``[n]`` index into `ids`; context: ``[n]`` True for chunk 0 (context, not scored).
      features: ``[D, svd_dim]`` features of each document's context chunk text.
      has_features: ``[D]`` False where the context text has no known term (uniform weights).
    """

    ids: list
    labels: np.ndarray
    x1: np.ndarray
    doc: np.ndarray
    context: np.ndarray
    features: np.ndarray
    has_features: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        return ~self.context


def eval_set(ctx: Context, name: str, featurizer, max_docs: int = 0, max_scored: int = 0) -> EvalSet:
    """Documents of split `name` with >= 2 full chunks (at most `max_docs`, 0 = all); per
    document the context chunk and at most `max_scored` scored chunks (0 = all)."""
    s, seqs = split(ctx, name), sequences(ctx, name)
    if max_scored:
        seqs = seqs.select(seqs.chunk <= max_scored)
    counts = np.bincount(seqs.doc, minlength=len(s.ids))
    docs = np.flatnonzero(counts >= 2)
    table = load_assignments(ctx)[name]
    if max_docs:
        docs = _round_robin(docs, np.array([table[s.ids[d]] for d in docs]), max_docs)
    if len(docs) == 0:
        raise RuntimeError(f"evaluate: no {name} document has two full chunks of {ctx.config.data.seq_len} tokens")
    keep = np.isin(seqs.doc, docs)
    remap = {int(d): i for i, d in enumerate(docs)}
    sel = seqs.select(keep)
    doc = np.array([remap[int(d)] for d in sel.doc], dtype=np.int64)
    ids = [s.ids[d] for d in docs]
    tok = tokenizer(ctx)
    context_texts = [tok.decode(sel.tokens[(doc == i) & (sel.chunk == 0)][0].tolist(), skip_special_tokens=True)
                     for i in range(len(docs))]
    features = featurizer.transform(context_texts)
    has = np.linalg.norm(features, axis=1) > 1e-9
    return EvalSet(ids, np.array([table[i] for i in ids], dtype=np.int64), sel.tokens, doc,
                   sel.chunk == 0, features, has)


def _round_robin(docs: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` documents taken in turn from each true cluster (each in id order), sorted."""
    queues = [list(docs[labels == k]) for k in np.unique(labels)]
    out = []
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return np.sort(np.array(out, dtype=docs.dtype))


def centroid_weights(router, es: EvalSet) -> np.ndarray:
    """Per-document weights ``[D, K]`` of a `CentroidRouter` (uniform without features)."""
    k = router.num_experts
    w = np.full((len(es.ids), k), 1.0 / k)
    if es.has_features.any():
        w[es.has_features] = np.asarray(router.weights(es.features[es.has_features]), np.float64)
    return w / w.sum(axis=1, keepdims=True)


def by_cluster(weights_doc: np.ndarray, labels: np.ndarray, k: int) -> list:
    """``[K][K]`` mean router weights of the documents of each true cluster (None: no document)."""
    return [weights_doc[labels == i].mean(axis=0).tolist() if np.any(labels == i) else None for i in range(k)]


def scoring_system(name, kind, router, nll_seq, n_tokens, train_s, eval_s) -> dict:
    """One system entry: loss = sum of per-sequence losses `nll_seq` / `n_tokens` (nats per token),
    perplexity = exp(loss), and the training / evaluation wall times of everything it uses."""
    loss = float(np.sum(nll_seq) / n_tokens)
    return {"name": name, "kind": kind, "router": router, "tokens": int(n_tokens), "loss": loss,
            "perplexity": float(math.exp(loss)), "train_wall_time_s": float(train_s),
            "eval_wall_time_s": float(eval_s)}


def evaluate(ctx: Context) -> dict:
    """Score every system; returns the results dict used by `experiments.report`."""
    from dfm.decentral import CentroidRouter, Partition, TextFeaturizer

    c, run = ctx.config, ctx.run
    summary = data_summary(ctx)
    k, seq_len = c.partition.num_clusters, c.data.seq_len
    featurizer = TextFeaturizer.load(run.partition / "featurizer.pkl")
    partition = Partition.load(run.partition / "partition.npz")
    test = eval_set(ctx, "test", featurizer, c.data.max_eval_docs, c.eval.max_scored_per_doc)
    val = eval_set(ctx, "val", featurizer, 0, c.eval.max_scored_per_doc)
    priors = np.bincount(train_labels(ctx), minlength=k) / len(train_labels(ctx))
    experts = [f"expert-{i}" for i in range(k)]
    randoms = [f"random-{i}" for i in range(k)] if c.partition.random_control else []
    names = ["base", "dense", *experts, *randoms]
    models = {n: load_stage_model(ctx, n) for n in names}
    stage_wall = {n: run.stage_info(n)["wall_time_s"] for n in stage_names(c)}
    train_s = {"base": stage_wall["base"], "dense": stage_wall["base"] + stage_wall["dense"],
               "experts": stage_wall["base"] + sum(stage_wall[e] for e in experts),
               "random": stage_wall["base"] + sum(stage_wall[e] for e in randoms)}
    scored = test.scored
    n_tokens = int(scored.sum()) * seq_len
    doc_of = test.doc
    top1 = CentroidRouter(partition, temperature=1.0, top_k=1)
    topk = CentroidRouter(partition, temperature=1.0, top_k=c.eval.top_k)
    oracle_w = np.eye(k)[test.labels]
    t_eval = time.perf_counter()
    if c.schedule == "ar":
        res = _evaluate_ar(ctx, models, test, val, priors, experts, randoms, topk, top1, oracle_w,
                           n_tokens, train_s)
    else:
        res = _evaluate_masked(ctx, models, test, val, experts, randoms, topk, top1, oracle_w,
                               n_tokens, train_s)
    systems, per_seq, weights_doc, temperature = res
    # S11 terms on the same scored tokens
    dense_nll = per_seq["dense"]  # [n_scored] per-sequence nll sums
    seq_labels = test.labels[doc_of[scored]]
    expert_own = per_seq["own"]
    clusters = []
    for i in range(k):
        m = seq_labels == i
        tok_i = int(m.sum()) * seq_len
        clusters.append({
            "cluster": i, "tokens": tok_i, "documents": int(np.sum(test.labels == i)),
            "expert_loss": float(expert_own[m].sum() / tok_i) if tok_i else None,
            "dense_loss": float(dense_nll[m].sum() / tok_i) if tok_i else None,
        })
        for key in ("expert", "dense"):
            loss = clusters[-1][f"{key}_loss"]
            clusters[-1][f"{key}_perplexity"] = None if loss is None else float(math.exp(loss))
    w = np.array([cl["tokens"] for cl in clusters], np.float64) / n_tokens
    dense_loss = float(dense_nll.sum() / n_tokens)
    weighted = float(sum(wi * cl["expert_loss"] for wi, cl in zip(w, clusters) if cl["tokens"]))
    s11 = {"dense_loss": dense_loss, "cluster_weights": w.tolist(), "weighted_expert_loss": weighted,
           "mutual_information": dense_loss - weighted,
           "note": "nats per scored token; w_k = share of scored tokens in cluster k; "
                   "weighted_expert_loss equals the oracle ensemble's loss"}
    samples = generate(ctx, models, experts, priors)
    return {
        "schedule": c.schedule,
        "metric": "nll" if c.schedule == "ar" else "dfm_elbo",
        "perplexity_is_upper_bound": c.schedule == "masked",
        "eval": {"documents": len(test.ids), "scored_sequences": int(scored.sum()),
                 "context_sequences": int(test.context.sum()), "scored_tokens": n_tokens,
                 "documents_without_context_features": int((~test.has_features).sum()),
                 "val_documents": len(val.ids), "priors": priors.tolist(),
                 "centroid_topk_temperature": temperature, "top_k": c.eval.top_k,
                 "wall_time_s": time.perf_counter() - t_eval},
        "systems": systems,
        "clusters": clusters,
        "s11": s11,
        "router_weights_by_true_cluster": {name: by_cluster(wd, test.labels, k) for name, wd in weights_doc.items()},
        "samples": samples,
        "masked_context_use": per_seq.get("context_use"),
        "data": summary,
    }


def _evaluate_ar(ctx, models, test, val, priors, experts, randoms, topk, top1, oracle_w, n_tokens, train_s):
    c = ctx.config
    bos, bs = data_summary(ctx)["bos_id"], c.eval.batch_size
    bar = tqdm(total=len(models) + len(experts), desc="evaluate", disable=not ctx.progress, leave=False)
    lp, secs = scoring.ar_log_probs(models, test.x1, bos, bs, progress=bar.update)
    lp_val, _ = scoring.ar_log_probs({e: models[e] for e in experts}, val.x1, bos, bs, progress=bar.update)
    bar.close()
    # temperature of the top-k router: maximize the per-token mixture likelihood on val scored tokens
    vs = val.scored
    reps = np.repeat(np.arange(int(vs.sum())), c.data.seq_len)
    val_doc_rows = val.doc[vs]
    ll = np.stack([lp_val[e][vs].reshape(-1) for e in experts], axis=1)  # [N_tok, K]
    feats = val.features[val_doc_rows][reps]
    ok = val.has_features[val_doc_rows][reps]
    topk = topk.fit_temperature(feats[ok], ll[ok])
    scored = test.scored
    doc = test.doc[scored]
    lp_e = np.stack([lp[e] for e in experts])  # [K, n, L]
    nll, weights_doc, systems = {}, {}, []
    own = -lp_e[test.labels[doc], np.flatnonzero(scored)].sum(axis=1)  # each sequence, its cluster's expert
    t0 = time.perf_counter()
    for name, router in (("centroid-top1", top1), (f"centroid-top{c.eval.top_k}", topk), ("oracle", None)):
        wd = oracle_w if router is None else centroid_weights(router, test)
        weights_doc[name] = wd
        nll[name] = -scoring.mix_token_log_probs(lp_e[:, scored], wd[doc]).sum(axis=1)
    mix_s = (time.perf_counter() - t0) / 3

    def bayes(names, prior):
        stack = np.stack([lp[e] for e in names])
        out = np.zeros(int(scored.sum()))
        wdoc = np.zeros((len(test.ids), len(names)))
        row_index = np.flatnonzero(scored)
        pos = {r: i for i, r in enumerate(row_index)}
        for d in range(len(test.ids)):
            rows = np.flatnonzero(test.doc == d)  # context first (chunk order)
            mix, rho = scoring.bayes_filter_doc(stack[:, rows].reshape(len(names), -1), prior)
            mix = mix.reshape(len(rows), -1)
            for j, r in enumerate(rows):
                if scored[r]:
                    out[pos[r]] = -mix[j].sum()
            wdoc[d] = rho[c.data.seq_len:].mean(axis=0)
        return out, wdoc

    t0 = time.perf_counter()
    nll["bayes"], weights_doc["bayes"] = bayes(experts, priors)
    bayes_s = time.perf_counter() - t0
    expert_s = sum(secs[e] for e in experts)
    systems.append(scoring_system("dense", "dense", None, -lp["dense"][scored].sum(axis=1), n_tokens,
                                  train_s["dense"], secs["dense"]))
    systems.append(scoring_system("base", "base", None, -lp["base"][scored].sum(axis=1), n_tokens,
                                  train_s["base"], secs["base"]))
    systems.append(scoring_system("ensemble/bayes", "ensemble", "bayes filter (S9)", nll["bayes"], n_tokens,
                                  train_s["experts"], expert_s + bayes_s))
    systems.append(scoring_system("ensemble/centroid-top1", "ensemble", "centroid top-1", nll["centroid-top1"],
                                  n_tokens, train_s["experts"], expert_s + mix_s))
    systems.append(scoring_system(f"ensemble/centroid-top{c.eval.top_k}", "ensemble",
                                  f"centroid top-{c.eval.top_k}, T={topk.temperature:.4g} fitted on val",
                                  nll[f"centroid-top{c.eval.top_k}"], n_tokens, train_s["experts"], expert_s + mix_s))
    systems.append(scoring_system("ensemble/oracle", "ensemble", "oracle (true cluster)", nll["oracle"], n_tokens,
                                  train_s["experts"], expert_s + mix_s))
    if randoms:
        rprior = np.bincount(train_labels(ctx, random=True), minlength=len(randoms)).astype(np.float64)
        t0 = time.perf_counter()
        nll_r, weights_doc["random-bayes"] = bayes(randoms, rprior / rprior.sum())
        systems.append(scoring_system("random-ensemble/bayes", "random ensemble", "bayes filter (S9)", nll_r,
                                      n_tokens, train_s["random"],
                                      sum(secs[e] for e in randoms) + time.perf_counter() - t0))
    per_seq = {"dense": -lp["dense"][scored].sum(axis=1), "own": own}
    return systems, per_seq, weights_doc, float(topk.temperature)


def _evaluate_masked(ctx, models, test, val, experts, randoms, topk, top1, oracle_w, n_tokens, train_s):
    from experiments.modeling import kappa_schedule

    c = ctx.config
    vocab, bs = data_summary(ctx)["vocab_size"], c.eval.batch_size
    schedule = kappa_schedule(c)
    draws = dict(num_draws=c.masked.elbo_samples, seed=c.eval.seed, batch_size=bs)
    # temperature: per val document, log-likelihood proxy = -(DFM loss) of its scored chunks
    vs = val.scored
    n_val_batches = -(-int(vs.sum()) // bs) * c.masked.elbo_samples
    scored = test.scored
    n_test_batches = -(-int(scored.sum()) // bs) * c.masked.elbo_samples
    bar = tqdm(total=n_val_batches + n_test_batches, desc="evaluate", disable=not ctx.progress, leave=False)
    elbo_val, _, _ = scoring.masked_elbo({e: models[e] for e in experts}, val.x1[vs], schedule, vocab,
                                            ensembles={}, progress=bar.update, **draws)
    ll = np.zeros((len(val.ids), len(experts)))
    for j, e in enumerate(experts):
        np.add.at(ll[:, j], val.doc[vs], -elbo_val[e])
    topk = topk.fit_temperature(val.features[val.has_features], ll[val.has_features])
    doc = test.doc[scored]
    router = load_stage_model(ctx, "router")
    from flax import nnx

    router_weights = nnx.jit(lambda r, x_t, t: r.weights(x_t, t))
    ensembles = {
        "centroid-top1": (experts, centroid_weights(top1, test)[doc]),
        f"centroid-top{c.eval.top_k}": (experts, centroid_weights(topk, test)[doc]),
        "oracle": (experts, oracle_w[doc]),
        "learned": (experts, lambda x_t, t: router_weights(router, x_t, t)),
    }
    if randoms:
        ensembles["random-uniform"] = (randoms, np.full((len(doc), len(randoms)), 1.0 / len(randoms)))
    elbo, secs, mean_w = scoring.masked_elbo(models, test.x1[scored], schedule, vocab, ensembles=ensembles,
                                                progress=bar.update, **draws)
    bar.close()
    own = np.stack([elbo[e] for e in experts])[test.labels[doc], np.arange(len(doc))]
    expert_s = sum(secs[e] for e in experts)
    systems = [scoring_system("dense", "dense", None, elbo["dense"], n_tokens, train_s["dense"], secs["dense"]),
               scoring_system("base", "base", None, elbo["base"], n_tokens, train_s["base"], secs["base"])]
    labels = {"centroid-top1": "centroid top-1",
              f"centroid-top{c.eval.top_k}": f"centroid top-{c.eval.top_k}, T={topk.temperature:.4g} fitted on val",
              "oracle": "oracle (true cluster)", "learned": "learned router (S10)"}
    for name in ("learned", "centroid-top1", f"centroid-top{c.eval.top_k}", "oracle"):
        extra = train_s["experts"] + (ctx.run.stage_info("router")["wall_time_s"] if name == "learned" else 0.0)
        systems.append(scoring_system(f"ensemble/{name}", "ensemble", labels[name], elbo[name], n_tokens,
                                      extra, expert_s + secs[name]))
    if randoms:
        systems.append(scoring_system("random-ensemble/uniform", "random ensemble", "uniform", elbo["random-uniform"],
                                      n_tokens, train_s["random"], sum(secs[e] for e in randoms) + secs["random-uniform"]))
    weights_doc = {}
    for name in ("learned", "centroid-top1", f"centroid-top{c.eval.top_k}", "oracle"):
        wd = np.zeros((len(test.ids), len(experts)))
        np.add.at(wd, doc, mean_w[name])
        weights_doc[name] = wd / np.bincount(doc, minlength=len(test.ids))[:, None]
    per_seq = {"dense": elbo["dense"], "own": own,
               "context_use": context_use(models["dense"], test.x1[scored], vocab, c.eval.seed, bs)}
    return systems, per_seq, weights_doc, float(topk.temperature)


def context_use(denoiser, x1: np.ndarray, mask_id: int, seed: int, batch_size: int) -> dict:
    """Does the denoiser use context? Its mean cross-entropy (nats) on masked positions when all
    positions are masked (= what a unigram model can do) and when 10% / 50% are masked."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, frac in (("all_masked", 1.0), ("half_masked", 0.5), ("tenth_masked", 0.1)):
        total, count = 0.0, 0
        for start in range(0, len(x1), batch_size):
            x = jnp.asarray(x1[start:start + batch_size])
            key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
            masked = jax.random.uniform(key, x.shape) < frac
            logp = jax.nn.log_softmax(scoring.forward(denoiser, jnp.where(masked, mask_id, x)), axis=-1)
            nll = -jnp.take_along_axis(logp, x[..., None], axis=-1)[..., 0]
            total += float(jnp.sum(jnp.where(masked, nll, 0.0)))
            count += int(jnp.sum(masked))
        out[name] = total / max(count, 1)
    return out

