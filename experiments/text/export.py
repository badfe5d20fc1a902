"""The text job's export stage: the trained models as HF directories (`dfm.hf`, docs/checkpoints.md).

``<run>/export/dense``: the dense model as an HF Llama directory (`LlamaForCausalLM`; a Qwen2
checkpoint given as ``model.init_from`` exports as `Qwen2ForCausalLM`) with the run's tokenizer
(`tokenizer.json`, `AutoTokenizer` loads it) and a chat template: `CHAT_TEMPLATE` for the job's own
BPE; with ``model.init_from`` the checkpoint's tokenizer and its own chat template (or
`CHAT_TEMPLATE` when it has none), with its BOS token declared when it had none (Qwen2: the
``<|endoftext|>`` the job reads sequences with, `experiments.engine.tokenizer.special_token_ids`;
`dfm.DecentralizedModel` needs one).
``<run>/export/decentralized``: `dfm.hf.save_decentralized` of the K experts (each an HF Llama
directory with the tokenizer), the partition, the tf-idf + SVD featurizer (arrays + JSON) and the
top-k centroid router with the temperature fitted at evaluation (THEORY S12, S13);
`dfm.DecentralizedModel.load` turns it into one object with `route` / `score` / `generate`.

Only the AR schedule exports: a masked-schedule decoder is bidirectional, which HF's Llama is not
(the stage logs the reason and records it).

Every directory is built under a temporary name in ``<run>/export`` (``.tokenizer.tmp*`` for the
tokenizer both exports copy, ``.dense.tmp*``, ``.decentralized.tmp*``) and removed on failure; what
a killed export left is removed when the export stage next starts (`RunDir.remove_temporaries`).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dfm.decentral import CentroidRouter, Partition, TextFeaturizer
from dfm.hf import save_decentralized, save_pretrained
from dfm.io import raise_naming
from experiments.engine.graph import expert_names, load_assignments
from experiments.engine.rundir import RunDir, load_file, read_json
from experiments.engine.training import load_stage_model
from experiments.text.config import ExperimentConfig
from experiments.text.data import TextData
from experiments.text.modeling import new_model

#: The exported tokenizers' chat template (Jinja, in tokenizer_config.json): a plain
#: "### User / ### Assistant" layout (the vocabulary has no chat special tokens, so no ChatML).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def featurizer_path(partition_dir: Path) -> Path:
    """The run's featurizer file: ``featurizer.npz`` (arrays + JSON), else a legacy ``featurizer.pkl``."""
    new = partition_dir / "featurizer.npz"
    return new if new.is_file() or not (partition_dir / "featurizer.pkl").is_file() else partition_dir / "featurizer.pkl"


def export_tokenizer(tokenizer, directory: Path, *, pretrained: bool = False, bos_id: int | None = None) -> Path:
    """`tokenizer` with a chat template, saved (`tokenizer.json` + `tokenizer_config.json` holding
    the template) into `directory`.

    Args:
      pretrained: a checkpoint's tokenizer (``model.init_from``): its own chat template is kept
        (`CHAT_TEMPLATE` only when it has none); else `CHAT_TEMPLATE` is set.
      bos_id: the BOS id the job used; declared as the tokenizer's ``bos_token`` when it has none
        (this changes no encoding: transformers adds no BOS to such a tokenizer's input).

    Raises:
      OSError: the disk is full, over quota or read-only (`dfm.io.disk_fault`; `tokenizers` reports
        it without a path), naming `directory`.
    """
    if not pretrained or not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.bos_token is None and bos_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(int(bos_id))
    try:
        tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    except Exception as exc:  # noqa: BLE001 - only a disk fault is renamed; anything else re-raised as is
        raise_naming(exc, directory)
        raise
    return directory


def export(config: ExperimentConfig, run: RunDir, data: TextData, *, skip_experts: tuple[int, ...] = (),
           log=print) -> dict:
    """Write ``<run>/export/dense`` and ``<run>/export/decentralized`` (module doc; with experts
    `skip_experts` left out, no decentralized directory); returns the stage's marker info (the
    directories, or the reason nothing was written)."""
    c = config
    if c.schedule != "ar":
        reason = ("masked schedule: the decoders are bidirectional and HF's LlamaForCausalLM is causal, so "
                  "there is no HF model to export them to")
        log(f"[export] skipped: {reason}")
        return {"dense": None, "decentralized": None, "skipped": reason}
    out_dir = run.root / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tokenizer.tmp"))

    def factory():
        return new_model(c, data.vocab_size, c.seed)

    try:
        tok_dir = export_tokenizer(data.tokenizer, tmp, pretrained=bool(c.model.init_from), bos_id=data.bos_id)
        out = {"dense": str(save_pretrained(load_stage_model(run, "dense", factory), out_dir / "dense",
                                            tokenizer=tok_dir, overwrite=True))}
        if skip_experts:
            log(f"[export] expert(s) {list(skip_experts)} skipped: no decentralized directory written")
            return out | {"decentralized": None, "skipped_experts": list(skip_experts)}
        partition = load_file(run.partition / "partition.npz", Partition.load, "partition")
        featurizer = load_file(featurizer_path(run.partition), TextFeaturizer.load, "featurizer")
        ev = read_json(run.report_json)["eval"]
        router = CentroidRouter(partition, temperature=float(ev["centroid_topk_temperature"]),
                                top_k=min(int(ev["top_k"]), partition.num_clusters))
        experts = [load_stage_model(run, e, factory) for e in expert_names(c)]
        priors = load_assignments(run, c.partition.num_clusters).priors(c.partition.num_clusters)
        out["decentralized"] = str(save_decentralized(out_dir / "decentralized", experts, partition, router=router,
                                                      priors=priors, featurizer=featurizer, tokenizer=tok_dir,
                                                      overwrite=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[export] HF directories: {out['dense']}, {out['decentralized']}")
    return out
