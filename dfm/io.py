"""Atomic file writes, leftover temporaries, and disk faults.

Every file the library and the jobs write (partitions, featurizers, run-directory JSON and
arrays, plots, safetensors) goes through `atomic_path`: the content is written to a temporary file
in the same directory, then moved into place with `os.replace` (atomic on POSIX within one
filesystem). Directories (an HF export, a tokenizer) go through `atomic_dir`: built in a temporary
directory beside the target, then swapped into place. The final file gets the mode a plain
`open(path, "w")` would give it, `0o666 & ~umask` (the temporary file of `tempfile.mkstemp` is
0o600, which would lock other users out of shared run directories).

Temporary names: ``.<final name>.tmp<random>[suffix]`` (and ``.<final name>.old<random>`` for a
directory being replaced), so a process killed mid-write leaves only names that
`remove_temporaries` recognises and that no reader ever opens.

Disk faults: a write that fails because the disk is full (``ENOSPC``), the quota is exceeded
(``EDQUOT``) or the file system is read-only (``EROFS``) is recognised by `disk_fault`, whether it
is raised as an `OSError` or wrapped by another library (tensorstore / orbax report
``[os_error_code='28']``, safetensors and tokenizers ``Os { code: 28, ... }`` or ``(os error 28)``);
it names the file being written under its final name (`final_name`; `atomic_path` and `atomic_dir`
add the name where the writer's error had none). `mute_disk_fault_reports` keeps the background
writers' duplicate reports of one fault (orbax's threads log each failed write with its traceback)
off the terminal, so that the fault is reported once, by whoever catches it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

#: errno -> what the user is told; the errors that mean "this disk cannot take the write".
DISK_FAULT_ERRNOS = {code: text for code, text in (
    (errno.ENOSPC, "no space left on the device"),
    (getattr(errno, "EDQUOT", None), "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
) if code is not None}

#: where other libraries put the errno of an OS error in their messages: tensorstore (orbax),
#: Rust's io::Error (safetensors, tokenizers: debug and display forms), and str() of an OSError
#: embedded in another message.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|Os \{ code: (\d+)|\(os error (\d+)\)|\[Errno (\d+)\]")
_TEMPORARY = re.compile(r"\..+?\.(tmp|old)")
_PATH_IN_TEXT = re.compile(r'local file "([^"]+)"|Failed writing: "([^"]+)"')


def current_umask() -> int:
    """The process umask. Read from `/proc/self/status` where the kernel reports it (no change of
    process state); elsewhere by setting and restoring it at once with `os.umask`."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# disk faults
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskFault:
    """A write refused by the file system: `errno` (a key of `DISK_FAULT_ERRNOS`) and the file being
    written, when the error said (else None)."""

    errno: int
    path: str | None = None

    @property
    def code(self) -> str:
        """The errno's symbolic name ("ENOSPC", "EDQUOT", "EROFS")."""
        return errno.errorcode.get(self.errno, str(self.errno))

    @property
    def reason(self) -> str:
        """What happened, in words ("no space left on the device")."""
        return DISK_FAULT_ERRNOS[self.errno]


def _fault_in_text(text: str) -> DiskFault | None:
    for match in _ERRNO_IN_TEXT.finditer(text):
        code = int(next(g for g in match.groups() if g is not None))
        if code in DISK_FAULT_ERRNOS:
            found = _PATH_IN_TEXT.search(text)
            return DiskFault(code, None if found is None else final_name(next(g for g in found.groups() if g)))
    return None


def final_name(path: str) -> str:
    """The final name a temporary path is written for: ``.<name>.tmp<random>[suffix]`` and
    ``.<name>.old<random>`` components become ``<name>``; orbax's ``<name>.orbax-checkpoint-tmp*``
    and everything under it become ``<name>`` (the checkpoint)."""
    path = re.sub(r"\.orbax-checkpoint-tmp[^/]*(/.*)?$", "", path)
    return re.sub(r"(^|/)\.([^/]+?)\.(?:tmp|old)[^/]*", r"\1\2", path)


def disk_fault(exc: BaseException | None) -> DiskFault | None:
    """The disk fault behind `exc`, or None: an `OSError` whose errno is in `DISK_FAULT_ERRNOS`, or
    another library's error whose message carries such an errno (module doc), looked for in `exc`,
    its causes / contexts and the members of exception groups. Its path is the file being written
    (an OSError's `filename2` when set, else `filename`) under its final name (`final_name`)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FAULT_ERRNOS:
            # two-path calls (os.link, os.replace, shutil.copyfile) fail to write the second
            name = e.filename2 if e.filename2 is not None else e.filename
            return DiskFault(e.errno, None if name is None else final_name(os.fsdecode(name)))
        if not isinstance(e, OSError):
            found = _fault_in_text(str(e))
            if found is not None:
                return found
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def raise_naming(exc: BaseException, path: str | os.PathLike) -> None:
    """If `exc` is a disk fault (`disk_fault`) that names no file, raise an `OSError` with its errno
    naming `path`, from `exc`; otherwise return (the caller re-raises `exc`)."""
    fault = disk_fault(exc)
    if fault is not None and fault.path is None:
        raise OSError(fault.errno, os.strerror(fault.errno), os.fspath(path)) from exc


_muted = threading.Event()          # a disk-fault report was dropped: its async aftermath is noise too
_installed = False


class _DropDiskFaultRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: judge by its exception alone
            text = ""
        if disk_fault(exc) is not None or _fault_in_text(text) is not None:
            _muted.set()
            return False
        if _muted.is_set() and record.levelno >= logging.ERROR and exc is not None:
            return False            # e.g. "Failed to run 2 Handler Commit operations" after the fault
        return True


def _is_aftermath(exc: BaseException | None) -> bool:
    """The leftovers of an aborted asynchronous operation (an orbax write that failed): callbacks of
    its futures into its event loop, closed meanwhile (asyncio's ``_check_closed``)."""
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def mute_disk_fault_reports() -> None:
    """From now on (process-wide, idempotent), drop the reports that background writers make of a
    disk fault on their own: records of the "absl" (orbax's threads) and "asyncio" (its futures)
    loggers and uncaught / unraisable exceptions of threads and coroutines that carry a disk fault
    (after one, also the error records with a traceback that follow from it), and the "Event loop
    is closed" errors of callbacks into the event loop of an aborted asynchronous write (they come
    before its fault is logged, and say nothing of their own). The fault itself still reaches the
    caller of the failed write as an exception. For applications (the `dfm` CLI), not libraries."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in ("absl", "asyncio"):        # orbax's threads; its futures' "exception never retrieved"
        logging.getLogger(name).addFilter(_DropDiskFaultRecords())
    unraisable, thread_hook = sys.unraisablehook, threading.excepthook

    def on_unraisable(info):
        if _is_aftermath(info.exc_value):
            return
        if disk_fault(info.exc_value) is not None:
            _muted.set()
            return
        unraisable(info)

    def on_thread(args):
        if _is_aftermath(args.exc_value):
            return
        if disk_fault(args.exc_value) is not None:
            _muted.set()
            return
        thread_hook(args)

    sys.unraisablehook, threading.excepthook = on_unraisable, on_thread


# ----------------------------------------------------------------------------------------------
# atomic writes and their temporaries
# ----------------------------------------------------------------------------------------------
def temporary_prefix(path: str | os.PathLike) -> str:
    """``.<name>.tmp``: the start of the temporary names of `path` (module doc)."""
    return f".{Path(path).name}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside `path`; on normal exit move it to `path`, on error delete it.

    The final file's mode is `0o666 & ~umask` (`current_umask`), set on the temporary file just
    before it is moved into place.

    Args:
      path: the final file name; its directory is created if missing.
      suffix: ending of the temporary name, for writers that infer the format from it
        (e.g. ".npz" for `numpy.savez`, ".png" for matplotlib).

    Raises:
      OSError: the directory cannot be created or written; a disk fault (`disk_fault`) raised by
        the writer names `path` (the temporary file is removed either way).
    """
    final = Path(path)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=temporary_prefix(final), suffix=suffix)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    except BaseException as exc:
        raise_naming(exc, final)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_path`).

    Raises:
      OSError: as `atomic_path`.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def default_permissions(directory: Path) -> None:
    """Give `directory` and everything in it the usual umask permissions (`mkdtemp` / `mkstemp`
    create them 0o700 / 0o600)."""
    umask = current_umask()
    directory.chmod(0o777 & ~umask)
    for file in directory.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is first moved aside (``.<name>.old<random>``) and
    deleted after."""
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
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty directory beside `path` (``.<name>.tmp<random>``); on normal exit give it
    the umask permissions (`default_permissions`) and swap it into place (`swap_into_place`: an
    existing `path` is replaced), on error delete it.

    Raises:
      OSError: the parent cannot be written; a disk fault (`disk_fault`) raised inside names the
        file it was writing under its final name, or `path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_prefix(final)))
    try:
        yield tmp
        default_permissions(tmp)
        swap_into_place(tmp, final)
    except BaseException as exc:
        raise_naming(exc, final)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_temporary(name: str, of: str | None = None) -> bool:
    """True for the name of a leftover temporary: ``.<final>.tmp*`` / ``.<final>.old*`` (`atomic_path`,
    `atomic_dir`) or ``<final>.orbax-checkpoint-tmp*`` (orbax); with `of`, only those of the final
    name `of`."""
    if of is not None:
        return name.startswith((f".{of}.tmp", f".{of}.old", f"{of}.orbax-checkpoint-tmp"))
    return _TEMPORARY.match(name) is not None or ".orbax-checkpoint-tmp" in name


def remove_temporaries(directory: str | os.PathLike, of: str | None = None) -> list[Path]:
    """Delete the leftover temporaries (`is_temporary`) directly in `directory` (all of them, or
    those of the final name `of`). Only for a directory no other live process is writing (the
    engine calls it under the stage's lock). Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if is_temporary(entry.name, of):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def arrays_sha256(arrays) -> str:
    """sha256 (hex) of named arrays: for each name in sorted order, ``name:dtype:shape`` and the
    array's bytes (C order), so equal contents give equal digests whatever wrote them."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
