"""Stages of the multimodal job (LLaVA-style experts), each idempotent on a run directory.

    data       records (default dataset or LLaVA / InternVL files), tokenizer, token and image arrays
    stage1     alignment on all train conversations: tower + projector + LM from scratch
               (`[stage1] train`; "projector" is LLaVA's choice with pretrained parts)
    partition  features of the stage-1 tower (frozen from here on) for every image (patch mean of
               the layer the projector reads, `modeling.pooled_features`); spherical
               balanced k-means on the train images (the paper's partition); a random partition of
               the same sizes (control); val / test images assigned to the nearest centroid
    dense      stage 2 (instruction tuning) on all train conversations, from stage 1
    expert-k   stage 2 on the conversations of cluster k only, from stage 1; compute-matched:
               sum_k steps_k = stage2.steps, steps_k proportional to the cluster's conversations
    random-k   the same on the random partition
    evaluate   `experiments.mllm.evaluate`, then the report, plots and example grid
    export     HF directories of stage 1 and the dense model, and the decentralized directory (K
               expert HF directories + partition + router; `dfm.hf.load_decentralized`)

A finished stage leaves ``stages/<stage>.json``; an interrupted training stage resumes from its
orbax checkpoint (`dfm.train.train`). Every expert reads only stage 1, its own cluster's data and
the partition: experts never communicate.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from experiments.mllm import modeling
from experiments.mllm.config import MultimodalExperimentConfig, to_toml
from experiments.rundir import RunDir, RunDirError, atomic_write_json, atomic_write_text, read_json
from experiments.stages import Context, StageError, evaluate_and_report


def open_context(config: MultimodalExperimentConfig, out=None, *, progress: bool = True, log=print) -> Context:
    """Create / reopen the run directory (default ``runs/<name>``) pinned to `config`.

    Raises:
      RunDirError: the directory is not writable or holds a run of another config.
    """
    root = Path(out) if out is not None else Path("runs") / config.name
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"output directory {str(root)!r} is not writable: {exc.strerror or exc}") from None
    run = RunDir(root)
    text = to_toml(config)
    if run.resolved.is_file():
        if run.resolved.read_text(encoding="utf-8") != text:
            raise RunDirError(f"output directory {str(root)!r} holds a run of a different config "
                              f"(see {run.resolved}); use another --out or delete it")
    else:
        atomic_write_text(run.resolved, text)
    return Context(config, run, progress, log)


def data_summary(ctx: Context) -> dict:
    from experiments.mllm.data import prepare_data

    return ctx.cached("summary", lambda: prepare_data(ctx.config, ctx.run.root, modeling.num_image_tokens(ctx.config),
                                                      log=ctx.log))


def arrays(ctx: Context) -> dict:
    from experiments.mllm.data import load_arrays

    data_summary(ctx)
    return ctx.cached("arrays", lambda: load_arrays(ctx.run.root))


def mconfig(ctx: Context):
    s = data_summary(ctx)
    return ctx.cached("mconfig", lambda: modeling.model_config(ctx.config, s["vocab_size"], s["image_token_id"]))


def model_factory(ctx: Context):
    return functools.partial(modeling.new_model, mconfig(ctx), ctx.config.seed)


def stage_names(config) -> list[str]:
    """Training stages in run order."""
    k = config.partition.num_clusters
    names = ["stage1", "dense"] + [f"expert-{i}" for i in range(k)]
    if config.partition.random_control:
        names += [f"random-{i}" for i in range(k)]
    return names


def load_stage_model(ctx: Context, stage: str):
    from dfm.train import load_model

    if not ctx.run.is_done(stage):
        raise StageError(f"stage {stage!r} has not finished in {ctx.run.root}; run `dfm run` first")
    return ctx.cached(("model", stage), lambda: load_model(model_factory(ctx), ctx.run.model(stage)))


def train_labels(ctx: Context, random: bool = False) -> np.ndarray:
    """Cluster of every train conversation `[N]` (its image's cluster)."""
    part = read_json(ctx.run.partition / "assignments.json")
    image_labels = np.asarray(part["random" if random else "train"], np.int64)
    return image_labels[arrays(ctx)["image"]]


def stage_steps(ctx: Context, stage: str) -> int:
    from experiments.sequences import allocate_steps

    c = ctx.config
    if stage == "stage1":
        return c.stage1.steps
    if stage == "dense":
        return c.stage2.steps
    kind, k = stage.split("-")
    counts = np.bincount(train_labels(ctx, random=kind == "random"), minlength=c.partition.num_clusters)
    return allocate_steps(c.stage2.steps, counts)[int(k)]


def run_partition(ctx: Context) -> dict:
    """Pooled stage-1 features of all images; balanced k-means on train images; assignments."""
    if ctx.run.is_done("partition"):
        return ctx.run.stage_info("partition")
    from dfm.decentral import assign, balanced_kmeans

    t0 = time.perf_counter()
    c, a = ctx.config, arrays(ctx)
    model = load_stage_model(ctx, "stage1")
    feats = {s: modeling.image_features(model, a[f"images_{s}"], c.eval.batch_size)
             for s in ("train", "val", "test")}
    partition, labels = balanced_kmeans(feats["train"], c.partition.num_clusters, rng=c.partition.seed)
    random_labels = np.random.default_rng(c.partition.seed).permutation(labels)
    ctx.run.partition.mkdir(parents=True, exist_ok=True)
    partition.save(ctx.run.partition / "partition.npz")
    from experiments.rundir import atomic_save_npz

    atomic_save_npz(ctx.run.partition / "features.npz", **feats)
    assignments = {"train": labels.tolist(), "random": random_labels.tolist(),
                   "val": assign(partition, feats["val"]).tolist(), "test": assign(partition, feats["test"]).tolist()}
    atomic_write_json(ctx.run.partition / "assignments.json", assignments)
    conv = np.bincount(labels[a["image"]], minlength=c.partition.num_clusters)
    info = {"num_clusters": c.partition.num_clusters,
            "images_per_cluster": np.bincount(labels, minlength=c.partition.num_clusters).tolist(),
            "conversations_per_cluster": conv.tolist(),
            "random_conversations_per_cluster": np.bincount(
                random_labels[a["image"]], minlength=c.partition.num_clusters).tolist(),
            "test_images_per_cluster": np.bincount(assignments["test"], minlength=c.partition.num_clusters).tolist(),
            "kmeans": partition.config, "wall_time_s": time.perf_counter() - t0}
    ctx.run.mark_done("partition", info)
    ctx.log(f"[partition] K={c.partition.num_clusters}: images {info['images_per_cluster']}, "
            f"conversations {info['conversations_per_cluster']}")
    return info


def run_train(ctx: Context, stage: str, *, stop_after: int | None = None) -> dict | None:
    """Train one stage (skipped if finished, resumed if interrupted); returns its marker info."""
    import jax.numpy as jnp

    from dfm.train import TrainConfig, save_model, train
    from experiments.sequences import EpochBatches

    if ctx.run.is_done(stage):
        ctx.log(f"[{stage}] already finished, skipped")
        return ctx.run.stage_info(stage)
    c = ctx.config
    if stage not in stage_names(c):
        raise StageError(f"unknown stage {stage!r}; stages of this config: {', '.join(stage_names(c))}")
    a = arrays(ctx)
    if stage == "stage1":
        opt, index, model = c.stage1, np.arange(len(a["tokens"])), model_factory(ctx)()
    else:
        if not ctx.run.is_done("partition"):
            raise StageError(f"stage {stage!r} needs the partition: run stage1 and the partition first")
        opt = c.stage2
        if stage == "dense":
            index = np.arange(len(a["tokens"]))
        else:
            kind, k = stage.split("-")
            index = np.flatnonzero(train_labels(ctx, random=kind == "random") == int(k))
        from dfm.train import load_model

        model = load_model(model_factory(ctx), ctx.run.model("stage1"))
    steps = stage_steps(ctx, stage)
    warmup = opt.warmup_steps if stage in ("stage1", "dense") else round(opt.warmup_steps * steps / c.stage2.steps)
    tc = TrainConfig(steps=steps, learning_rate=opt.learning_rate, warmup_steps=min(steps, warmup),
                     weight_decay=opt.weight_decay, seed=c.seed, checkpoint_every=opt.checkpoint_every,
                     log_every=max(1, steps // 100), frozen=modeling.frozen_prefixes(opt.train))
    tokens, mask, images = a["tokens"][index], a["loss_mask"][index], a["images_train"]
    image_of = a["image"][index]
    batches = EpochBatches(len(index), opt.batch_size, c.seed, stage)

    def batch_fn(step):
        rows = batches.indices(step)
        return {"tokens": jnp.asarray(tokens[rows]), "mask": jnp.asarray(mask[rows]),
                "pixels": jnp.asarray(modeling.pixels(images[image_of[rows]]))}

    t0 = time.perf_counter()
    result = train(model, modeling.llava_loss, batch_fn, tc, checkpoint_dir=ctx.run.checkpoints(stage),
                   desc=stage, stop_after=stop_after, progress=ctx.progress)
    if result.steps_done < tc.steps:
        ctx.log(f"[{stage}] stopped at step {result.steps_done}/{tc.steps}; re-run to resume")
        return None
    save_model(model, ctx.run.model(stage))
    h = result.history
    info = {"steps": steps, "batch_size": opt.batch_size, "train": opt.train, "frozen": list(tc.frozen),
            "train_conversations": int(len(index)),
            "sequences_seen": steps * opt.batch_size, "wall_time_s": float(h[-1]["wall"]) if h else result.wall_time_s,
            "final_loss": float(h[-1]["loss"]) if h else None,
            "history": [{"step": r["step"], "loss": r["loss"]} for r in h]}
    ctx.run.mark_done(stage, info)
    ctx.log(f"[{stage}] {steps} steps on {len(index)} conversations, loss {info['final_loss']:.4f}, "
            f"{info['wall_time_s']:.1f} s (this call {time.perf_counter() - t0:.1f} s)")
    return info


def run_evaluate(ctx: Context) -> dict:
    """Evaluate every system; write report.json / report.md, plots and the example grid."""
    from experiments.mllm import evaluate, report

    return evaluate_and_report(ctx, stage_names(ctx.config), evaluate.evaluate, report)


def run_export(ctx: Context) -> dict:
    """Write the trained models as HF directories (`dfm.hf`, docs/checkpoints.md).

    ``<run>/hf/dense`` and ``<run>/hf/stage1``: LLaVA directories (`LlavaForConditionalGeneration`
    loads them; our tokenizer inside). ``<run>/decentralized``: the K experts, the partition and the
    top-k centroid router with the temperature fitted at evaluation (`dfm.hf.load_decentralized`
    rebuilds the ensemble). Needs the evaluation (for the temperature); skipped when done.
    """
    if ctx.run.is_done("export"):
        return ctx.run.stage_info("export")
    if not ctx.run.is_done("evaluate"):
        raise StageError("export needs the evaluation (its fitted router temperature): run `dfm evaluate`")
    from dfm.decentral import CentroidRouter, Partition
    from dfm.hf import save_decentralized, save_pretrained

    t0 = time.perf_counter()
    c, tok_dir = ctx.config, ctx.run.root / "tokenizer"
    out = {}
    for stage in ("stage1", "dense"):
        out[stage] = str(save_pretrained(load_stage_model(ctx, stage), ctx.run.root / "hf" / stage,
                                         tokenizer=tok_dir, overwrite=True))
    partition = Partition.load(ctx.run.partition / "partition.npz")
    temperature = read_json(ctx.run.report_json)["temperature"]
    router = CentroidRouter(partition, temperature=temperature, top_k=c.eval.top_k)
    priors = np.bincount(train_labels(ctx), minlength=c.partition.num_clusters)
    experts = [load_stage_model(ctx, f"expert-{k}") for k in range(c.partition.num_clusters)]
    out["decentralized"] = str(save_decentralized(ctx.run.root / "decentralized", experts, partition, router=router,
                                                  priors=priors / priors.sum(), tokenizer=tok_dir, overwrite=True))
    info = out | {"wall_time_s": time.perf_counter() - t0}
    ctx.run.mark_done("export", info)
    ctx.log(f"[export] HF directories: {out['dense']}, {out['decentralized']}")
    return info


def run_all(ctx: Context) -> dict:
    """Every stage in order in this process (finished stages are skipped)."""
    t0 = time.perf_counter()
    data_summary(ctx)
    run_train(ctx, "stage1")
    run_partition(ctx)
    for stage in stage_names(ctx.config)[1:]:
        run_train(ctx, stage)
    rep = run_evaluate(ctx)
    run_export(ctx)
    ctx.log(f"[run] done in {time.perf_counter() - t0:.1f} s; report: {ctx.run.report_md}")
    return rep
