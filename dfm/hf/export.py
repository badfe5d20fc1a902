"""Export our NNX models to an HF model directory that transformers loads (`from_pretrained`).

`save_pretrained(model, path)` writes `config.json` (through transformers' config classes, so the
fields are the installed version's) and `model.safetensors` (torch layout, `{"format": "pt"}`
metadata), plus the tokenizer when one is given. Weights larger than `max_shard_size` (default
"5GB", as transformers) are split by huggingface_hub's `split_state_dict_into_shards_factory` into
`model-00001-of-0000n.safetensors` ... plus `model.safetensors.index.json` (`{"metadata":
{"total_size": bytes}, "weight_map": {key: shard file}}`), the layout
`transformers.PreTrainedModel.save_pretrained` writes and `dfm.hf.SafetensorsCheckpoint` reads.
The directory is built beside `path` (``.<name>.tmp*``, `dfm.io.atomic_dir`) and renamed into
place, so `path` never holds a half-written checkpoint; a full, over-quota or read-only disk raises
an `OSError` naming `path` and leaves the temporary directory removed and an existing `path` as it
was.

A decoder with stacked layers (`scan_layers=True`) is written per layer, as HF stores it; the
runtime-only config fields (`dfm.hf.configs.RUNTIME_FIELDS`: attention, matmul_precision, remat,
scan_layers) are not written, and `load_pretrained` chooses them again.

A decoder with `output_size < vocab_size` and its own `lm_head` gets zero rows appended to
`lm_head.weight` up to `vocab_size` (transformers' `LlamaForCausalLM` needs `[vocab_size, hidden]`);
the `"dfm"` config object records `output_size`, and `dfm.hf.load_pretrained` drops the rows again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from dfm.hf import vision_io
from dfm.io import atomic_dir, default_permissions, swap_into_place  # noqa: F401 - re-exported (dfm.hf.experts)
from dfm.hf.configs import CONFIG_FILE, decoder_config_to_hf
from dfm.hf.mapping import DECODER_RULES
from dfm.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, write_safetensors
from dfm.hf.weights import hf_state_dict


def decoder_state_dict(model, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF `LlamaForCausalLM` / `Qwen2ForCausalLM` state dict of a `Decoder` (lm_head padded, module
    doc). A model with stacked layers (`config.scan_layers`) is unstacked first (`layers.{i}.` keys)."""
    from dfm.models import unstack_layers

    if model.config.scan_layers:
        model = unstack_layers(model)
    c = model.config
    tensors = hf_state_dict(model, DECODER_RULES, dtype=dtype)
    head = tensors.get("lm_head.weight")
    if head is not None and head.shape[0] < c.vocab_size:
        pad = np.zeros((c.vocab_size - head.shape[0], head.shape[1]), head.dtype)
        tensors["lm_head.weight"] = np.concatenate([head, pad], axis=0)
    return tensors


def export_contents(model: nnx.Module, *, dtype: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """`(config dict, tensors)` of `model`: a `Decoder`, `CLIPVisionTower` or `MultimodalModel`.

    Raises TypeError for any other model.
    """
    from dfm.models import Decoder

    if isinstance(model, Decoder):
        config = decoder_config_to_hf(model.config, torch_dtype=dtype or model.config.param_dtype)
        return config, decoder_state_dict(model, dtype=dtype)
    return vision_io.export_contents(model, dtype=dtype)


#: transformers' default `max_shard_size`.
DEFAULT_MAX_SHARD_SIZE = "5GB"
SHARD_PATTERN = "model{suffix}.safetensors"


def _tensor_bytes(array: np.ndarray) -> int:
    return int(np.asarray(array).nbytes)


def shard_plan(tensors: dict[str, np.ndarray], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
    """huggingface_hub's `StateDictSplit` of `tensors` (numpy) under `max_shard_size` (bytes, or a
    string such as "5GB" / "200MB"): `.filename_to_tensors`, `.tensor_to_filename`, `.is_sharded`,
    `.metadata` (`total_size`). Files are `model.safetensors` (one shard) or
    `model-0000i-of-0000n.safetensors`. A tensor larger than the limit gets a shard of its own.

    Raises ImportError (naming huggingface_hub) when it is not installed.
    """
    try:
        from huggingface_hub import split_state_dict_into_shards_factory
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise ImportError("sharded export needs huggingface_hub (`pip install huggingface_hub`; transformers "
                          "installs it)") from e
    return split_state_dict_into_shards_factory(tensors, get_storage_size=_tensor_bytes,
                                                get_storage_id=lambda _: None, filename_pattern=SHARD_PATTERN,
                                                max_shard_size=max_shard_size)


def write_weights(directory: Path, tensors: dict[str, np.ndarray],
                  max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write `tensors` into `directory`: one `model.safetensors`, or shards + index when they exceed
    `max_shard_size` (None: never shard). Returns the file names written."""
    total = sum(_tensor_bytes(t) for t in tensors.values())
    if max_shard_size is None or (isinstance(max_shard_size, int) and total <= max_shard_size):
        write_safetensors(directory / SINGLE_FILE, tensors)
        return [SINGLE_FILE]
    plan = shard_plan(tensors, max_shard_size)
    if not plan.is_sharded:
        write_safetensors(directory / SINGLE_FILE, tensors)
        return [SINGLE_FILE]
    for name, keys in plan.filename_to_tensors.items():
        write_safetensors(directory / name, {k: tensors[k] for k in keys})
    index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(plan.tensor_to_filename.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*plan.filename_to_tensors, INDEX_FILE]


def save_pretrained(model: nnx.Module, path: str | os.PathLike, *, dtype: str | None = None,
                    tokenizer: Any = None, overwrite: bool = False,
                    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` to the HF directory `path` (config.json + model.safetensors or shards [+ tokenizer]).

    Args:
      model: `dfm.models.Decoder` (-> Llama, or Qwen2 when `attention_bias`), CLIP vision tower,
        or `MultimodalModel` (-> LLaVA / InternVL).
      path: target directory.
      dtype: store parameters in this dtype ("bfloat16", "float32", ...); None: as they are.
      tokenizer: optional transformers tokenizer / processor (`.save_pretrained(dir)`) or the
        path of a directory whose files are copied in.
      overwrite: replace an existing non-empty `path` (else FileExistsError).
      max_shard_size: largest weights file, bytes or a string ("5GB", "200MB"; huggingface_hub's
        parsing); above it the weights are sharded with an index (module doc). None: one file.

    Returns:
      `Path(path)`.

    Raises:
      FileExistsError: `path` exists, is not empty and `overwrite` is False.
      TypeError: a model of another class.
      OSError: the disk is full, over quota or read-only (`dfm.io.disk_fault`), naming `path`.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path}: exists and is not empty (pass overwrite=True to replace it)")
    config, tensors = export_contents(model, dtype=dtype)
    with atomic_dir(path) as tmp:
        write_weights(tmp, tensors, max_shard_size)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        if not source.is_dir():
            raise FileNotFoundError(f"tokenizer: {source} is not a directory")
        for file in source.iterdir():
            if file.is_file() and file.name != CONFIG_FILE and not file.name.endswith(
                    (".safetensors", ".safetensors.index.json")):
                shutil.copy2(file, directory / file.name)
    else:
        tokenizer.save_pretrained(os.fspath(directory))
