"""The text job as a `Task`: dense vs decentralized experts on the Python standard library's docs.

Data: the stdlib corpus split by document (`experiments.text.corpus`, `.data`), a byte-level BPE
trained on train, documents cut into full chunks of ``data.seq_len`` tokens (the training
examples). Partition: tf-idf + TruncatedSVD features of the train documents (c-BTM;
`dfm.decentral.TextFeaturizer`), so the partition does not need stage 1 ("base"). Model: a
LLaMA-style `dfm.models.Decoder`, causal under the AR schedule (loss `dfm.losses.ar_nll`, THEORY
S5) or a bidirectional denoiser under the masked schedule (`dfm.losses.dfm_loss`, S4); the masked
schedule adds the learned router (THEORY S10) as an extra stage (`ExperimentConfig.extra_stages`).
Evaluation and report: `experiments.text.evaluate`, `.report`; export (AR): `experiments.text.export`.
See docs/main_job.md.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from dfm.decentral import TextFeaturizer, train_learned_router
from dfm.train import TrainConfig
from experiments.engine.graph import load_assignments, training_stages
from experiments.engine.memory import count_parameters, training_memory_bytes
from experiments.engine.plan import Dims, kv_dim
from experiments.engine.rundir import RunDir
from experiments.engine.task import DataError, PartitionInput, StageBatches, Task
from experiments.engine.training import finish_training, metrics_kwargs
from experiments.text import evaluate, export, modeling, report
from experiments.text.config import STAGE1, ExperimentConfig
from experiments.text.data import TextData, load_data

#: validation sequences per model selection at most (evenly spaced over the selected ones)
MAX_VALIDATION_SEQUENCES = 512


class TextTask(Task):
    """The text job (`task = "text"`, the default)."""

    name = "text"
    config_class = ExperimentConfig
    stage1 = STAGE1
    has_export = True

    def prepare_data(self, config: ExperimentConfig, run: RunDir, *, log=print) -> TextData:
        return load_data(config, run, log=log)

    def training_memory_bytes(self, config: ExperimentConfig, data: TextData) -> int:
        c = config
        params = count_parameters(lambda: modeling.new_model(c, data.vocab_size, c.seed))
        batch = max(getattr(c, self.stage1).batch_size, c.stage2.batch_size)
        dc = modeling.decoder_config(c, data.vocab_size)      # the checkpoint's sizes with model.init_from
        return training_memory_bytes(params, batch=batch, seq_len=c.data.seq_len, hidden=dc.hidden_size,
                                     layers=dc.num_layers, heads=dc.num_heads, vocab=data.vocab_size)

    def partition_input(self, config: ExperimentConfig, run: RunDir, data: TextData,
                        stage1_model=None) -> PartitionInput:
        """tf-idf + SVD features of whole documents (fitted on train; saved as featurizer.npz,
        arrays + JSON, for the centroid routers at evaluation and the export)."""
        pc = config.partition
        featurizer = TextFeaturizer(n_components=pc.svd_dim, seed=pc.seed, max_features=pc.max_features)
        try:
            featurizer.fit(data.splits["train"].texts)
        except ValueError as e:           # too few distinct words for svd_dim, or only stop words
            raise DataError(f"[partition] svd_dim = {pc.svd_dim}: the train documents cannot give that many "
                            f"tf-idf + SVD features ({e}); lower svd_dim or use a larger corpus") from None
        features = {"train": featurizer.transform(data.splits["train"].texts)}
        for name in ("val", "test"):
            features[name] = featurizer.transform(data.splits[name].texts)
        run.partition.mkdir(parents=True, exist_ok=True)
        featurizer.save(run.partition / "featurizer.npz")
        return PartitionInput(features, data.sequences["train"].doc, "documents", "sequences")

    def new_model(self, config: ExperimentConfig, data: TextData):
        return modeling.new_model(config, data.vocab_size, config.seed)

    def loss_fn(self, config: ExperimentConfig, data: TextData):
        return modeling.training_loss_fn(config, data.vocab_size, data.bos_id)

    def stage_batches(self, config: ExperimentConfig, data: TextData, index: np.ndarray, batches, *,
                      log=print) -> StageBatches:
        """The train sequences `index`; the marker counts training tokens = steps x batch_size x
        seq_len (every position is a target of the loss)."""
        tokens = data.sequences["train"].tokens[index]
        seq_len = config.data.seq_len
        return StageBatches(lambda step: jnp.asarray(tokens[batches.indices(step)]),
                            {"seq_len": seq_len, "train_tokens": int(batches.steps * batches.batch_size * seq_len)})

    def validation_batches(self, config: ExperimentConfig, data: TextData, units: np.ndarray | None) -> list:
        """The validation sequences of the documents `units` (None = all validation documents), at
        most the first ``eval.max_scored_per_doc + 1`` chunks of each document (as the test scoring
        reads them; 0 = all) and at most `MAX_VALIDATION_SEQUENCES` in all (evenly spaced), in
        batches of ``eval.batch_size``."""
        seqs = data.sequences["val"]
        keep = np.ones(len(seqs), bool) if units is None else np.isin(seqs.doc, units)
        per_doc = config.eval.max_scored_per_doc
        if per_doc:
            keep &= seqs.chunk <= per_doc
        rows = np.flatnonzero(keep)
        if len(rows) > MAX_VALIDATION_SEQUENCES:
            rows = rows[np.linspace(0, len(rows) - 1, MAX_VALIDATION_SEQUENCES).round().astype(np.int64)]
        bs = config.eval.batch_size
        return [jnp.asarray(seqs.tokens[rows[i:i + bs]]) for i in range(0, len(rows), bs)]

    def run_extra(self, config: ExperimentConfig, run: RunDir, data: TextData, stage: str, *, progress: bool = True,
                  log=print, stop_after: int | None = None) -> dict | None:
        """The learned router (masked schedule; THEORY S10) on noised train sequences and their clusters."""
        c = config
        labels = load_assignments(run, c.partition.num_clusters).examples()
        steps, opt = c.router.steps, c.router
        tc = TrainConfig(steps=steps, learning_rate=opt.learning_rate, warmup_steps=min(steps, max(1, steps // 10)),
                         weight_decay=0.0, seed=c.seed + 7, checkpoint_every=max(1, steps // 2),
                         log_every=max(1, steps // 50))
        t0 = time.perf_counter()
        router = modeling.router_factory(c, data.vocab_size)()
        tokens = data.sequences["train"].tokens
        result = train_learned_router(
            router, tokens, labels, modeling.kappa_schedule(c), tc, mask_id=data.vocab_size,
            batch_size=opt.batch_size, data_seed=c.seed, checkpoint_dir=run.checkpoints(stage),
            desc=stage, stop_after=stop_after, progress=progress, **metrics_kwargs(run, stage))
        return finish_training(run, stage, router, result, tc, opt.batch_size, len(tokens), log=log, t0=t0)

    def evaluate(self, config: ExperimentConfig, run: RunDir, data: TextData, *, skip_experts: tuple[int, ...] = (),
                 progress: bool = True) -> dict:
        """`experiments.text.evaluate.evaluate`, then `experiments.text.report.write_report`."""
        stages = training_stages(config, self.stage1, skip_experts)
        results = evaluate.evaluate(config, run, data, stages, skip_experts=skip_experts, progress=progress)
        return report.write_report(config, run, results, stages)

    def print_summary(self, rep: dict) -> None:
        report.print_summary(rep)

    def plan_model(self, config, vocab: int | None = None):
        """`Task.plan_model`: the vocabulary is ``data.vocab_size`` unless `vocab` is given."""
        v = vocab if vocab is not None else config.data.vocab_size
        dc = modeling.decoder_config(config, v)
        dims = Dims(seq_len=config.data.seq_len, hidden=dc.hidden_size, intermediate=dc.intermediate_size,
                    layers=dc.num_layers, heads=dc.num_heads, kv_dim=kv_dim(dc), vocab=dc.output_size or dc.vocab_size)
        return (lambda: modeling.new_model(config, v, config.seed)), dims

    def export(self, config: ExperimentConfig, run: RunDir, data: TextData, *, skip_experts: tuple[int, ...] = (),
               log=print) -> dict:
        """``<run>/export/dense`` and ``<run>/export/decentralized`` (`experiments.text.export`; AR only)."""
        return export.export(config, run, data, skip_experts=skip_experts, log=log)
