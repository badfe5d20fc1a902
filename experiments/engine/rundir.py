"""The run directory: file layout, atomic writes, stage completion markers, config pinning.

Layout of ``runs/<config-name>/``::

    resolved.toml            the resolved config (pinned: a later command with another config fails)
    data/                    the task's data stage (data/summary.json is written last)
    tokenizer/               HF tokenizer (AutoTokenizer.from_pretrained)
    partition/               partition.npz (k-means), assignments.json (train / random / val / test),
                             the task's feature files
    checkpoints/<stage>/     orbax checkpoints of a training stage (resume)
    models/<stage>/          final parameters of a finished stage
    logs/<stage>/            metrics.jsonl: one JSON line per logged training step, appended as it is
                             logged (step, loss, lr, grad_norm, tokens_per_s, wall, ...; a resumed stage
                             continues it); tensorboard/: the same scalars when tensorboardX (or torch
                             with tensorboard) is installed (``tensorboard --logdir runs/<name>/logs``)
    stages/<stage>.json      completion marker of a stage: wall time, steps, loss history, the sha256 of
                             its model's parameters (`dfm.train.checkpoint.model_sha256`: equal for
                             identical runs; a missing or changed model re-runs the stage)
    locks/<stage>.lock       held while a process writes the stage (`experiments.engine.locks`)
    report.json, report.md, plots/*.png

Every file is written to a temporary name in the same directory and moved into place with
`os.replace` (`dfm.io`), so an interrupted command never leaves a half-written file under a final
name; the temporaries a killed process left are removed when the stage that writes them next
starts (`RunDir.remove_temporaries`, under the stage's lock).

Disk faults: a write of a stage that fails because the disk is full, over quota or read-only
(`dfm.io.disk_fault`) becomes a `DiskFaultError` naming the stage and the file
(`disk_faults_of`); the `dfm` CLI prints it as one ``dfm: error:`` line and exits with status 1.
Nothing half-written is left under a final name, so the same command heals the run once there is
space again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dfm.io import DiskFault, arrays_sha256, atomic_path, atomic_write_bytes, disk_fault, remove_temporaries
from dfm.train.checkpoint import model_sha256
from experiments.engine.config import ConfigError, JobConfig


class RunDirError(RuntimeError):
    """The run directory cannot be used (unwritable, pinned to another config, or a file in it is
    unreadable); the message names the directory or file."""


class DiskFaultError(RunDirError):
    """A write failed because the disk is full, over quota or read-only; the message names the stage
    (or command), the file and what to do. Attributes: `fault` (`dfm.io.DiskFault`), `stage`."""

    def __init__(self, fault: DiskFault, stage: str, where: Path | None = None):
        self.fault, self.stage = fault, stage
        target = fault.path or (f"into {where}" if where is not None else "a file")
        hint = {"ENOSPC": "free some space", "EDQUOT": "free some space or raise the quota",
                "EROFS": "make it writable (or choose another --out)"}.get(fault.code, "fix it")
        super().__init__(f"{stage}: {fault.reason} ({fault.code}) writing {target}; {hint} and re-run the same "
                         f"command: finished stages are kept and nothing half-written is used")


def disk_fault_error(exc: BaseException, stage: str, where: Path | None = None) -> DiskFaultError | None:
    """`exc` as a `DiskFaultError` of `stage` (e.g. "stage 'base'", "dfm run") when it is a disk
    fault (`dfm.io.disk_fault`), else None; `where` (the run directory) is named when the error
    names no file. The one mapping of disk faults to user errors: `disk_faults_of` (each stage, under
    its lock) and the CLI's top-level handler (writes outside a stage) use it."""
    if isinstance(exc, DiskFaultError):
        return exc
    fault = disk_fault(exc)
    return None if fault is None else DiskFaultError(fault, stage, where)


@contextlib.contextmanager
def disk_faults_of(stage: str, where: Path | None = None) -> Iterator[None]:
    """Turn a disk fault raised in the block into a `DiskFaultError` of `stage` (`disk_fault_error`).

    Raises:
      DiskFaultError: the block failed on a full, over-quota or read-only disk.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any writer's error: only disk faults are mapped
        err = disk_fault_error(exc, stage, where)
        if err is None or err is exc:
            raise
        raise err from exc


UNREADABLE_HINT = ("it was probably cut short by a crash or edited; delete it (and what was built from it) "
                   "and re-run to rebuild it")


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
    """Parse a JSON file of the run directory.

    Raises:
      RunDirError: the file is missing, unreadable or not valid JSON (naming the file).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc}); {UNREADABLE_HINT}") from None


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a `.npz` file of the run directory, read into memory.

    Raises:
      RunDirError: the file is missing, truncated or not an npz archive (naming the file).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RunDirError(f"{path}: unreadable arrays ({type(exc).__name__}: {exc}); {UNREADABLE_HINT}") from None


def load_file(path: Path, loader, what: str = "file"):
    """`loader(path)` for a file of the run directory that a library class reads (a partition, a
    featurizer, a tokenizer), with any failure turned into a RunDirError naming the file.

    Raises:
      RunDirError: the file is missing or `loader` fails on it.
    """
    if not Path(path).exists():
        raise RunDirError(f"{path}: missing")
    try:
        return loader(path)
    except Exception as exc:  # noqa: BLE001 - any reader's error: name the file
        raise RunDirError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"{UNREADABLE_HINT}") from None


def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run's numbers depend on (to compare runs across
    machines: a run is reproducible bit for bit only with the same versions)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-learn", "scikit-image", "pillow",
                 "tokenizers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def arrays_digest(arrays: dict) -> str:
    """sha256 (hex) of named numpy arrays (names, dtypes, shapes and bytes, in name order;
    `dfm.io.arrays_sha256`)."""
    return arrays_sha256(arrays)


def directory_digest(path: Path) -> str:
    """sha256 over a directory's files (relative names and contents, in sorted order), hex."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


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

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    def metrics(self, stage: str) -> Path:
        """``logs/<stage>/metrics.jsonl``: the training rows of a stage (`dfm.train.train`'s `metrics_path`)."""
        return self.logs(stage) / "metrics.jsonl"

    def tensorboard(self, stage: str) -> Path:
        return self.logs(stage) / "tensorboard"

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        """True if `stage` wrote its completion marker."""
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict, *, model: bool = False) -> None:
        """Write the completion marker of `stage` (atomic), with `info` (wall time, metrics...);
        with `model=True` it also records ``model_sha256``, the hash of the parameters saved in
        ``models/<stage>`` (`dfm.train.checkpoint.model_sha256`; equal for identical runs), which
        `stage_problem` checks.

        Raises:
          ValueError: with `model=True`, the saved model does not restore (naming it).
          OSError: the marker cannot be written (a disk fault names it).
        """
        extra = {}
        if model:
            extra = {"model_sha256": model_sha256(self.model(stage))}
        atomic_write_json(self.marker(stage), {"stage": stage, **info, **extra})

    def stage_info(self, stage: str) -> dict:
        """Contents of the completion marker of `stage` (RunDirError naming it if unreadable)."""
        return read_json(self.marker(stage))

    def stage_problem(self, stage: str) -> str | None:
        """Why the finished `stage` cannot be trusted, or None: an unreadable marker, or a model
        that is missing, does not restore or does not match the checksum its marker recorded (a
        marker written before the checksum hashed the parameters holds `directory_digest` of the
        model directory, which is accepted too)."""
        try:
            info = self.stage_info(stage)
        except RunDirError as exc:
            return str(exc)
        digest = info.get("model_sha256")
        if digest is None:
            return None
        model = self.model(stage)
        if not model.is_dir():
            return f"its model {model} is missing"
        try:
            actual = model_sha256(model)
        except ValueError:
            actual = None                           # truncated: it cannot match
        if actual != digest and directory_digest(model) != digest:
            return f"its model {model} does not match the checksum in {self.marker(stage)} (truncated or changed)"
        return None

    def temporaries(self, stage: str) -> tuple[list[Path], list[Path]]:
        """Where `stage` writes: the directories it alone writes, and its files or directories in
        shared directories. Data: ``data/`` and ``tokenizer``; partition: ``partition/``; evaluate:
        ``plots/`` and the reports; export: ``export/``; a training stage: ``logs/<stage>/`` and
        ``models/<stage>`` (its orbax checkpoints clean up after themselves); every stage its
        marker."""
        own = {"data": [self.data], "partition": [self.partition], "evaluate": [self.plots],
               "export": [self.root / "export"]}.get(stage, [self.logs(stage)])
        named = {"data": [self.tokenizer], "partition": [], "export": [],
                 "evaluate": [self.report_json, self.report_md, self.root / "scores.npz"]}.get(stage, [self.model(stage)])
        return own, [*named, self.marker(stage)]

    def remove_temporaries(self, stage: str) -> list[Path]:
        """Delete the temporaries (`dfm.io.is_temporary`: ``.<name>.tmp*``, ``.<name>.old*``,
        ``<name>.orbax-checkpoint-tmp*``) that a killed writer of `stage` left where it writes
        (`temporaries`); only while holding the stage's lock. Returns what was removed."""
        own, named = self.temporaries(stage)
        removed = [p for d in own for p in remove_temporaries(d)]
        for path in named:
            removed += remove_temporaries(path.parent, of=path.name)
            for legacy in (path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
                if legacy.is_dir():                  # older `save_tokenizer`'s fixed names
                    shutil.rmtree(legacy, ignore_errors=True)
                    removed.append(legacy)
        return removed

    def forget(self, stage: str) -> None:
        """Remove the marker (and the saved model) of `stage`, so that it runs again; its training
        checkpoints stay, so a re-run resumes from them."""
        self.marker(stage).unlink(missing_ok=True)
        shutil.rmtree(self.model(stage), ignore_errors=True)

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
      DiskFaultError: the disk is full, over quota or read-only.
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
        fault = disk_fault(exc)
        if fault is not None:
            raise DiskFaultError(DiskFault(fault.errno, str(root)), "run directory") from None
        raise RunDirError(f"output directory {str(root)!r} is not writable: {exc.strerror or exc}") from None
    run = RunDir(root)
    if run.resolved.is_file():
        try:
            pinned = type(config).from_dict(tomllib.loads(run.resolved.read_text(encoding="utf-8")), name=config.name)
        except (ConfigError, tomllib.TOMLDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{run.resolved}: unreadable pinned config: {exc}") from None
        if pinned != config:
            raise RunDirError(
                f"output directory {str(root)!r} holds a run of a different config (differs in: "
                f"{', '.join(pinned.differences(config))}); use another --out or delete it")
    else:
        with disk_faults_of("run directory", root):
            atomic_write_text(run.resolved, config.to_toml())
    return run
