"""Export our NNX models to an HF model directory that transformers loads (`from_pretrained`).

`save_pretrained(model, path)` writes `config.json` (through transformers' config classes, so the
fields are the installed version's) and `model.safetensors` (torch layout, `{"format": "pt"}`
metadata), plus the tokenizer when one is given. The directory is built beside `path` and renamed
into place, so `path` never holds a half-written checkpoint.

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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from dfm.hf import vision_io
from dfm.hf.configs import CONFIG_FILE, decoder_config_to_hf
from dfm.hf.mapping import DECODER_RULES
from dfm.hf.safetensors_io import SINGLE_FILE, write_safetensors
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


def save_pretrained(model: nnx.Module, path: str | os.PathLike, *, dtype: str | None = None,
                    tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` to the HF directory `path` (config.json + model.safetensors [+ tokenizer]).

    Args:
      model: `dfm.models.Decoder` (-> Llama, or Qwen2 when `attention_bias`), CLIP vision tower,
        or `MultimodalModel` (-> LLaVA / InternVL).
      path: target directory.
      dtype: store parameters in this dtype ("bfloat16", "float32", ...); None: as they are.
      tokenizer: optional transformers tokenizer / processor (`.save_pretrained(dir)`) or the
        path of a directory whose files are copied in.
      overwrite: replace an existing non-empty `path` (else FileExistsError).

    Returns:
      `Path(path)`.

    Raises:
      FileExistsError: `path` exists, is not empty and `overwrite` is False.
      TypeError: a model of another class.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path}: exists and is not empty (pass overwrite=True to replace it)")
    config, tensors = export_contents(model, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        write_safetensors(tmp / SINGLE_FILE, tensors)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        default_permissions(tmp)
        swap_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        if not source.is_dir():
            raise FileNotFoundError(f"tokenizer: {source} is not a directory")
        for file in source.iterdir():
            if file.is_file() and file.name not in (CONFIG_FILE, SINGLE_FILE):
                shutil.copy2(file, directory / file.name)
    else:
        tokenizer.save_pretrained(os.fspath(directory))


def default_permissions(directory: Path) -> None:
    """Give the temporary directory and its files the usual umask permissions (mkdtemp / mkstemp use 0o700 / 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is first moved aside and deleted after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old"))
    os.rmdir(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
