"""Read and write the tensors of an HF checkpoint directory with safetensors, as numpy (no torch).

A directory holds either one `model.safetensors` or a sharded checkpoint: `model.safetensors.index.json`
(`{"weight_map": {key: shard file name}}`, as `transformers.PreTrainedModel.save_pretrained` writes
it) plus the shard files. `SafetensorsCheckpoint` opens such a directory (or one `.safetensors`
file) and reads tensors lazily, one key at a time, with `safetensors.safe_open(framework="numpy")`.
bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (numpy has no bf16 of its own;
`ml_dtypes` registers it, and jax uses the same type).

Errors are `CheckpointError` (a ValueError) naming the file, and the key when one is involved: a
missing directory or file, a truncated or corrupt safetensors file (the safetensors header check:
the data must cover the whole file), an index that names a missing shard, a key that is absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from dfm.io import atomic_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: numpy's bfloat16 (importing ml_dtypes registers the name "bfloat16", which reading BF16 tensors needs).
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
#: safetensors dtype codes -> numpy dtype names (bfloat16 through ml_dtypes).
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CheckpointError(ValueError):
    """An HF checkpoint directory, file or tensor that cannot be used; the message names the file
    (and the key or config field when one is involved)."""


class SafetensorsCheckpoint:
    """Lazy, read-only access to the tensors of an HF checkpoint (single file or sharded index).

    Args:
      path: a checkpoint directory (with `model.safetensors.index.json` or `model.safetensors`;
        the index wins when both exist) or one `.safetensors` file.

    Every file is opened (and its header checked) at construction, so a truncated or corrupt file
    fails here; tensor data is read only by `get`. Use as a context manager or call `close`.

    Raises:
      CheckpointError: no such directory / file, no weights file in the directory, an index that
        is not valid JSON or has no `weight_map`, an index naming a shard that does not exist or a
        key that its shard lacks, a truncated or corrupt safetensors file (naming the file).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self._handles: dict[Path, object] = {}
        self._key_file: dict[str, Path] = {}
        if path.is_file():
            self.index_file = None
            self._single = path
            self._add_file(path, None)
        elif path.is_dir():
            index, single = path / INDEX_FILE, path / SINGLE_FILE
            if index.is_file():
                self.index_file = index
                self._read_index(index)
            elif single.is_file():
                self.index_file = None
                self._single = single
                self._add_file(single, None)
            else:
                raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in this directory")
        else:
            raise CheckpointError(f"{path}: no such checkpoint directory or file")

    # ------------------------------------------------------------------ opening
    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: safetensors file does not exist")
            try:
                self._handles[file] = safe_open(os.fspath(file), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from e
        return self._handles[file]

    def _add_file(self, file: Path, keys: Iterable[str] | None) -> None:
        handle = self._open(file)
        present = set(handle.keys())
        for key in (present if keys is None else keys):
            if key not in present:
                where = f" (listed in {self.index_file})" if self.index_file else ""
                raise CheckpointError(f"{file}: missing tensor {key!r}{where}")
            self._key_file[key] = file

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from e
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: no 'weight_map' object") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor keys to shard file names")
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(str(name), []).append(key)
        for name, keys in sorted(by_file.items()):
            shard = index.parent / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {name!r} (holding {keys[0]!r}) does not exist")
            self._add_file(shard, keys)

    # ------------------------------------------------------------------ queries
    def keys(self) -> list[str]:
        """All tensor keys, sorted."""
        return sorted(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def __len__(self) -> int:
        return len(self._key_file)

    @property
    def source(self) -> Path:
        """The file that names the keys: the index of a sharded checkpoint, else the single file."""
        return self.index_file if self.index_file is not None else self._single

    def file_of(self, key: str) -> Path:
        """The safetensors file holding `key`. Raises CheckpointError (file + key) when absent."""
        if key not in self._key_file:
            raise CheckpointError(f"{self.source}: missing tensor {key!r}")
        return self._key_file[key]

    def dtype(self, key: str) -> str:
        """numpy dtype name of `key` as stored (e.g. "bfloat16", "float32")."""
        code = self._open(self.file_of(key)).get_slice(key).get_dtype()
        return DTYPES.get(code, code)

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of `key`."""
        return tuple(self._open(self.file_of(key)).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array in its stored dtype (bf16 as `ml_dtypes.bfloat16`).

        Raises:
          CheckpointError: `key` absent (naming the index or file and the key), or its bytes cannot
            be read (naming the file and key).
        """
        file = self.file_of(key)
        try:
            return self._open(file).get_tensor(key)
        except (SafetensorError, OSError, TypeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from e

    def floating_dtype(self) -> str | None:
        """The dtype shared by all floating tensors, "float32" when they differ, None when there are none."""
        kinds = {self.dtype(k) for k in self._key_file} & {"float64", "float32", "float16", "bfloat16"}
        if not kinds:
            return None
        return kinds.pop() if len(kinds) == 1 else "float32"

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (numpy arrays; bf16 as `ml_dtypes.bfloat16`) to one safetensors file, atomically.

    `metadata` defaults to `{"format": "pt"}`, which transformers expects of PyTorch-layout files.

    Raises:
      OSError: the disk is full, over quota or read-only (`dfm.io.disk_fault`; safetensors reports
        it as a `SafetensorError`), naming `path`; nothing is left under `path` or beside it.
    """
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
