"""The text job as a `Task`: dense vs decentralized experts on the Python standard library's docs.

Data: the stdlib corpus split by document (`experiments.text.corpus`, `.data`), a byte-level BPE
trained on train, documents cut into full chunks of ``data.seq_len`` tokens (the training
examples). Partition: tf-idf + TruncatedSVD features of the train documents (c-BTM;
`dfm.decentral.TextFeaturizer`), so the partition does not need stage 1 ("base"). Model: a
LLaMA-style `dfm.models.Decoder`, causal under the AR schedule (loss `dfm.losses.ar_nll`, THEORY
S5) or a bidirectional denoiser under the masked schedule (`dfm.losses.dfm_loss`, S4); the masked
schedule adds the learned router (THEORY S10) as an extra stage. Evaluation and report:
`experiments.text.evaluate`, `.report`; export (AR): `experiments.text.export`. See docs/main_job.md.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from experiments.engine.memory import count_parameters, training_memory_bytes
from experiments.engine.stages import Context, finish_training, load_assignments, metrics_kwargs
from experiments.engine.task import DataError, PartitionInput, Task
from experiments.text import evaluate, modeling, report
from experiments.text.config import ExperimentConfig
from experiments.text.data import TextData, load_data


#: validation sequences per model selection at most (evenly spaced over the selected ones)
MAX_VALIDATION_SEQUENCES = 512


class TextTask(Task):
    """The text job (`task = "text"`, the default)."""

    name = "text"
    config_class = ExperimentConfig
    stage1 = "base"
    has_export = True

    def with_schedule(self, config: ExperimentConfig, schedule: str | None) -> ExperimentConfig:
        """``--schedule ar|masked`` overrides the config's schedule; the run is then named
        ``<name>-<schedule>`` (its own run directory)."""
        if schedule is None or schedule == config.schedule:
            return config
        return config.replace(schedule=schedule, name=f"{config.name}-{schedule}")

    def prepare_data(self, ctx: Context) -> TextData:
        return load_data(ctx.config, ctx.run, log=ctx.log)

    def num_train_examples(self, data: TextData) -> int:
        return len(data.sequences["train"])

    def num_train_units(self, data: TextData) -> int:
        return len(data.splits["train"].ids)

    def training_memory_bytes(self, ctx: Context, data: TextData) -> int:
        c = ctx.config
        params = count_parameters(lambda: modeling.new_model(c, data.vocab_size, c.seed))
        batch = max(getattr(c, self.stage1).batch_size, c.stage2.batch_size)
        dc = modeling.decoder_config(c, data.vocab_size)      # the checkpoint's sizes with model.init_from
        return training_memory_bytes(params, batch=batch, seq_len=c.data.seq_len, hidden=dc.hidden_size,
                                     layers=dc.num_layers, heads=dc.num_heads, vocab=data.vocab_size)

    def partition_input(self, ctx: Context, data: TextData, stage1_model=None) -> PartitionInput:
        """tf-idf + SVD features of whole documents (fitted on train; saved as featurizer.npz,
        arrays + JSON, for the centroid routers at evaluation and the export)."""
        from dfm.decentral import TextFeaturizer

        pc = ctx.config.partition
        featurizer = TextFeaturizer(n_components=pc.svd_dim, seed=pc.seed, max_features=pc.max_features)
        try:
            featurizer.fit(data.splits["train"].texts)
        except ValueError as e:           # too few distinct words for svd_dim, or only stop words
            raise DataError(f"[partition] svd_dim = {pc.svd_dim}: the train documents cannot give that many "
                            f"tf-idf + SVD features ({e}); lower svd_dim or use a larger corpus") from None
        features = {"train": featurizer.transform(data.splits["train"].texts)}
        for name in ("val", "test"):
            features[name] = featurizer.transform(data.splits[name].texts)
        ctx.run.partition.mkdir(parents=True, exist_ok=True)
        featurizer.save(ctx.run.partition / "featurizer.npz")
        return PartitionInput(features, data.sequences["train"].doc, "documents", "sequences")

    def new_model(self, ctx: Context, data: TextData):
        return modeling.new_model(ctx.config, data.vocab_size, ctx.config.seed)

    def loss_fn(self, ctx: Context, data: TextData):
        return modeling.training_loss_fn(ctx.config, data.vocab_size, data.bos_id)

    def batch_fn(self, ctx: Context, data: TextData, index: np.ndarray, batches):
        tokens = data.sequences["train"].tokens[index]
        return lambda step: jnp.asarray(tokens[batches.indices(step)])

    def validation_batches(self, ctx: Context, data: TextData, units: np.ndarray | None) -> list:
        """The validation sequences of the documents `units` (None = all validation documents), at
        most the first ``eval.max_scored_per_doc + 1`` chunks of each document (as the test scoring
        reads them; 0 = all) and at most `MAX_VALIDATION_SEQUENCES` in all (evenly spaced), in
        batches of ``eval.batch_size``."""
        seqs = data.sequences["val"]
        keep = np.ones(len(seqs), bool) if units is None else np.isin(seqs.doc, units)
        per_doc = ctx.config.eval.max_scored_per_doc
        if per_doc:
            keep &= seqs.chunk <= per_doc
        rows = np.flatnonzero(keep)
        if len(rows) > MAX_VALIDATION_SEQUENCES:
            rows = rows[np.linspace(0, len(rows) - 1, MAX_VALIDATION_SEQUENCES).round().astype(np.int64)]
        bs = ctx.config.eval.batch_size
        return [jnp.asarray(seqs.tokens[rows[i:i + bs]]) for i in range(0, len(rows), bs)]

    def stage_marker(self, ctx: Context, stage: str, steps: int, batch_size: int) -> dict:
        """Training tokens = steps x batch_size x seq_len (every position is a target of the loss)."""
        seq_len = ctx.config.data.seq_len
        return {"seq_len": seq_len, "train_tokens": int(steps * batch_size * seq_len)}

    def extra_stages(self, config: ExperimentConfig) -> list[str]:
        return ["router"] if config.schedule == "masked" else []

    def run_extra(self, ctx: Context, data: TextData, stage: str, *, stop_after: int | None = None) -> dict | None:
        """The learned router (masked schedule; THEORY S10) on noised train sequences and their clusters."""
        from dfm.decentral import train_learned_router
        from dfm.train import TrainConfig

        c = ctx.config
        labels = load_assignments(ctx).examples()
        steps, opt = c.router.steps, c.router
        tc = TrainConfig(steps=steps, learning_rate=opt.learning_rate, warmup_steps=min(steps, max(1, steps // 10)),
                         weight_decay=0.0, seed=c.seed + 7, checkpoint_every=max(1, steps // 2),
                         log_every=max(1, steps // 50))
        t0 = time.perf_counter()
        router = modeling.router_factory(c, data.vocab_size)()
        tokens = data.sequences["train"].tokens
        result = train_learned_router(
            router, tokens, labels, modeling.kappa_schedule(c), tc, mask_id=data.vocab_size,
            batch_size=opt.batch_size, data_seed=c.seed, checkpoint_dir=ctx.run.checkpoints(stage),
            desc=stage, stop_after=stop_after, progress=ctx.progress, **metrics_kwargs(ctx, stage))
        return finish_training(ctx, stage, router, result, tc, opt.batch_size, len(tokens), t0=t0)

    def evaluate(self, ctx: Context, data: TextData) -> dict:
        return evaluate.evaluate(ctx, data)

    def write_report(self, ctx: Context, data: TextData, results: dict) -> dict:
        return report.write_report(ctx, results)

    def print_summary(self, rep: dict) -> None:
        report.print_summary(rep)

    def plan_model(self, config, vocab: int | None = None):
        """`Task.plan_model`: the vocabulary is ``data.vocab_size`` unless `vocab` is given."""
        from experiments.engine.plan import Dims, kv_dim

        v = vocab if vocab is not None else config.data.vocab_size
        dc = modeling.decoder_config(config, v)
        dims = Dims(seq_len=config.data.seq_len, hidden=dc.hidden_size, intermediate=dc.intermediate_size,
                    layers=dc.num_layers, heads=dc.num_heads, kv_dim=kv_dim(dc), vocab=dc.output_size or dc.vocab_size)
        return (lambda: modeling.new_model(config, v, config.seed)), dims

    def export(self, ctx: Context, data: TextData) -> dict:
        """``<run>/export/dense`` and ``<run>/export/decentralized`` (`experiments.text.export`; AR only)."""
        from experiments.text import export

        return export.export(ctx, data)
