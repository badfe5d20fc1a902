"""One writer per stage: exclusive lock files in ``<run>/locks/<stage>.lock``.

A stage (data, partition, a training stage, evaluate, export) is written by one process at a
time; different stages of one run directory may run in parallel (e.g. `dfm train --expert k` jobs
for different k on shared storage). The lock file is created with ``O_CREAT | O_EXCL`` (atomic on
POSIX and NFSv3+) and holds its holder's host, PID and start time. A second writer of the same
stage gets a `LockError` naming the holder. A lock whose holder is a dead process on this host is
stale: it is taken over with a warning (through the `log` callable). A lock held from another
host cannot be checked from here: the error says to delete the file if that job is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from experiments.engine.rundir import RunDir, RunDirError


class LockError(RunDirError):
    """Another process is writing the same stage; the message names it and the lock file."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _create(path: Path) -> bool:
    """Create the lock file exclusively with our holder record; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_holder(), f)
    return True


@contextlib.contextmanager
def stage_lock(run: RunDir, stage: str, log: Callable[..., None] = print) -> Iterator[Path]:
    """Hold the exclusive lock of `stage` in `run` for the duration of the block.

    Raises:
      LockError: the stage is locked by a live process (this host) or by another host.
    """
    path = run.root / "locks" / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _create(path):
        holder = _read(path)
        here = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if here and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            log(f"[{stage}] taking over the stale lock {path} of process {pid} (no longer running)")
            path.unlink(missing_ok=True)
            if not _create(path):
                holder = _read(path)
                raise LockError(f"stage {stage!r} of {run.root} is being written by {_describe(holder)} "
                                f"(lock {path})")
        else:
            hint = "" if here else "; if that job is gone, delete the lock file"
            raise LockError(f"stage {stage!r} of {run.root} is being written by {_describe(holder)} "
                            f"(lock {path}){hint}")
    try:
        yield path
    finally:
        if _read(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (unreadable lock file)"
    return f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
