"""The run directory: file layout, atomic writes, stage completion markers, config pinning.

Layout of ``runs/<config-name>/``::

    resolved.toml            the resolved config (pinned: a later command with another config fails)
    data/                    the task's data stage (data/summary.json is written last)
    tokenizer/               HF tokenizer (AutoTokenizer.from_pretrained)
    partition/               partition.npz (k-means), assignments.json (train / random / val / test),
                             the task's feature files
    checkpoints/<stage>/     orbax checkpoints of a training stage (resume)
    models/<stage>/          final parameters of a finished stage
    stages/<stage>.json      completion marker of a stage: wall time, steps, loss history
    report.json, report.md, plots/*.png

Every file is written to a temporary name in the same directory and moved into place with
`os.replace`, so an interrupted command never leaves a half-written file under a final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from dfm.io import atomic_path, atomic_write_bytes
from experiments.engine.config import ConfigError, JobConfig


class RunDirError(RuntimeError):
    """The run directory cannot be used (unwritable, or pinned to another config)."""


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    """JSON (indent 2, sorted keys off, NaN allowed as in Python's json) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: Path):
    """Parse a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def atomic_save_npz(path: Path, **arrays) -> None:
    """`numpy.savez` to `path` atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


class RunDir:
    """Paths inside one run directory (no I/O at construction)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def resolved(self) -> Path:
        return self.root / "resolved.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def corpus(self) -> Path:
        return self.data / "corpus.jsonl"

    @property
    def tokens(self) -> Path:
        return self.data / "tokens.npz"

    @property
    def data_summary(self) -> Path:
        return self.data / "summary.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def partition(self) -> Path:
        return self.root / "partition"

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def model(self, stage: str) -> Path:
        return self.root / "models" / stage

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        """True if `stage` wrote its completion marker."""
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict) -> None:
        """Write the completion marker of `stage` (atomic), with `info` (wall time, metrics...)."""
        atomic_write_json(self.marker(stage), {"stage": stage, **info})

    def stage_info(self, stage: str) -> dict:
        """Contents of the completion marker of `stage`."""
        return read_json(self.marker(stage))

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def prepare_run_dir(root: Path, config: JobConfig) -> RunDir:
    """Create (or reopen) a run directory for `config` and pin the config in it.

    A new directory gets ``resolved.toml``; an existing one must hold the same resolved config.
    Checks writability first by creating and removing a probe file, so a failure leaves nothing
    behind.

    Raises:
      RunDirError: if `root` cannot be created or written (message names the directory), or it was
        created with a different config (message names the differing fields).
    """
    import tomllib

    root = Path(root)
    created = []
    try:
        missing = []
        p = root
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise RunDirError(f"output directory {str(root)!r} is not writable: {exc.strerror or exc}") from None
    run = RunDir(root)
    if run.resolved.is_file():
        try:
            pinned = type(config).from_dict(tomllib.loads(run.resolved.read_text(encoding="utf-8")), name=config.name)
        except (ConfigError, tomllib.TOMLDecodeError, TypeError) as exc:
            raise RunDirError(f"{run.resolved}: unreadable pinned config: {exc}") from None
        if pinned != config:
            raise RunDirError(
                f"output directory {str(root)!r} holds a run of a different config (differs in: "
                f"{', '.join(pinned.differences(config))}); use another --out or delete it")
    else:
        atomic_write_text(run.resolved, config.to_toml())
    return run
