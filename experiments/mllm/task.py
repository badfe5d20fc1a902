"""The multimodal job as a `Task`: LLaVA-style experts (ViT + projector + decoder) on images.

Data: LLaVA-format records (the default digits / shapes / photos dataset, or LLaVA JSON(L) /
InternVL meta.json files; `experiments.mllm.data`). Stage 1 ("stage1"): alignment on all
conversations, tower + projector + LM (`[stage1] train`), from random init or from a pretrained
LLaVA / InternVL checkpoint (``init_from``, `experiments.mllm.pretrained`: its weights, tokenizer,
chat template and image-token layout). Partition (`experiments.mllm.routing`): the patch-mean
features of the stage-1 tower's layer that the projector reads (``partition.features = "tower"``;
the tower stays frozen from here on, so the same features route at inference), or the CLIP image
embeddings of a CLIP checkpoint (``"clip:<dir>"``, independent of stage 1: the partition then runs
before it, `PartitionSection.needs_stage1`). Stage 2: instruction tuning of the
dense model and the experts. Evaluation: greedy answers and answer NLL of every system, routed by
the partition stage's ``features.npz`` (`experiments.mllm.evaluate`); export: HF LLaVA / InternVL
directories and the decentralized directory (`dfm.hf`) with ``routing_features.json``. See
docs/multimodal.md.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dfm.decentral import CentroidRouter, Partition
from dfm.hf import save_decentralized, save_pretrained
from experiments.engine.graph import expert_names, load_assignments, stage_section, training_stages
from experiments.engine.memory import count_parameters, training_memory_bytes
from experiments.engine.plan import Dims, kv_dim
from experiments.engine.rundir import RunDir, atomic_save_npz, read_json
from experiments.engine.task import PartitionInput, StageBatches, Task
from experiments.engine.training import load_stage_model
from experiments.mllm import evaluate, modeling, packing, report
from experiments.mllm.config import STAGE1, MultimodalExperimentConfig
from experiments.mllm.data import MultimodalData, load_data
from experiments.mllm.pretrained import ignored_settings, read_checkpoint
from experiments.mllm.routing import partition_features, write_featurizer_record
from experiments.mllm.validation import validation_batches


class MultimodalTask(Task):
    """The multimodal job (`task = "mllm"`)."""

    name = "mllm"
    config_class = MultimodalExperimentConfig
    stage1 = STAGE1
    has_export = True

    def prepare_data(self, config: MultimodalExperimentConfig, run: RunDir, *, log=print) -> MultimodalData:
        c = config
        if c.init_from and not run.data_summary.is_file():
            ignored = ignored_settings(c)
            log(f"[data] init_from {c.init_from}: the checkpoint's architecture, tokenizer and image size"
                + (f"; ignored settings: {', '.join(ignored)}" if ignored else ""))
        return load_data(c, run.root, modeling.num_image_tokens(c), log=log)

    def training_memory_bytes(self, config: MultimodalExperimentConfig, data: MultimodalData) -> int:
        """The decoder's estimate at `data.max_length` (image tokens included; with packed sequences
        the worst case, one conversation per row of `data.max_packed_tokens`) plus the tower's
        parameters (its activations are small next to the decoder's at these sizes)."""
        c = config
        params = count_parameters(lambda: self.new_model(c, data))
        batch = max(c.stage1.batch_size, c.stage2.batch_size)
        t = modeling.model_config(c, data.vocab_size, data.image_token_id).text
        seq_len = max(c.data.max_length, c.data.max_packed_tokens)
        return training_memory_bytes(params, batch=batch, seq_len=seq_len, hidden=t.hidden_size,
                                     layers=t.num_layers, heads=t.num_heads, vocab=t.vocab_size)

    def partition_input(self, config: MultimodalExperimentConfig, run: RunDir, data: MultimodalData,
                        stage1_model) -> PartitionInput:
        """Image features of every split (`experiments.mllm.routing.partition_features`: the pooled
        stage-1 tower's, or CLIP's; saved as features.npz, by which the evaluation routes)."""
        a, c = data.arrays, config
        images = {s: a[f"images_{s}"] for s in ("train", "val", "test")}
        feats = partition_features(c, images, stage1_model, c.eval.batch_size, data.pixel_stats)
        atomic_save_npz(run.partition / "features.npz", **feats)
        return PartitionInput(feats, a["image"], "images", "conversations")

    def new_model(self, config: MultimodalExperimentConfig, data: MultimodalData):
        """Random init from the config's seed, or the ``init_from`` checkpoint's weights."""
        return modeling.run_model(config, data.vocab_size, data.image_token_id)

    def loss_fn(self, config: MultimodalExperimentConfig, data: MultimodalData):
        return modeling.training_loss_fn(config.numerics.loss_chunk)

    def stage_batches(self, config: MultimodalExperimentConfig, data: MultimodalData, index: np.ndarray, batches, *,
                      log=print) -> StageBatches:
        """Padded batches `{"tokens", "mask", "pixels"}` of `batches.batch_size` conversations; with
        ``data.max_packed_tokens`` the same conversations packed into a fixed number of rows per
        stage (`experiments.mllm.packing`; planned here over the stage's steps and logged). The
        marker holds the stage's `train` setting and, when packed, the plan's summary
        (`experiments.mllm.packing.PackingPlan.summary`: tokens per step packed vs padded)."""
        a = data.arrays
        tokens, mask, images, image_of = a["tokens"][index], a["loss_mask"][index], a["images_train"], a["image"][index]
        marker = {"train": stage_section(config, self.stage1, batches.stream).train}
        capacity = config.data.max_packed_tokens
        if not capacity:
            def batch(step):
                rows = batches.indices(step)
                return {"tokens": jnp.asarray(tokens[rows]), "mask": jnp.asarray(mask[rows]),
                        "pixels": jnp.asarray(modeling.pixels(images[image_of[rows]], data.pixel_stats))}

            return StageBatches(batch, marker)
        c, pad_id = config, data.summary.get("pad_id")
        lengths = packing.conversation_lengths(tokens, mask, pad_id, data.image_token_id)
        stages, steps = packing.stage_steps_of(c, batches)
        plan = packing.plan_rows(batches, lengths, steps, capacity, c.data.max_length,
                                 groups=c.numerics.microbatches, row_multiple=packing.batch_rows_multiple(c.mesh))
        log(f"[{'/'.join(stages) or 'train'}] packed sequences: {plan.describe()}")

        def packed_batch(step):
            rows = batches.indices(step)
            out = packing.pack_batch(tokens[rows], mask[rows], lengths[rows], images[image_of[rows]],
                                     capacity=capacity, rows=plan.rows, groups=plan.groups,
                                     pad_id=0 if pad_id is None else int(pad_id))
            out["pixels"] = modeling.pixels(out["pixels"], data.pixel_stats)
            return {name: jnp.asarray(value) for name, value in out.items()}

        return StageBatches(packed_batch, marker | {"packing": plan.summary()})

    def validation_batches(self, config: MultimodalExperimentConfig, data: MultimodalData,
                           units: np.ndarray | None) -> list:
        """The validation questions of the images `units` with their reference answers
        (`experiments.mllm.validation`), batches of ``eval.batch_size``."""
        return validation_batches(data, units, config.eval.batch_size)

    def evaluate(self, config: MultimodalExperimentConfig, run: RunDir, data: MultimodalData, *,
                 skip_experts: tuple[int, ...] = (), progress: bool = True) -> dict:
        """`experiments.mllm.evaluate.evaluate`, then `experiments.mllm.report.write_report`."""
        stages = training_stages(config, self.stage1, skip_experts)
        results = evaluate.evaluate(config, run, data, stages, skip_experts=skip_experts, progress=progress)
        return report.write_report(config, run, results, data.arrays["images_test"])

    def print_summary(self, rep: dict) -> None:
        report.print_summary(rep)

    def plan_model(self, config, vocab: int | None = None):
        """`Task.plan_model`: the vocabulary is ``data.vocab_size + 1`` (the ``<image>`` token)
        unless `vocab` is given."""
        if config.init_from:   # the checkpoint's architecture (its vocabulary unless `vocab` is given)
            mconfig = read_checkpoint(config.init_from).model_config(config.numerics)
            if vocab is not None:
                mconfig = mconfig.replace(text=mconfig.text.replace(vocab_size=vocab),
                                          image_token_id=min(mconfig.image_token_id, vocab - 1))
        else:
            v = vocab if vocab is not None else config.data.vocab_size + 1
            mconfig = modeling.model_config(config, v, image_token_id=v - 1)
        t, vis = mconfig.text, mconfig.vision
        seq_len = max(config.data.max_length, config.data.max_packed_tokens)   # packing: worst-case rows
        dims = Dims(seq_len=seq_len, hidden=t.hidden_size, intermediate=t.intermediate_size,
                    layers=t.num_layers, heads=t.num_heads, kv_dim=kv_dim(t), vocab=t.output_size or t.vocab_size,
                    vision={"seq_len": (vis.image_size // vis.patch_size) ** 2 + 1, "hidden": vis.hidden_size,
                            "layers": vis.num_layers, "heads": vis.num_heads})
        return (lambda: modeling.new_model(mconfig, config.seed)), dims   # random init: only traced for shapes

    def export(self, config: MultimodalExperimentConfig, run: RunDir, data: MultimodalData, *,
               skip_experts: tuple[int, ...] = (), log=print) -> dict:
        """The trained models as HF directories (`dfm.hf`, docs/checkpoints.md).

        ``<run>/hf/dense`` and ``<run>/hf/stage1``: LLaVA / InternVL directories
        (`LlavaForConditionalGeneration` / `InternVLForConditionalGeneration` load them; the run's
        tokenizer inside, with its chat template). ``<run>/decentralized``: the K experts, the
        partition and the top-k centroid router with the temperature fitted at evaluation
        (`dfm.hf.load_decentralized` rebuilds the ensemble), plus ``routing_features.json`` naming
        the featurizer the centroids live in (`experiments.mllm.routing.write_featurizer_record`;
        the CLIP checkpoint copied beside it for ``partition.features = "clip:<dir>"``). With
        experts `skip_experts` left out, no decentralized directory is written.
        """
        c, tok_dir = config, run.root / "tokenizer"

        def factory():
            return self.new_model(c, data)

        out = {}
        for stage in ("stage1", "dense"):
            out[stage] = str(save_pretrained(load_stage_model(run, stage, factory), run.root / "hf" / stage,
                                             tokenizer=tok_dir, overwrite=True))
        if skip_experts:
            log(f"[export] expert(s) {list(skip_experts)} skipped: no decentralized directory written")
            return out | {"decentralized": None, "skipped_experts": list(skip_experts)}
        partition = Partition.load(run.partition / "partition.npz")
        temperature = read_json(run.report_json)["temperature"]
        router = CentroidRouter(partition, temperature=temperature, top_k=c.eval.top_k)
        experts = [load_stage_model(run, e, factory) for e in expert_names(c)]
        priors = load_assignments(run, c.partition.num_clusters).priors(c.partition.num_clusters)
        out["decentralized"] = str(save_decentralized(run.root / "decentralized", experts, partition,
                                                      router=router, priors=priors, tokenizer=tok_dir,
                                                      overwrite=True))
        out["routing_features"] = write_featurizer_record(c, run.root / "decentralized",
                                                          partition.centroids.shape[1])
        log(f"[export] HF directories: {out['dense']}, {out['decentralized']}")
        return out
