"""Atomic file writes: nothing is ever half-written under its final name.

Every file the library and the jobs write (partitions, featurizers, run-directory JSON and
arrays, plots) goes through `atomic_path`: the content is written to a temporary file in the same
directory, then moved into place with `os.replace` (atomic on POSIX within one filesystem). The
final file gets the mode a plain `open(path, "w")` would give it, `0o666 & ~umask` (the temporary
file of `tempfile.mkstemp` is 0o600, which would lock other users out of shared run directories).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask. Read from `/proc/self/status` where the kernel reports it (no change of
    process state); elsewhere by setting and restoring it at once with `os.umask` (as
    `dfm.hf.export.default_permissions` does)."""
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside `path`; on normal exit move it to `path`, on error delete it.

    The final file's mode is `0o666 & ~umask` (`current_umask`), set on the temporary file just
    before it is moved into place.

    Args:
      path: the final file name; its directory is created if missing.
      suffix: ending of the temporary name, for writers that infer the format from it
        (e.g. ".npz" for `numpy.savez`, ".png" for matplotlib).

    Raises:
      OSError: the directory cannot be created or written (the message names it).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
