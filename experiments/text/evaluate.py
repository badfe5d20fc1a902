"""Evaluation: every system scored on the same held-out test tokens.

Held-out tokens: the test documents with at least two full chunks (at most `data.max_eval_docs`,
taken in turn from each true cluster in id order; at most `eval.max_scored_per_doc` scored chunks
each). Chunk 0 of each document is CONTEXT ONLY: it is never scored, and it is the only text
the centroid routers see (tf-idf + SVD features of its decoded text -> cosine to the centroids);
the Bayes filter also conditions on it (the experts' likelihoods of it): it runs over the
document's tokens in order, its context chunk first, then the scored chunks. Each chunk is an
independent model input (no state crosses chunk boundaries), so this is the exact posterior of
the model "pick k, then draw the document's chunks from expert k". Chunks 1.. are scored by
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
their difference, the dense - oracle gap (nats per token; it estimates I(X; K) only when every
model is well trained), and next to it the plug-in upper bound I(X; K) <= H(K) of the partition. Every mixture is computed by `dfm.decentral`
(`mixture_token_log_probs` for AR, `mix_log_probs` for the masked ELBO).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.decentral import (
    BayesFilterRouter,
    CallableRouter,
    CentroidRouter,
    FixedRouter,
    Partition,
    TextFeaturizer,
    fit_centroid_router,
    mixture_token_log_probs,
)
from dfm.progress import progress_bar
from experiments.engine.graph import Assignments, available_experts, expert_names, load_assignments
from experiments.engine.intervals import partition_entropy
from experiments.engine.rundir import RunDir, load_file
from experiments.engine.training import load_stage_model
from experiments.text import scoring
from experiments.text.config import ExperimentConfig
from experiments.text.data import TextData
from experiments.text.export import featurizer_path
from experiments.text.modeling import kappa_schedule, new_model, router_factory
from experiments.text.samples import generate


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


def eval_set(data: TextData, assignments: Assignments, name: str, featurizer, seq_len: int, max_docs: int = 0,
             max_scored: int = 0) -> EvalSet:
    """Documents of split `name` with >= 2 full chunks (at most `max_docs`, 0 = all); per
    document the context chunk and at most `max_scored` scored chunks (0 = all).

    Raises:
      RuntimeError: no document of the split has two full chunks.
    """
    s, seqs = data.splits[name], data.sequences[name]
    if max_scored:
        seqs = seqs.select(seqs.chunk <= max_scored)
    counts = np.bincount(seqs.doc, minlength=len(s.ids))
    docs = np.flatnonzero(counts >= 2)
    table = assignments.units[name]
    if max_docs:
        docs = _round_robin(docs, table[docs], max_docs)
    if len(docs) == 0:
        raise RuntimeError(f"evaluate: no {name} document has two full chunks of {seq_len} tokens")
    keep = np.isin(seqs.doc, docs)
    remap = {int(d): i for i, d in enumerate(docs)}
    sel = seqs.select(keep)
    doc = np.array([remap[int(d)] for d in sel.doc], dtype=np.int64)
    ids = [s.ids[d] for d in docs]
    context_texts = [data.tokenizer.decode(sel.tokens[(doc == i) & (sel.chunk == 0)][0].tolist(),
                                           skip_special_tokens=True) for i in range(len(docs))]
    features = featurizer.transform(context_texts)
    has = np.linalg.norm(features, axis=1) > 1e-9
    return EvalSet(ids, table[docs].astype(np.int64), sel.tokens, doc, sel.chunk == 0, features, has)


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
        w[es.has_features] = np.asarray(router.route(es.features[es.has_features]), np.float64)
    return w / w.sum(axis=1, keepdims=True)


def by_cluster(weights_doc: np.ndarray, labels: np.ndarray, k: int) -> list:
    """``[K][K]`` mean router weights of the documents of each true cluster (None: no document)."""
    return [weights_doc[labels == i].mean(axis=0).tolist() if np.any(labels == i) else None for i in range(k)]


def scoring_system(name, kind, router, nll_seq, n_tokens, train_s, eval_s) -> dict:
    """One system entry: loss = sum of per-sequence losses `nll_seq` / `n_tokens` (nats per token),
    perplexity = exp(loss), and the training / evaluation wall times of everything it uses. The
    per-sequence losses ride along under "nll_per_sequence" (`evaluate` moves them to scores.npz)."""
    loss = float(np.sum(nll_seq) / n_tokens)
    return {"name": name, "kind": kind, "router": router, "tokens": int(n_tokens), "loss": loss,
            "perplexity": float(math.exp(loss)), "train_wall_time_s": float(train_s),
            "eval_wall_time_s": float(eval_s), "nll_per_sequence": np.asarray(nll_seq, np.float64)}


@dataclass(frozen=True)
class EvalInputs:
    """What both schedules' evaluations share.

    Attributes:
      models: stage name -> trained model (base, dense, experts, random experts).
      test, val: the evaluation sets; experts: the available experts' stage names (all K unless
        some are skipped); randoms: random-partition experts ([] without control).
      priors: ``[K']`` shares of the train sequences of the available experts' clusters (w_k; the
        Bayes filter renormalises them); random_priors: ``[K]`` of the random partition.
      top1, topk: the centroid routers over the available experts' centroids (temperature 1; top-k
        is fitted on val here).
      n_tokens: scored tokens; train_s: training wall time of each system's stages.
      position: ``[K]`` each cluster's index in `experts`, -1 for a skipped expert.
    """

    models: dict
    test: EvalSet
    val: EvalSet
    experts: list
    randoms: list
    priors: np.ndarray
    random_priors: np.ndarray
    top1: object
    topk: object
    n_tokens: int
    train_s: dict
    position: np.ndarray

    @property
    def complete(self) -> bool:
        """Every cluster has its expert (no expert skipped)."""
        return bool((self.position >= 0).all())


def evaluate(config: ExperimentConfig, run: RunDir, data: TextData, stages: list[str], *,
             skip_experts: tuple[int, ...] = (), progress: bool = True) -> dict:
    """Score every system; returns the results dict used by `experiments.text.report`.

    Args:
      stages: the run's training stages (`experiments.engine.graph.training_stages`), whose wall
        times the systems are charged.
      skip_experts: experts left out: the ensembles route among the others, the oracle is dropped.
    """
    c = config
    k, seq_len = c.partition.num_clusters, c.data.seq_len
    assignments = load_assignments(run, k)
    featurizer = load_file(featurizer_path(run.partition), TextFeaturizer.load, "featurizer")
    partition = load_file(run.partition / "partition.npz", Partition.load, "partition")
    test = eval_set(data, assignments, "test", featurizer, seq_len, c.data.max_eval_docs, c.eval.max_scored_per_doc)
    val = eval_set(data, assignments, "val", featurizer, seq_len, 0, c.eval.max_scored_per_doc)
    avail = np.flatnonzero(available_experts(c, skip_experts))
    experts, randoms = [expert_names(c)[i] for i in avail], expert_names(c, random=True)
    position = np.full(k, -1)
    position[avail] = np.arange(len(avail))
    routed = partition if len(avail) == k else partition.subset(avail)   # lost experts: route among the rest
    models = {n: load_stage_model(run, n, lambda: new_model(c, data.vocab_size, c.seed))
              for n in ["base", "dense", *experts, *randoms]}
    wall = {n: run.stage_info(n)["wall_time_s"] for n in stages}
    train_s = {"base": wall["base"], "dense": wall["base"] + wall["dense"],
               "experts": wall["base"] + sum(wall[e] for e in experts),
               "random": wall["base"] + sum(wall[e] for e in randoms),
               "router": wall.get("router", 0.0)}
    inputs = EvalInputs(models, test, val, experts, randoms, assignments.priors(k)[avail],
                        assignments.priors(k, random=True), CentroidRouter(routed, temperature=1.0, top_k=1),
                        CentroidRouter(routed, temperature=1.0, top_k=min(c.eval.top_k, len(avail))),
                        int(test.scored.sum()) * seq_len, train_s, position)
    t_eval = time.perf_counter()
    evaluate_schedule = _evaluate_ar if c.schedule == "ar" else _evaluate_masked
    systems, per_seq, weights_doc, temperature = evaluate_schedule(c, run, data, inputs, progress)
    clusters, s11 = _s11_terms(per_seq, test, k, seq_len)
    seq_labels = test.labels[test.doc[test.scored]]
    for cl in clusters:                      # every system on each true cluster's scored tokens
        m = seq_labels == cl["cluster"]
        cl["systems"] = {sy["name"]: (float(sy["nll_per_sequence"][m].sum() / cl["tokens"]) if cl["tokens"] else None)
                         for sy in systems}
    samples = generate(c, run, data, models, experts, inputs.priors)
    arrays = {"x1": test.x1, "doc": test.doc, "context": test.context, "labels": test.labels,
              "priors": inputs.priors, "random_priors": inputs.random_priors}
    for system in systems:
        arrays[f"nll/{system['name']}"] = system.pop("nll_per_sequence")
    for name, wd in weights_doc.items():
        arrays[f"weights/{name}"] = wd
    return {
        "schedule": c.schedule,
        "metric": "nll" if c.schedule == "ar" else "dfm_elbo",
        "perplexity_is_upper_bound": c.schedule == "masked",
        "eval": {"documents": len(test.ids), "scored_sequences": int(test.scored.sum()),
                 "context_sequences": int(test.context.sum()), "scored_tokens": inputs.n_tokens,
                 "documents_without_context_features": int((~test.has_features).sum()),
                 "val_documents": len(val.ids), "priors": inputs.priors.tolist(),
                 "centroid_topk_temperature": temperature, "top_k": c.eval.top_k,
                 "skipped_experts": list(skip_experts),
                 "wall_time_s": time.perf_counter() - t_eval},
        "systems": systems,
        "clusters": clusters,
        "s11": s11,
        "router_weights_by_true_cluster": {name: by_cluster(wd, test.labels, k) for name, wd in weights_doc.items()},
        "samples": samples,
        "masked_context_use": per_seq.get("context_use"),
        "data": data.summary,
        "arrays": arrays,
    }


def _s11_terms(per_seq: dict, test: EvalSet, k: int, seq_len: int) -> tuple[list, dict]:
    """Per-cluster expert-on-own-cluster and dense losses on the same scored tokens (THEORY S11).
    A cluster whose expert is skipped (own loss NaN) has no expert loss and is left out of the
    weighted sum (whose weights are then the shares among the clusters with an expert)."""
    dense_nll = per_seq["dense"]  # [n_scored] per-sequence nll sums
    seq_labels = test.labels[test.doc[test.scored]]
    clusters = []
    for i in range(k):
        m = seq_labels == i
        tok_i = int(m.sum()) * seq_len
        has_expert = bool(tok_i) and bool(np.isfinite(per_seq["own"][m]).all())
        clusters.append({
            "cluster": i, "tokens": tok_i, "documents": int(np.sum(test.labels == i)),
            "expert_loss": float(per_seq["own"][m].sum() / tok_i) if has_expert else None,
            "dense_loss": float(dense_nll[m].sum() / tok_i) if tok_i else None,
        })
        for key in ("expert", "dense"):
            loss = clusters[-1][f"{key}_loss"]
            clusters[-1][f"{key}_perplexity"] = None if loss is None else float(math.exp(loss))
    counted = np.array([cl["tokens"] if cl["expert_loss"] is not None else 0 for cl in clusters], np.float64)
    w = counted / counted.sum()
    dense_loss = float(sum(wi * cl["dense_loss"] for wi, cl in zip(w, clusters) if wi))
    weighted = float(sum(wi * cl["expert_loss"] for wi, cl in zip(w, clusters) if wi))
    h_k = partition_entropy(test.labels, k)
    s11 = {"dense_loss": dense_loss, "cluster_weights": w.tolist(), "weighted_expert_loss": weighted,
           "dense_minus_oracle_gap": dense_loss - weighted,
           "dense_minus_weighted_expert_loss": dense_loss - weighted,   # the same number, former name
           "entropy_bound": {
               "nats_per_sequence": h_k,
               "nats_per_token": h_k / seq_len,
               "note": "plug-in H(K) = -sum_k p_k log p_k (nats) of the evaluated test documents' cluster shares "
                       "p_k. Every scored sequence (chunk) is an independent model input, so the gap per "
                       "sequence estimates I(X; K) with X one sequence, and I(X; K) <= H(K) for any X; per "
                       "token H(K) / seq_len. An UPPER BOUND on "
                       "I(X; K), not an estimate of it"},
           "note": "nats per scored token; w_k = share of scored tokens in cluster k (clusters with an "
                   "expert); weighted_expert_loss equals the oracle ensemble's loss. dense_minus_oracle_gap = "
                   "dense loss - weighted_expert_loss: at the optimum (all models exact) it is I(X; K) >= 0 "
                   "(THEORY S11); it estimates I(X; K) only when the experts and dense are all well trained, "
                   "and for undertrained models it can be negative (a mutual information never is)"}
    return clusters, s11


def _own_cluster_nll(lp_experts: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Each scored sequence's NLL under its own cluster's expert ``[n]`` (NaN where that expert is
    skipped), from the available experts' token log-probs ``[K', n, L]`` and each sequence's
    cluster position among them ``[n]`` (-1: skipped)."""
    rows = np.arange(lp_experts.shape[1])
    own = -lp_experts[np.maximum(position, 0), rows].sum(axis=1)
    return np.where(position >= 0, own, np.nan)


def _fixed_mixture_nll(lp_experts: np.ndarray, weights_seq: np.ndarray) -> np.ndarray:
    """Per-sequence NLL ``[n]`` of the mixture with fixed per-sequence weights ``[n, K]`` (THEORY S8),
    from the experts' token log-probs ``[K, n, L]``."""
    scores = mixture_token_log_probs(FixedRouter(jnp.asarray(weights_seq, jnp.float32)),
                                     jnp.asarray(lp_experts, jnp.float32))
    return -np.asarray(scores.log_probs, np.float64).sum(axis=1)


def _bayes_mixture_nll(lp_experts: np.ndarray, priors: np.ndarray, test: EvalSet, seq_len: int):
    """Bayes-filter mixture (THEORY S9) over each test document's tokens in order (context chunk
    first): per scored sequence NLL ``[n_scored]`` and each document's mean weights over its scored
    tokens ``[D, K]``. `lp_experts`: ``[K, n, L]`` token log-probs of all the documents' chunks."""
    num, docs = lp_experts.shape[0], len(test.ids)
    rows = [np.flatnonzero(test.doc == d) for d in range(docs)]     # chunk order: context first
    width = max(len(r) for r in rows) * seq_len
    stack = np.zeros((num, docs, width), np.float32)
    valid = np.zeros((docs, width), bool)
    for d, r in enumerate(rows):
        stack[:, d, :len(r) * seq_len] = lp_experts[:, r].reshape(num, -1)
        valid[d, :len(r) * seq_len] = True
    scores = mixture_token_log_probs(BayesFilterRouter.from_priors(priors), jnp.asarray(stack), valid=valid)
    mix = np.asarray(scores.log_probs, np.float64)
    weights = np.asarray(scores.weights, np.float64)
    nll = np.zeros(len(test.doc))
    weights_doc = np.zeros((docs, num))
    for d, r in enumerate(rows):
        nll[r] = -mix[d, :len(r) * seq_len].reshape(len(r), seq_len).sum(axis=1)
        weights_doc[d] = weights[d, seq_len:len(r) * seq_len].mean(axis=0)
    return nll[test.scored], weights_doc


def _evaluate_ar(config: ExperimentConfig, run: RunDir, data: TextData, inp: EvalInputs, progress: bool):
    del run                                 # the AR systems need no further model
    c, models, test, val = config, inp.models, inp.test, inp.val
    bs, experts, randoms = c.eval.batch_size, inp.experts, inp.randoms
    bar = progress_bar(len(models) + len(experts), desc="evaluate", disable=not progress)
    lp, secs = scoring.ar_log_probs(models, test.x1, data.bos_id, bs, progress=bar.update)
    lp_val, _ = scoring.ar_log_probs({e: models[e] for e in experts}, val.x1, data.bos_id, bs, progress=bar.update)
    bar.close()
    # temperature of the top-k router: maximize the per-token mixture likelihood on val scored tokens
    vs = val.scored
    reps = np.repeat(np.arange(int(vs.sum())), c.data.seq_len)
    val_doc_rows = val.doc[vs]
    ll = np.stack([lp_val[e][vs].reshape(-1) for e in experts], axis=1)  # [N_tok, K]
    feats = val.features[val_doc_rows][reps]
    ok = val.has_features[val_doc_rows][reps]
    topk = fit_centroid_router(inp.topk, feats[ok], ll[ok])
    scored = test.scored
    doc = test.doc[scored]
    lp_e = np.stack([lp[e] for e in experts])  # [K, n, L]
    nll, weights_doc, systems = {}, {}, []
    own = _own_cluster_nll(np.stack([lp[e][scored] for e in experts]), inp.position[test.labels[doc]])
    t0 = time.perf_counter()
    fixed = [("centroid-top1", centroid_weights(inp.top1, test)),
             (f"centroid-top{c.eval.top_k}", centroid_weights(topk, test))]
    if inp.complete:                        # the oracle needs every cluster's expert
        fixed.append(("oracle", np.eye(len(experts))[test.labels]))
    for name, wd in fixed:
        weights_doc[name] = wd
        nll[name] = _fixed_mixture_nll(lp_e[:, scored], wd[doc])
    mix_s = (time.perf_counter() - t0) / len(fixed)
    t0 = time.perf_counter()
    nll["bayes"], weights_doc["bayes"] = _bayes_mixture_nll(lp_e, inp.priors, test, c.data.seq_len)
    bayes_s = time.perf_counter() - t0
    expert_s, n_tok, ts = sum(secs[e] for e in experts), inp.n_tokens, inp.train_s
    systems.append(scoring_system("dense", "dense", None, -lp["dense"][scored].sum(axis=1), n_tok,
                                  ts["dense"], secs["dense"]))
    systems.append(scoring_system("base", "base", None, -lp["base"][scored].sum(axis=1), n_tok,
                                  ts["base"], secs["base"]))
    systems.append(scoring_system("ensemble/bayes", "ensemble", "bayes filter (S9)", nll["bayes"], n_tok,
                                  ts["experts"], expert_s + bayes_s))
    systems.append(scoring_system("ensemble/centroid-top1", "ensemble", "centroid top-1", nll["centroid-top1"],
                                  n_tok, ts["experts"], expert_s + mix_s))
    systems.append(scoring_system(f"ensemble/centroid-top{c.eval.top_k}", "ensemble",
                                  f"centroid top-{c.eval.top_k}, T={topk.temperature:.4g} fitted on val",
                                  nll[f"centroid-top{c.eval.top_k}"], n_tok, ts["experts"], expert_s + mix_s))
    if "oracle" in nll:
        systems.append(scoring_system("ensemble/oracle", "ensemble", "oracle (true cluster)", nll["oracle"], n_tok,
                                      ts["experts"], expert_s + mix_s))
    if randoms:
        t0 = time.perf_counter()
        lp_r = np.stack([lp[e] for e in randoms])
        nll_r, weights_doc["random-bayes"] = _bayes_mixture_nll(lp_r, inp.random_priors, test, c.data.seq_len)
        systems.append(scoring_system("random-ensemble/bayes", "random ensemble", "bayes filter (S9)", nll_r,
                                      n_tok, ts["random"], sum(secs[e] for e in randoms) + time.perf_counter() - t0))
    per_seq = {"dense": -lp["dense"][scored].sum(axis=1), "own": own}
    return systems, per_seq, weights_doc, float(topk.temperature)


def _evaluate_masked(config: ExperimentConfig, run: RunDir, data: TextData, inp: EvalInputs, progress: bool):
    c, models, test, val, experts, randoms = config, inp.models, inp.test, inp.val, inp.experts, inp.randoms
    vocab, bs = data.vocab_size, c.eval.batch_size
    schedule = kappa_schedule(c)
    draws = dict(num_draws=c.masked.elbo_samples, seed=c.eval.seed, batch_size=bs)
    # temperature: per val document, log-likelihood proxy = -(DFM loss) of its scored chunks
    vs = val.scored
    n_val_batches = -(-int(vs.sum()) // bs) * c.masked.elbo_samples
    scored = test.scored
    n_test_batches = -(-int(scored.sum()) // bs) * c.masked.elbo_samples
    bar = progress_bar(n_val_batches + n_test_batches, desc="evaluate", disable=not progress)
    elbo_val, _, _ = scoring.masked_elbo({e: models[e] for e in experts}, val.x1[vs], schedule, vocab,
                                         ensembles={}, progress=bar.update, **draws)
    ll = np.zeros((len(val.ids), len(experts)))
    for j, e in enumerate(experts):
        np.add.at(ll[:, j], val.doc[vs], -elbo_val[e])
    topk = fit_centroid_router(inp.topk, val.features[val.has_features], ll[val.has_features])
    doc = test.doc[scored]
    router = load_stage_model(run, "router", router_factory(c, vocab))
    kept = jnp.asarray(np.flatnonzero(inp.position >= 0))
    # the classifier over the available experts: its softmax restricted to their logits
    learned_weights = nnx.jit(lambda r, x_t, t: jax.nn.softmax(r.logits(x_t, t)[:, kept], axis=-1))
    learned = CallableRouter(lambda x_t, t: learned_weights(router, x_t, t), len(experts))

    def fixed(weights_seq):
        return lambda start, stop, b: FixedRouter(jnp.asarray(scoring.pad_rows(weights_seq[start:stop], b),
                                                              jnp.float32))

    ensembles = {
        "centroid-top1": (experts, fixed(centroid_weights(inp.top1, test)[doc])),
        f"centroid-top{c.eval.top_k}": (experts, fixed(centroid_weights(topk, test)[doc])),
        "learned": (experts, lambda start, stop, b: learned),
    }
    if inp.complete:                        # the oracle needs every cluster's expert
        ensembles["oracle"] = (experts, fixed(np.eye(len(experts))[test.labels][doc]))
    if randoms:
        ensembles["random-uniform"] = (randoms, fixed(np.full((len(doc), len(randoms)), 1.0 / len(randoms))))
    elbo, secs, mean_w = scoring.masked_elbo(models, test.x1[scored], schedule, vocab, ensembles=ensembles,
                                             progress=bar.update, **draws)
    bar.close()
    pos = inp.position[test.labels[doc]]
    own = np.where(pos >= 0, np.stack([elbo[e] for e in experts])[np.maximum(pos, 0), np.arange(len(doc))], np.nan)
    expert_s, n_tok, ts = sum(secs[e] for e in experts), inp.n_tokens, inp.train_s
    systems = [scoring_system("dense", "dense", None, elbo["dense"], n_tok, ts["dense"], secs["dense"]),
               scoring_system("base", "base", None, elbo["base"], n_tok, ts["base"], secs["base"])]
    labels = {"centroid-top1": "centroid top-1",
              f"centroid-top{c.eval.top_k}": f"centroid top-{c.eval.top_k}, T={topk.temperature:.4g} fitted on val",
              "oracle": "oracle (true cluster)", "learned": "learned router (S10)"}
    routed = [n for n in ("learned", "centroid-top1", f"centroid-top{c.eval.top_k}", "oracle") if n in ensembles]
    for name in routed:
        extra = ts["experts"] + (ts["router"] if name == "learned" else 0.0)
        systems.append(scoring_system(f"ensemble/{name}", "ensemble", labels[name], elbo[name], n_tok,
                                      extra, expert_s + secs[name]))
    if randoms:
        systems.append(scoring_system("random-ensemble/uniform", "random ensemble", "uniform", elbo["random-uniform"],
                                      n_tok, ts["random"], sum(secs[e] for e in randoms) + secs["random-uniform"]))
    weights_doc = {}
    for name in routed:
        wd = np.zeros((len(test.ids), len(experts)))
        np.add.at(wd, doc, mean_w[name])
        weights_doc[name] = wd / np.bincount(doc, minlength=len(test.ids))[:, None]
    per_seq = {"dense": elbo["dense"], "own": own,
               "context_use": context_use(models["dense"], test.x1[scored], vocab, c.eval.seed, bs)}
    return systems, per_seq, weights_doc, float(topk.temperature)


def context_use(denoiser, x1: np.ndarray, mask_id: int, seed: int, batch_size: int) -> dict:
    """Does the denoiser use context? Its mean cross-entropy (nats) on masked positions when all
    positions are masked (= what a unigram model can do) and when 10% / 50% are masked."""
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

