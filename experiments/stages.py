"""The stages of the main job, each idempotent on a run directory.

    partition  corpus/tokenizer/token ids (experiments/data.py), then tf-idf + SVD features and
               spherical balanced k-means on the train documents, and a random partition of the
               same cluster sizes (seeded permutation of the labels)
    base       stage 1: one model on all train sequences
    dense      stage 2: continues from base on all train sequences for `stage2.steps` steps
    expert-k   stage 2: continues from base on cluster k only, `steps_k` steps with
               sum_k steps_k = stage2.steps (proportional to the clusters' sequence counts)
    random-k   the same for the random partition (control)
    router     masked schedule only: learned router on noised train sequences (THEORY S10)
    evaluate   experiments/evaluate.py, then report and plots

Compute matching: every stage-2 step processes `stage2.batch_size` sequences of `seq_len`
tokens, so dense and the K experts together see exactly the same number of training tokens,
``stage2.steps * batch_size * seq_len`` (tokens = target positions of the loss).

A training stage reads only the config, the run directory's data, the partition files and the
base model; it is finished when its marker ``stages/<stage>.json`` exists (written after the final
model). An interrupted stage resumes from its last orbax checkpoint (`dfm.train.train`).
`run_all` runs the stages one after another in this process.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.config import ExperimentConfig
from experiments.rundir import RunDir, atomic_write_json, prepare_run_dir, read_json


class StageError(RuntimeError):
    """A stage cannot run (missing prerequisite, bad stage argument); the message says why."""


@dataclass
class Context:
    """What every stage needs: the config, the run directory and how to report progress."""

    config: ExperimentConfig
    run: RunDir
    progress: bool = True
    log: Callable[..., None] = print
    _cache: dict = field(default_factory=dict)

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def default_out(config: ExperimentConfig) -> Path:
    """``runs/<config name>`` (relative to the working directory)."""
    return Path("runs") / config.name


def open_context(config: ExperimentConfig, out: str | Path | None = None, *, progress: bool = True,
                 log=print) -> Context:
    """Prepare the run directory (see `experiments.rundir.prepare_run_dir`) and a `Context`."""
    run = prepare_run_dir(Path(out) if out is not None else default_out(config), config)
    return Context(config, run, progress, log)


# ----------------------------------------------------------------------------------------------
# data and partition
# ----------------------------------------------------------------------------------------------
def data_summary(ctx: Context) -> dict:
    from experiments.data import prepare_data

    return ctx.cached("summary", lambda: prepare_data(ctx.config, ctx.run, log=ctx.log))


def split(ctx: Context, name: str):
    from experiments.data import load_split

    data_summary(ctx)
    return ctx.cached(("split", name), lambda: load_split(ctx.run, name))


def sequences(ctx: Context, name: str):
    return ctx.cached(("seq", name), lambda: split(ctx, name).sequences(ctx.config.data.seq_len))


def tokenizer(ctx: Context):
    from experiments.tokenizer import load_tokenizer

    data_summary(ctx)
    return ctx.cached("tokenizer", lambda: load_tokenizer(ctx.run.tokenizer))


def run_partition(ctx: Context) -> dict:
    """Data stage, then the k-means and random partitions of the train documents (idempotent)."""
    data_summary(ctx)
    if ctx.run.is_done("partition"):
        return ctx.run.stage_info("partition")
    from dfm.decentral import TextFeaturizer, assign, balanced_kmeans

    t0 = time.perf_counter()
    pc = ctx.config.partition
    train = split(ctx, "train")
    featurizer = TextFeaturizer(n_components=pc.svd_dim, seed=pc.seed, max_features=pc.max_features)
    features = featurizer.fit_transform(train.texts)
    partition, labels = balanced_kmeans(features, pc.num_clusters, rng=pc.seed)
    random_labels = np.random.default_rng(pc.seed).permutation(labels)  # same sizes exactly
    ctx.run.partition.mkdir(parents=True, exist_ok=True)
    featurizer.save(ctx.run.partition / "featurizer.pkl")
    partition.save(ctx.run.partition / "partition.npz")
    assignments = {"train": dict(zip(train.ids, labels.tolist())),
                   "random": dict(zip(train.ids, random_labels.tolist()))}
    for name in ("val", "test"):
        s = split(ctx, name)
        assignments[name] = dict(zip(s.ids, assign(partition, featurizer.transform(s.texts)).tolist()))
    atomic_write_json(ctx.run.partition / "assignments.json", assignments)
    seqs = sequences(ctx, "train")
    doc_labels, doc_random = np.asarray(labels), np.asarray(random_labels)
    info = {
        "num_clusters": pc.num_clusters,
        "documents_per_cluster": np.bincount(labels, minlength=pc.num_clusters).tolist(),
        "sequences_per_cluster": np.bincount(doc_labels[seqs.doc], minlength=pc.num_clusters).tolist(),
        "random_sequences_per_cluster": np.bincount(doc_random[seqs.doc], minlength=pc.num_clusters).tolist(),
        "test_documents_per_cluster": np.bincount(
            list(assignments["test"].values()), minlength=pc.num_clusters).tolist(),
        "kmeans": partition.config,
        "wall_time_s": time.perf_counter() - t0,
    }
    ctx.run.mark_done("partition", info)
    ctx.log(f"[partition] K={pc.num_clusters}: documents {info['documents_per_cluster']}, "
            f"sequences {info['sequences_per_cluster']}")
    return info


def load_assignments(ctx: Context) -> dict:
    """``{"train"|"random"|"val"|"test": {doc_id: cluster}}`` (raises StageError if missing)."""
    if not ctx.run.is_done("partition"):
        raise StageError(f"{ctx.run.root}: no partition yet; run `dfm partition` first")
    return ctx.cached("assignments", lambda: read_json(ctx.run.partition / "assignments.json"))


def train_labels(ctx: Context, random: bool = False) -> np.ndarray:
    """Cluster of every train sequence ``[num_train_sequences]`` (its document's cluster)."""
    table = load_assignments(ctx)["random" if random else "train"]
    ids = split(ctx, "train").ids
    doc_labels = np.array([table[i] for i in ids], dtype=np.int64)
    return doc_labels[sequences(ctx, "train").doc]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def expert_stage(ctx: Context, k: int, random: bool = False) -> str:
    """Stage name of expert `k` ("expert-k", or "random-k" for the random partition).

    Raises:
      StageError: k outside [0, K), or the random control disabled in the config.
    """
    num = ctx.config.partition.num_clusters
    if not 0 <= k < num:
        raise StageError(f"expert index {k} out of range: the config has K={num} experts (0..{num - 1})")
    if random and not ctx.config.partition.random_control:
        raise StageError("partition.random_control is false in this config: no random-partition experts")
    return f"{'random' if random else 'expert'}-{k}"


def stage_names(config: ExperimentConfig) -> list[str]:
    """All training stages of `config`, in the order `run_all` runs them."""
    k = config.partition.num_clusters
    names = ["base", "dense"] + [f"expert-{i}" for i in range(k)]
    if config.partition.random_control:
        names += [f"random-{i}" for i in range(k)]
    if config.schedule == "masked":
        names.append("router")
    return names


def stage_steps(ctx: Context, stage: str) -> int:
    """Optimizer steps of a training stage (experts: compute-matched share of stage2.steps)."""
    from experiments.sequences import allocate_steps

    c = ctx.config
    if stage == "base":
        return c.base.steps
    if stage == "dense":
        return c.stage2.steps
    if stage == "router":
        return c.router.steps
    kind, k = stage.split("-")
    counts = np.bincount(train_labels(ctx, random=kind == "random"), minlength=c.partition.num_clusters)
    return allocate_steps(c.stage2.steps, counts)[int(k)]


def _train_config(ctx: Context, stage: str):
    from dfm.train import TrainConfig

    c = ctx.config
    steps = stage_steps(ctx, stage)
    if stage == "router":
        opt = c.router
        return TrainConfig(steps=steps, learning_rate=opt.learning_rate, warmup_steps=min(steps, max(1, steps // 10)),
                           weight_decay=0.0, seed=c.seed + 7, checkpoint_every=max(1, steps // 2),
                           log_every=max(1, steps // 50)), opt.batch_size
    opt = c.base if stage == "base" else c.stage2
    warmup = opt.warmup_steps
    if stage not in ("base", "dense"):  # experts: the dense schedule's shape, compressed to steps_k
        warmup = round(opt.warmup_steps * steps / c.stage2.steps)
    return TrainConfig(steps=steps, learning_rate=opt.learning_rate, warmup_steps=min(steps, warmup),
                       weight_decay=opt.weight_decay, seed=c.seed, checkpoint_every=opt.checkpoint_every,
                       log_every=max(1, steps // 100)), opt.batch_size


def model_factory(ctx: Context):
    """Zero-argument factory of a fresh language model of this run (for `load_model`)."""
    from experiments import modeling

    vocab = data_summary(ctx)["vocab_size"]
    return functools.partial(modeling.new_model, ctx.config, vocab, ctx.config.seed)


def router_factory(ctx: Context):
    """Zero-argument factory of a fresh learned router (masked schedule)."""
    from experiments import modeling

    vocab = data_summary(ctx)["vocab_size"]
    return functools.partial(modeling.new_router, ctx.config, vocab, ctx.config.seed + 1)


def load_stage_model(ctx: Context, stage: str):
    """The final model of a finished stage (raises StageError if it has not finished)."""
    from dfm.train import load_model

    if not ctx.run.is_done(stage):
        raise StageError(f"stage {stage!r} has not finished in {ctx.run.root}; run `dfm train` for it first")
    factory = router_factory(ctx) if stage == "router" else model_factory(ctx)
    return load_model(factory, ctx.run.model(stage))


def training_mesh(config):
    """The `[mesh]` section as a `jax.sharding.Mesh`, or None for the default unsharded layout."""
    if not config.mesh.sharded:
        return None
    from dfm.sharding import MeshConfig, make_mesh

    m = config.mesh
    return make_mesh(MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor))


def run_train(ctx: Context, stage: str, *, stop_after: int | None = None) -> dict | None:
    """Train one stage (skipped if finished; resumed if interrupted).

    Args:
      stage: "base", "dense", "expert-k", "random-k" or "router".
      stop_after: stop after this many steps in total (testing resume); the stage then stays
        unfinished and a later call resumes it.

    Returns:
      the stage's marker info, or None if stopped early by `stop_after`.

    Raises:
      StageError: a prerequisite stage is missing, or "router" under the AR schedule.
    """
    from dfm.train import save_model, train
    from experiments import modeling

    if ctx.run.is_done(stage):
        ctx.log(f"[{stage}] already finished, skipped")
        return ctx.run.stage_info(stage)
    c = ctx.config
    if stage == "router" and c.schedule != "masked":
        raise StageError("the learned router is part of the masked schedule; use --schedule masked "
                         "(under AR the exact router is the Bayes filter, THEORY S9)")
    if stage not in stage_names(c):
        raise StageError(f"unknown stage {stage!r}; stages of this config: {', '.join(stage_names(c))}")
    summary = data_summary(ctx)
    vocab, bos = summary["vocab_size"], summary["bos_id"]
    seqs = sequences(ctx, "train")
    if stage == "router":
        load_assignments(ctx)
    elif stage != "base":
        load_assignments(ctx)
        if not ctx.run.is_done("base"):
            raise StageError(f"stage {stage!r} continues from the base model: run `dfm train --base` first")
    tc, batch_size = _train_config(ctx, stage)
    if stage in ("base", "dense", "router"):
        index = np.arange(len(seqs))
    else:
        kind, k = stage.split("-")
        index = np.flatnonzero(train_labels(ctx, random=kind == "random") == int(k))
    data = seqs.tokens[index]
    t0 = time.perf_counter()
    if stage == "router":
        from dfm.decentral import train_learned_router

        router = router_factory(ctx)()
        labels = train_labels(ctx)
        result = train_learned_router(
            router, seqs.tokens, labels, modeling.kappa_schedule(c), tc, mask_id=vocab,
            batch_size=batch_size, data_seed=c.seed, checkpoint_dir=ctx.run.checkpoints(stage),
            desc=stage, stop_after=stop_after, progress=ctx.progress)
        model = router
    else:
        from experiments.sequences import EpochBatches
        import jax.numpy as jnp

        model = model_factory(ctx)() if stage == "base" else load_stage_model(ctx, "base")
        batches = EpochBatches(len(data), batch_size, c.seed, stage)
        result = train(model, modeling.training_loss_fn(c, vocab, bos),
                       lambda step: jnp.asarray(data[batches.indices(step)]), tc,
                       checkpoint_dir=ctx.run.checkpoints(stage), desc=stage, stop_after=stop_after,
                       progress=ctx.progress, mesh=training_mesh(c))
    if result.steps_done < tc.steps:
        ctx.log(f"[{stage}] stopped at step {result.steps_done}/{tc.steps}; re-run to resume")
        return None
    save_model(model, ctx.run.model(stage))
    history = result.history
    info = {
        "steps": tc.steps, "batch_size": batch_size, "seq_len": c.data.seq_len,
        "train_sequences": int(len(data)),
        "train_tokens": int(tc.steps * batch_size * c.data.seq_len),
        "wall_time_s": float(history[-1]["wall"]) if history else result.wall_time_s,
        "final_loss": float(history[-1]["loss"]) if history else None,
        "history": [{"step": h["step"], "loss": h["loss"]} | ({"accuracy": h["accuracy"]} if "accuracy" in h else {})
                    for h in history],
    }
    ctx.run.mark_done(stage, info)
    ctx.log(f"[{stage}] {tc.steps} steps, loss {info['final_loss']:.4f}, {info['wall_time_s']:.1f} s "
            f"(this call {time.perf_counter() - t0:.1f} s)")
    return info


def evaluate_and_report(ctx: Context, training_stages: list[str], evaluate_fn, report) -> dict:
    """The evaluate stage of a job: `evaluate_fn(ctx)`, then `report.write_report` and
    `report.print_summary` (skipped, summary printed, when done).

    Raises:
      StageError: one of `training_stages` has not finished.
    """
    if ctx.run.is_done("evaluate") and ctx.run.report_json.is_file():
        ctx.log("[evaluate] already finished, skipped")
        rep = read_json(ctx.run.report_json)
        report.print_summary(rep)
        return rep
    missing = [s for s in training_stages if not ctx.run.is_done(s)]
    if missing:
        raise StageError(f"cannot evaluate: unfinished stages {', '.join(missing)}; run `dfm run` "
                         f"or `dfm train` for them")
    t0 = time.perf_counter()
    results = evaluate_fn(ctx)
    rep = report.write_report(ctx, results)
    ctx.run.mark_done("evaluate", {"wall_time_s": time.perf_counter() - t0})
    report.print_summary(rep)
    return rep


def run_evaluate(ctx: Context) -> dict:
    """Evaluate every system, write report.json / report.md / plots (skipped if done)."""
    from experiments import evaluate, report

    return evaluate_and_report(ctx, stage_names(ctx.config), evaluate.evaluate, report)


def run_all(ctx: Context) -> dict:
    """Every stage in order, in this process; finished stages are skipped."""
    t0 = time.perf_counter()
    run_partition(ctx)
    for stage in stage_names(ctx.config):
        run_train(ctx, stage)
    rep = run_evaluate(ctx)
    ctx.log(f"[run] done in {time.perf_counter() - t0:.1f} s; report: {ctx.run.report_md}")
    return rep
