"""The multimodal job as a `Task`: LLaVA-style experts (ViT + projector + decoder) on images.

Data: LLaVA-format records (the default digits / shapes / photos dataset, or LLaVA JSON(L) /
InternVL meta.json files; `experiments.mllm.data`). Stage 1 ("stage1"): alignment on all
conversations, tower + projector + LM (`[stage1] train`). Partition: the patch-mean features of
the stage-1 tower's layer that the projector reads (`modeling.image_features`; the tower stays
frozen from here on, so the same features route at inference), so the partition needs stage 1.
Stage 2: instruction tuning of the dense model and the experts. Evaluation: greedy answers and
answer NLL of every system (`experiments.mllm.evaluate`); export: HF LLaVA directories and the
decentralized directory (`dfm.hf`). See docs/multimodal.md.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.engine.config import StageConfig
from experiments.engine.memory import count_parameters, training_memory_bytes
from experiments.engine.rundir import atomic_save_npz, read_json
from experiments.engine.stages import Context, expert_names, load_assignments, load_stage_model
from experiments.engine.task import PartitionInput, Task, UsageError
from experiments.mllm import evaluate, modeling, report
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.mllm.data import MultimodalData, load_data


class MultimodalTask(Task):
    """The multimodal job (`task = "mllm"`)."""

    name = "mllm"
    config_class = MultimodalExperimentConfig
    stage1 = "stage1"
    partition_needs_stage1 = True
    has_export = True

    def with_schedule(self, config, schedule):
        if schedule not in (None, "ar"):
            raise UsageError("--schedule: the multimodal job is autoregressive (LLaVA); drop --schedule")
        return config

    def prepare_data(self, ctx: Context) -> MultimodalData:
        return load_data(ctx.config, ctx.run.root, modeling.num_image_tokens(ctx.config), log=ctx.log)

    def num_train_examples(self, data: MultimodalData) -> int:
        return len(data.arrays["tokens"])

    def num_train_units(self, data: MultimodalData) -> int:
        return len(data.arrays["images_train"])

    def training_memory_bytes(self, ctx: Context, data: MultimodalData) -> int:
        """The decoder's estimate at `data.max_length` (image tokens included) plus the tower's
        parameters (its activations are small next to the decoder's at these sizes)."""
        c = ctx.config
        params = count_parameters(lambda: self.new_model(ctx, data))
        batch = max(c.stage1.batch_size, c.stage2.batch_size)
        return training_memory_bytes(params, batch=batch, seq_len=c.data.max_length, hidden=c.text.hidden_size,
                                     layers=c.text.num_layers, heads=c.text.num_heads, vocab=data.vocab_size)

    def partition_input(self, ctx: Context, data: MultimodalData, stage1_model) -> PartitionInput:
        """Pooled stage-1 tower features of every image (saved as features.npz for routing)."""
        a, bs = data.arrays, ctx.config.eval.batch_size
        feats = {s: modeling.image_features(stage1_model, a[f"images_{s}"], bs) for s in ("train", "val", "test")}
        atomic_save_npz(ctx.run.partition / "features.npz", **feats)
        return PartitionInput(feats, a["image"], "images", "conversations")

    def new_model(self, ctx: Context, data: MultimodalData):
        mconfig = modeling.model_config(ctx.config, data.vocab_size, data.image_token_id)
        return modeling.new_model(mconfig, ctx.config.seed)

    def loss_fn(self, ctx: Context, data: MultimodalData):
        return modeling.llava_loss

    def batch_fn(self, ctx: Context, data: MultimodalData, index: np.ndarray, batches):
        a = data.arrays
        tokens, mask, images, image_of = a["tokens"][index], a["loss_mask"][index], a["images_train"], a["image"][index]

        def batch(step):
            rows = batches.indices(step)
            return {"tokens": jnp.asarray(tokens[rows]), "mask": jnp.asarray(mask[rows]),
                    "pixels": jnp.asarray(modeling.pixels(images[image_of[rows]]))}

        return batch

    def frozen(self, stage_config: StageConfig) -> tuple[str, ...]:
        return modeling.frozen_prefixes(stage_config.train)

    def stage_marker(self, ctx: Context, stage: str, steps: int, batch_size: int) -> dict:
        return {"train": self.stage_config(ctx.config, stage).train}

    def evaluate(self, ctx: Context, data: MultimodalData) -> dict:
        return evaluate.evaluate(ctx, data)

    def write_report(self, ctx: Context, data: MultimodalData, results: dict) -> dict:
        return report.write_report(ctx, results, data.arrays["images_test"])

    def print_summary(self, rep: dict) -> None:
        report.print_summary(rep)

    def plan_model(self, config, vocab: int | None = None):
        """`Task.plan_model`: the vocabulary is ``data.vocab_size + 1`` (the ``<image>`` token)
        unless `vocab` is given."""
        from experiments.engine.plan import Dims, kv_dim

        v = vocab if vocab is not None else config.data.vocab_size + 1
        mconfig = modeling.model_config(config, v, image_token_id=v - 1)
        t, vis = mconfig.text, mconfig.vision
        dims = Dims(seq_len=config.data.max_length, hidden=t.hidden_size, intermediate=t.intermediate_size,
                    layers=t.num_layers, heads=t.num_heads, kv_dim=kv_dim(t), vocab=t.output_size or t.vocab_size,
                    vision={"seq_len": (vis.image_size // vis.patch_size) ** 2 + 1, "hidden": vis.hidden_size,
                            "layers": vis.num_layers, "heads": vis.num_heads})
        return (lambda: modeling.new_model(mconfig, config.seed)), dims

    def export(self, ctx: Context, data: MultimodalData) -> dict:
        """The trained models as HF directories (`dfm.hf`, docs/checkpoints.md).

        ``<run>/hf/dense`` and ``<run>/hf/stage1``: LLaVA directories (`LlavaForConditionalGeneration`
        loads them; our tokenizer inside). ``<run>/decentralized``: the K experts, the partition and
        the top-k centroid router with the temperature fitted at evaluation
        (`dfm.hf.load_decentralized` rebuilds the ensemble).
        """
        from dfm.decentral import CentroidRouter, Partition
        from dfm.hf import save_decentralized, save_pretrained

        c, tok_dir = ctx.config, ctx.run.root / "tokenizer"
        out = {}
        for stage in ("stage1", "dense"):
            out[stage] = str(save_pretrained(load_stage_model(ctx, data, stage), ctx.run.root / "hf" / stage,
                                             tokenizer=tok_dir, overwrite=True))
        if ctx.skip_experts:
            ctx.log(f"[export] expert(s) {list(ctx.skip_experts)} skipped: no decentralized directory written")
            return out | {"decentralized": None, "skipped_experts": list(ctx.skip_experts)}
        partition = Partition.load(ctx.run.partition / "partition.npz")
        temperature = read_json(ctx.run.report_json)["temperature"]
        router = CentroidRouter(partition, temperature=temperature, top_k=c.eval.top_k)
        experts = [load_stage_model(ctx, data, e) for e in expert_names(c)]
        priors = load_assignments(ctx).priors(c.partition.num_clusters)
        out["decentralized"] = str(save_decentralized(ctx.run.root / "decentralized", experts, partition,
                                                      router=router, priors=priors, tokenizer=tok_dir,
                                                      overwrite=True))
        ctx.log(f"[export] HF directories: {out['dense']}, {out['decentralized']}")
        return out
