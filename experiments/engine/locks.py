"""One writer per stage: exclusive lock files in ``<run>/locks/<stage>.lock``.

A stage (data, partition, a training stage, evaluate, export) is written by one process at a
time; different stages of one run directory may run in parallel (e.g. `dfm train --expert k` jobs
for different k on shared storage). The lock file holds its holder's host, PID and start time. It
is created atomically *with* that content: the record is written to a temporary file
(``.<stage>.lock.tmp*``) that is then hard-linked to the lock's name, which fails if the lock
exists (atomic on POSIX and NFSv3+); on a file system without hard links the lock is created with
``O_CREAT | O_EXCL`` and removed again if writing the record fails. So a full disk never leaves an
empty lock behind.

A second writer of the same stage gets a `LockError` naming the holder. A lock whose holder is a
dead process on this host is stale: it is taken over with a message (through the `log` callable).
So is an empty or unreadable lock file (one left by a crash or a full disk before this scheme, or
edited): no live holder leaves one, except for an instant on a file system without hard links, so
it is read again for up to `UNREADABLE_GRACE_S` seconds after its last change before it is taken
over. A lock held from another host cannot be checked from here: the error says to delete the file
if that job is gone.

While held, the stage's leftover temporaries are removed (`RunDir.remove_temporaries`) and every
disk fault in it becomes a `DiskFaultError` naming the stage (`disk_faults_of`), the lock's own
creation included.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dfm.io import raise_naming, temporary_prefix
from experiments.engine.rundir import RunDir, RunDirError, disk_faults_of

#: how long an unreadable lock file is given to become readable (module doc), seconds
UNREADABLE_GRACE_S = 2.0
#: errors of `os.link` that mean "no hard links here": fall back to O_EXCL
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


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


def _read(path: Path) -> dict | None:
    """The holder record of a lock file; {} if there is no file, None if it is unreadable (empty,
    not JSON, or not a record with a PID)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _create(path: Path) -> bool:
    """Create the lock file with our holder record, atomically (module doc); False if it exists.

    Raises:
      OSError: the lock cannot be written (full disk, read-only); nothing is left behind.
    """
    record = json.dumps(_holder()).encode("utf-8")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        return _create_exclusive(path, record)
    except OSError as exc:
        raise_naming(exc, path)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _create_exclusive(path: Path, record: bytes) -> bool:
    """`_create` without hard links: ``O_CREAT | O_EXCL``, the file removed if the write fails."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(record)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _settled(path: Path) -> dict | None:
    """`_read`, waiting while the file is unreadable but changed less than `UNREADABLE_GRACE_S` ago."""
    while True:
        holder = _read(path)
        if holder is not None:
            return holder
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if age >= UNREADABLE_GRACE_S:
            return None
        time.sleep(min(0.2, UNREADABLE_GRACE_S - age))


def _stale(holder: dict | None) -> str | None:
    """Why a lock with this holder record may be taken over, or None (a live or unknown holder)."""
    if holder is None:
        return "an unreadable lock file (empty or damaged: left by a crash or a full disk)"
    pid = holder.get("pid")
    if (holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
            and not _alive(pid)):
        return f"process {pid} (no longer running)"
    return None


def _take_over(path: Path, stat: os.stat_result) -> None:
    """Remove the stale lock `path`, unless another process replaced it since it was judged (`stat`)."""
    with contextlib.suppress(FileNotFoundError):
        now = os.stat(path)
        if (now.st_ino, now.st_dev, now.st_mtime_ns) == (stat.st_ino, stat.st_dev, stat.st_mtime_ns):
            path.unlink()


def _acquire(run: RunDir, stage: str, path: Path, log: Callable[..., None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return
    try:
        stat = os.stat(path)
    except FileNotFoundError:            # released meanwhile
        stat = None
    holder = _settled(path) if stat is not None else {}
    why = _stale(holder) if holder != {} else None
    if why is not None:
        log(f"[{stage}] taking over the stale lock {path} of {why}")
        _take_over(path, stat)
    if holder == {} or why is not None:
        if _create(path):
            return
        holder = _read(path)
    here = bool(holder) and holder.get("host") == socket.gethostname()
    hint = "" if here else "; if that job is gone, delete the lock file"
    raise LockError(f"stage {stage!r} of {run.root} is being written by {_describe(holder)} (lock {path}){hint}")


@contextlib.contextmanager
def stage_lock(run: RunDir, stage: str, log: Callable[..., None] = print) -> Iterator[Path]:
    """Hold the exclusive lock of `stage` in `run` for the duration of the block; on entry, remove
    the temporaries a killed writer of the stage left (`RunDir.remove_temporaries`).

    Raises:
      LockError: the stage is locked by a live process (this host) or by another host.
      DiskFaultError: the disk is full, over quota or read-only, while taking the lock or in the
        block (`disk_faults_of`; the message names the stage and the file).
    """
    path = run.root / "locks" / f"{stage}.lock"
    with disk_faults_of(f"stage {stage!r}", run.root):
        _acquire(run, stage, path, log)
        try:
            removed = run.remove_temporaries(stage)
            if removed:
                log(f"[{stage}] removed {len(removed)} temporary file(s) left by an interrupted write: "
                    f"{', '.join(str(p) for p in removed[:3])}{', ...' if len(removed) > 3 else ''}")
            yield path
        finally:
            holder = _read(path)
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                path.unlink(missing_ok=True)


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (unreadable lock file)"
    return f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
