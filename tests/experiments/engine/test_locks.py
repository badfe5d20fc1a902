"""Stage locks, leftover temporaries and the disk-fault mapping, without training (`experiments.engine.locks`,
`experiments.engine.rundir`, `dfm.io`)."""
import errno
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dfm.io import atomic_dir, atomic_path, atomic_write_bytes, disk_fault, final_name
from experiments.engine import locks
from experiments.engine.locks import LockError, stage_lock
from experiments.engine.rundir import DiskFaultError, RunDir, disk_fault_error

HINT = "and re-run the same command: finished stages are kept and nothing half-written is used"


def _logged():
    lines = []
    return lines, lambda *a: lines.append(" ".join(map(str, a)))


def _lock(run: RunDir, stage: str = "base"):
    path = run.root / "locks" / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _age(path, seconds: float = 60.0) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.mark.parametrize("content", [b"", b'{"host": "h", "pi', b"[1, 2]", b"\xff\xfe"])
def test_an_empty_or_unreadable_lock_file_is_taken_over(tmp_path, content):
    """A full disk used to leave a 0-byte lock that blocked every later run."""
    run = RunDir(tmp_path)
    path = _lock(run)
    path.write_bytes(content)
    _age(path)
    lines, log = _logged()
    with stage_lock(run, "base", log) as held:
        holder = json.loads(held.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert lines == [f"[base] taking over the stale lock {path} of an unreadable lock file (empty or damaged: "
                     f"left by a crash or a full disk)"]
    assert not path.exists() and not list(path.parent.iterdir())


def test_a_fresh_unreadable_lock_is_read_again_before_it_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "UNREADABLE_GRACE_S", 0.4)
    run = RunDir(tmp_path)
    path = _lock(run)
    path.write_bytes(b"")
    t0 = time.monotonic()
    with stage_lock(run, "base", lambda *a: None):
        assert time.monotonic() - t0 >= 0.3
    assert not path.exists()


def test_a_live_holder_keeps_its_lock_and_a_dead_one_loses_it(tmp_path):
    run = RunDir(tmp_path)
    path = _lock(run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "now"}))
        with pytest.raises(LockError, match=f"is being written by process {holder.pid} on "):
            with stage_lock(run, "base", lambda *a: None):
                pass
        assert json.loads(path.read_text())["pid"] == holder.pid          # not removed
    finally:
        holder.kill()
        holder.wait()
    lines, log = _logged()
    with stage_lock(run, "base", log):
        pass
    assert lines == [f"[base] taking over the stale lock {path} of process {holder.pid} (no longer running)"]


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    run = RunDir(tmp_path)
    path = _lock(run)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(LockError, match="if that job is gone, delete the lock file"):
        with stage_lock(run, "base", lambda *a: None):
            pass


@pytest.mark.parametrize("code, reason, hint", [
    (errno.ENOSPC, "no space left on the device (ENOSPC)", "free some space"),
    (errno.EDQUOT, "disk quota exceeded (EDQUOT)", "free some space or raise the quota"),
    (errno.EROFS, "read-only file system (EROFS)", "make it writable (or choose another --out)"),
])
def test_a_lock_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch, code, reason, hint):
    """The record is written to a temporary file, then hard-linked: a full disk fails either write."""
    run = RunDir(tmp_path)
    path = _lock(run)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def write(self, data):
            raise OSError(code, os.strerror(code))

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(locks.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(DiskFaultError) as caught:
        with stage_lock(run, "base", lambda *a: None):
            pytest.fail("the block must not run")
    assert str(caught.value) == f"stage 'base': {reason} writing {path}; {hint} {HINT}"
    assert not list(path.parent.iterdir())                     # no lock, no temporary
    monkeypatch.undo()
    with stage_lock(run, "base", lambda *a: None):             # the next run is not blocked
        pass


def test_a_failed_hard_link_names_the_lock(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    path = _lock(run)

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src, dst)

    monkeypatch.setattr(locks.os, "link", full)
    with pytest.raises(DiskFaultError, match=f"^stage 'base': no space left on the device \\(ENOSPC\\) writing "
                                             f"{path};"):
        with stage_lock(run, "base", lambda *a: None):
            pass
    assert not list(path.parent.iterdir())


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    path = _lock(run)

    def unsupported(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src, dst)

    monkeypatch.setattr(locks.os, "link", unsupported)
    with stage_lock(run, "base", lambda *a: None) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError, match=f"is being written by process {os.getpid()}"):
            with stage_lock(run, "base", lambda *a: None):
                pass
    assert not list(path.parent.iterdir())


def test_a_disk_fault_in_the_stage_names_the_stage_and_the_file(tmp_path):
    run = RunDir(tmp_path)
    target = tmp_path / "stages" / "base.json"
    with pytest.raises(DiskFaultError) as caught:
        with stage_lock(run, "base", lambda *a: None):
            with atomic_path(target) as tmp, open(tmp, "wb"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))     # as a full disk's write()
    assert str(caught.value) == (f"stage 'base': no space left on the device (ENOSPC) writing {target}; "
                                 f"free some space {HINT}")
    assert not target.exists() and not list(target.parent.iterdir())     # temporary removed
    assert not list((tmp_path / "locks").iterdir())                       # lock released


def test_other_errors_pass_through_the_stage_unchanged(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(PermissionError):
        with stage_lock(run, "base", lambda *a: None):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    with pytest.raises(ValueError, match="not a disk fault"):
        with stage_lock(run, "base", lambda *a: None):
            raise ValueError("not a disk fault")


def test_a_stage_removes_the_temporaries_it_left_and_no_others(tmp_path):
    """What a killed writer left (`.<name>.tmp*`, `.<name>.old*`, `<name>.orbax-checkpoint-tmp*`) goes when
    the stage that writes it starts again; other stages' temporaries stay (they may be live)."""
    run = RunDir(tmp_path)
    mine = [tmp_path / "models" / "expert-0.orbax-checkpoint-tmp-1712", tmp_path / "models" / ".expert-0.tmpab12",
            tmp_path / "stages" / ".expert-0.json.tmpx81", tmp_path / "logs" / "expert-0" / ".metrics.jsonl.tmpq"]
    theirs = [tmp_path / "models" / "expert-1.orbax-checkpoint-tmp-1712", tmp_path / "stages" / ".expert-1.json.tmpa",
              tmp_path / "export" / ".tokenizer.tmp3k", tmp_path / "models" / "expert-0"]
    for i, p in enumerate(mine + theirs):
        p.parent.mkdir(parents=True, exist_ok=True)
        if i % 2:
            p.write_text("partial")
        else:
            p.mkdir()
            (p / "file").write_text("partial")
    lines, log = _logged()
    with stage_lock(run, "expert-0", log):
        assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in theirs)
    assert len(lines) == 1 and lines[0].startswith("[expert-0] removed 4 temporary file(s) left by an interrupted "
                                                   f"write: {mine[3]}, ") and lines[0].endswith(", ...")
    export = [tmp_path / "export" / ".tokenizer.tmp3k", tmp_path / "export" / ".dense.tmpz9",
              tmp_path / "export" / ".decentralized.old7q"]
    for p in export[1:]:
        p.mkdir()
    with stage_lock(run, "export", lambda *a: None):
        assert not any(p.exists() for p in export)
    tokenizer_leftovers = [tmp_path / "tokenizer.tmp", tmp_path / ".tokenizer.tmpab", tmp_path / "data" / ".tokens.npz.tmpc"]
    for p in tokenizer_leftovers:
        p.mkdir(parents=True)
    with stage_lock(run, "data", lambda *a: None):
        assert not any(p.exists() for p in tokenizer_leftovers)


def test_disk_faults_are_recognised_in_other_libraries_errors():
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/r/models/expert-0.orbax-checkpoint-tmp-9/'
                       '_sharding": Failed writing: "/r/models/expert-0.orbax-checkpoint-tmp-9/_sharding.__lock": '
                       "Failed to write 1291 bytes to file 5: No space left on device [os_error_code='28']")
    assert disk_fault(orbax) == disk_fault(OSError(errno.ENOSPC, "x", "/r/models/expert-0"))
    assert disk_fault(orbax).path == "/r/models/expert-0"
    rust = Exception('Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, message: "x" })')
    assert disk_fault(rust).errno == errno.EDQUOT and disk_fault(rust).path is None
    assert disk_fault(Exception("Read-only file system (os error 30)")).code == "EROFS"
    wrapped = ValueError("checkpoint_dir: cannot write")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/r/.write_test_x")
    assert disk_fault(wrapped).errno == errno.ENOSPC
    assert disk_fault(ExceptionGroup("writes", [ValueError("other"), OSError(errno.EROFS, "ro")])).errno == errno.EROFS
    for other in (OSError(errno.ENOENT, "missing", "/x"), PermissionError(errno.EACCES, "denied"),
                  ValueError("[Errno 2] No such file"), KeyboardInterrupt()):
        assert disk_fault(other) is None and disk_fault_error(other, "stage 'x'") is None
    assert final_name("/r/export/.decentralized.tmpab_c/experts/.expert_00.tmp1/model.safetensors") == \
        "/r/export/decentralized/experts/expert_00/model.safetensors"
    assert final_name("/r/.report.json.tmpk2") == "/r/report.json"
    assert final_name("/r/checkpoints/base/8.orbax-checkpoint-tmp-17/state/d") == "/r/checkpoints/base/8"


def test_atomic_writes_name_the_final_file_and_leave_nothing(tmp_path):
    target = tmp_path / "out" / "scores.npz"
    with pytest.raises(OSError) as caught:
        with atomic_path(target, suffix=".npz") as tmp:
            np.savez(tmp, a=np.zeros(3))
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert caught.value.errno == errno.EDQUOT and caught.value.filename == str(target)
    assert not list(target.parent.iterdir())
    directory = tmp_path / "export" / "dense"
    atomic_write_bytes(tmp_path / "export" / "keep", b"1")
    with pytest.raises(OSError) as caught:
        with atomic_dir(directory) as tmp:
            (tmp / "config.json").write_text("{}")
            raise Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(directory)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["keep"]
    with atomic_dir(directory) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (directory / "config.json").read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(directory).st_mode & 0o777 == 0o777 & ~umask
