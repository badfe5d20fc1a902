"""Disk faults on the tiny config: a full (tmpfs), over-quota or read-only disk during a checkpoint,
model, lock, report or export write ends in ONE ``dfm: error:`` line naming the stage and the path,
exit status 1, and nothing a later run trusts or is blocked by; the same command, once there is
space again, heals the run into the uninterrupted one.

The tmpfs tests mount a small tmpfs (root, as in CI) and run the `dfm` console script in a
subprocess, so that the whole terminal output is checked (orbax's background threads included); where
`mount` is not permitted they skip, and the patched-writer tests below (a writer that fails with
ENOSPC / EDQUOT) cover the same mapping in-process.
"""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import same_numbers

from experiments.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HINT = "and re-run the same command: finished stages are kept and nothing half-written is used"
FREE = "free some space " + HINT


def _run(*argv) -> int:
    return main([*argv, "--config", "tiny", "--quiet"])


def _report(run_dir: Path) -> dict:
    rep = json.loads((run_dir / "report.json").read_text())
    return {s["name"]: s["loss"] for s in rep["systems"]}


def _model_digests(run_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text()).get("model_sha256") for p in (run_dir / "stages").glob("*.json")}


def _leftovers(run_dir: Path) -> list[Path]:
    """Temporaries, orbax temporary checkpoints and lock files left in a run directory."""
    return [p for p in run_dir.rglob("*")
            if ".orbax-checkpoint-tmp" in p.name or re.match(r"\..+\.(tmp|old)", p.name) or p.suffix == ".lock"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _run("run", "--out", str(out)) == 0
    return out


class Disk:
    """A tmpfs mounted at `root`; `fill(leave)` shrinks it to what it holds plus `leave` bytes,
    `free()` grows it back, `read_only(flag)` remounts it."""

    def __init__(self, root: Path):
        self.root = root

    def _mount(self, *options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", *options], capture_output=True, text=True)

    def fill(self, leave: int = 0) -> None:
        s = os.statvfs(self.root)
        used = (s.f_blocks - s.f_bfree) * s.f_frsize
        result = self._mount("-o", f"remount,size={used + leave}", str(self.root))
        assert result.returncode == 0, result.stderr

    def free(self) -> None:
        assert self._mount("-o", "remount,size=256m", str(self.root)).returncode == 0

    def read_only(self, flag: bool) -> None:
        assert self._mount("-o", f"remount,{'ro' if flag else 'rw'}", str(self.root)).returncode == 0


@pytest.fixture(scope="module")
def mount_permitted(tmp_path_factory):
    """Skip (before the reference run) where no tmpfs can be mounted."""
    root = tmp_path_factory.mktemp("probe")
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)],
                                capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: the patched-writer tests cover the disk-fault mapping")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}; needs root): the "
                    f"patched-writer tests cover the disk-fault mapping")
    subprocess.run(["umount", str(root)], capture_output=True)


@pytest.fixture
def disk(mount_permitted, tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(root)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    yield Disk(root)
    subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _cli(*argv) -> subprocess.CompletedProcess:
    """The `dfm` console script in a fresh process: its exit status, stdout and complete stderr."""
    return subprocess.run([sys.executable, "-c", "import sys; from experiments.cli import main; sys.exit(main())",
                           *argv, "--config", "tiny", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def _copy(reference: Path, dest: Path, *names: str) -> Path:
    dest.mkdir(parents=True)
    for name in names:
        (shutil.copytree if (reference / name).is_dir() else shutil.copy2)(reference / name, dest / name)
    return dest


def _one_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.fullmatch(pattern, result.stderr.strip()), result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1


def _heals(run_dir: Path, reference: Path) -> None:
    result = _cli("run", "--out", str(run_dir))
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert same_numbers(_report(run_dir), _report(reference))
    assert _model_digests(run_dir) == _model_digests(reference)        # a content hash: equal for equal runs
    assert _leftovers(run_dir) == []


def test_full_disk_during_a_checkpoint_write(mount_permitted, reference, disk):
    """Before: 566 lines with 49 tracebacks and no `dfm: error:` line."""
    out = _copy(reference, disk.root / "run", "data", "tokenizer", "partition", "stages", "resolved.toml")
    for marker in (out / "stages").glob("*.json"):
        if marker.stem not in ("partition",):
            marker.unlink()
    disk.fill(leave=48 * 1024)                       # the lock and the first metrics fit, a checkpoint does not
    result = _cli("run", "--out", str(out))
    _one_error(result, rf"dfm: error: stage 'base': no space left on the device \(ENOSPC\) writing "
                       rf"{re.escape(str(out))}/(checkpoints|models|logs)/base\S*; {re.escape(FREE)}")
    assert not (out / "stages" / "base.json").exists() and not (out / "locks" / "base.lock").exists()
    disk.free()
    _heals(out, reference)


def test_full_disk_while_saving_a_model_and_taking_a_lock(mount_permitted, reference, disk):
    out = _copy(reference, disk.root / "run", "data", "tokenizer", "partition", "checkpoints", "resolved.toml")
    (out / "stages").mkdir()
    shutil.copy2(reference / "stages" / "partition.json", out / "stages")
    disk.fill(leave=0)                               # not even the lock's holder record fits
    result = _cli("train", "--base", "--out", str(out))
    _one_error(result, rf"dfm: error: stage 'base': no space left on the device \(ENOSPC\) writing "
                       rf"{re.escape(str(out / 'locks' / 'base.lock'))}; {re.escape(FREE)}")
    assert list((out / "locks").iterdir()) == []     # no empty lock blocks the next run
    disk.fill(leave=64 * 1024)
    result = _cli("train", "--base", "--out", str(out))    # resumes at the last step: saves the model
    _one_error(result, rf"dfm: error: stage 'base': no space left on the device \(ENOSPC\) writing "
                       rf"{re.escape(str(out))}/(models|logs)/base\S*; {re.escape(FREE)}")
    disk.free()
    _heals(out, reference)


def test_full_disk_during_the_export_and_what_a_killed_export_left(mount_permitted, reference, disk):
    """Before: `OSError: [Errno 28] No space left on device` with no path; a SIGKILL left
    `export/.tokenizer.tmp*/` forever."""
    out = disk.root / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("export"))
    (out / "stages" / "export.json").unlink()
    (out / "export" / ".tokenizer.tmp3jk2").mkdir(parents=True)        # as a kill -9 mid-export leaves it
    (out / "export" / ".tokenizer.tmp3jk2" / "tokenizer.json").write_text("{")
    disk.fill(leave=96 * 1024)
    result = _cli("run", "--out", str(out))
    _one_error(result, rf"dfm: error: stage 'export': no space left on the device \(ENOSPC\) writing "
                       rf"{re.escape(str(out / 'export'))}/(dense|decentralized|tokenizer)\S*; {re.escape(FREE)}")
    assert [p.name for p in (out / "export").iterdir() if p.name.startswith(".")] == []
    assert not (out / "stages" / "export.json").exists()
    disk.free()
    _heals(out, reference)
    assert (out / "export" / "dense" / "model.safetensors").is_file()


def test_read_only_disk(mount_permitted, reference, disk):
    out = _copy(reference, disk.root / "run", *[p.name for p in reference.iterdir()])
    (out / "stages" / "evaluate.json").unlink()
    disk.read_only(True)
    result = _cli("evaluate", "--out", str(out))
    _one_error(result, rf"dfm: error: run directory: read-only file system \(EROFS\) writing {re.escape(str(out))}; "
                       rf"make it writable \(or choose another --out\) {re.escape(HINT)}")
    disk.read_only(False)
    _heals(out, reference)


# ----------------------------------------------------------------------------------------------
# patched writers: the same mapping where no tmpfs can be mounted
# ----------------------------------------------------------------------------------------------
def test_quota_exceeded_while_writing_the_report(reference, tmp_path, monkeypatch, capsys):
    from dfm.io import atomic_path
    from experiments.engine import rundir

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "stages" / "evaluate.json").unlink()
    (out / "report.json").unlink()
    real = rundir.atomic_write_bytes

    def over_quota(path, data):
        if Path(path).name != "report.json":
            return real(path, data)
        with atomic_path(path) as tmp, open(tmp, "wb"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))       # as write() on a full quota

    monkeypatch.setattr(rundir, "atomic_write_bytes", over_quota)
    assert _run("evaluate", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err == (f"dfm: error: stage 'evaluate': disk quota exceeded (EDQUOT) writing {out / 'report.json'}; "
                   f"free some space or raise the quota {HINT}\n")
    assert not (out / "report.json").exists() and not (out / "stages" / "evaluate.json").exists()
    assert _leftovers(out) == []
    monkeypatch.undo()
    assert _run("evaluate", "--out", str(out)) == 0
    assert same_numbers(_report(out), _report(reference))


def test_full_disk_in_safetensors_during_the_export(reference, tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "stages" / "export.json").unlink()
    old = (out / "export" / "dense" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):   # safetensors' own error: a Rust io::Error in the message, no errno, no path
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    assert _run("run", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err == (f"dfm: error: stage 'export': no space left on the device (ENOSPC) writing "
                   f"{out / 'export' / 'dense' / 'model.safetensors'}; {FREE}\n")
    assert (out / "export" / "dense" / "model.safetensors").read_bytes() == old      # the old export is kept
    assert _leftovers(out) == []
    monkeypatch.undo()
    assert _run("run", "--out", str(out)) == 0
    assert (out / "stages" / "export.json").is_file()


def test_full_disk_while_saving_the_tokenizer(tmp_path, monkeypatch, capsys):
    """The data stage: `tokenizers` reports a full disk as a Rust io::Error with no path."""
    from transformers import PreTrainedTokenizerFast

    def full(self, directory, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{")                 # half-written
        raise Exception("No space left on device (os error 28)")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
        assert _run("partition", "--out", str(out)) == 1
    assert capsys.readouterr().err == (f"dfm: error: stage 'data': no space left on the device (ENOSPC) writing "
                                       f"{out / 'tokenizer'}; {FREE}\n")
    assert not (out / "tokenizer").exists() and not (out / "data" / "summary.json").exists()
    assert _leftovers(out) == []
    assert _run("partition", "--out", str(out)) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_a_disk_fault_outside_a_stage_names_the_run_directory_or_the_command(tmp_path, monkeypatch, capsys):
    from experiments.engine import pipeline, rundir

    def full(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    out = tmp_path / "new"
    with monkeypatch.context() as patch:
        patch.setattr(rundir, "atomic_write_text", full)
        assert _run("partition", "--out", str(out)) == 1
    assert capsys.readouterr().err == (f"dfm: error: run directory: no space left on the device (ENOSPC) writing "
                                       f"{out / 'resolved.toml'}; {FREE}\n")
    monkeypatch.setattr(pipeline, "load_data", lambda task, config, run, options: full(run.root / "elsewhere"))
    assert _run("partition", "--out", str(out)) == 1
    assert capsys.readouterr().err == (f"dfm: error: dfm partition: no space left on the device (ENOSPC) writing "
                                       f"{out / 'elsewhere'}; {FREE}\n")


def test_model_sha256_hashes_the_parameters(reference, tmp_path):
    """Two saves of the same parameters: equal digests (orbax's own files differ: timestamps); one
    changed value: another digest."""
    import jax.numpy as jnp

    from dfm.train import save_model
    from dfm.train.checkpoint import model_sha256
    from experiments.engine.pipeline import open_run
    from experiments.engine.rundir import directory_digest
    from experiments.engine.training import load_stage_model
    from experiments.text.config import load_config
    from experiments.text.task import TextTask

    task, config = TextTask(), load_config("tiny")
    run = open_run(config, reference)
    data = task.prepare_data(config, run, log=lambda *a: None)
    model = load_stage_model(run, "dense", lambda: task.new_model(config, data))
    save_model(model, tmp_path / "a")
    save_model(model, tmp_path / "b")
    assert model_sha256(tmp_path / "a") == model_sha256(tmp_path / "b") == _model_digests(reference)["dense"]
    assert directory_digest(tmp_path / "a") != directory_digest(tmp_path / "b")
    model.norm.scale[...] = model.norm.scale[...].at[0].add(jnp.float32(1e-3))
    save_model(model, tmp_path / "b")
    assert model_sha256(tmp_path / "b") != model_sha256(tmp_path / "a")
