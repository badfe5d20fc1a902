"""A fault battery, driving the `dfm` CLI on the tiny config: each fault ends in a run identical to
an uninterrupted one (a healed run), or in a clear error naming what is wrong (exit status 1 or 2)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from tiny_models import assert_same_run, same_numbers

from experiments.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(*argv) -> int:
    return main([*argv, "--config", "tiny", "--quiet"])


def _losses(run_dir: Path) -> dict:
    rep = json.loads((run_dir / "report.json").read_text())
    return {s["name"]: s["loss"] for s in rep["systems"]}


def _params(run_dir: Path, stage: str) -> dict:
    from flax import nnx

    from experiments.engine.pipeline import open_run
    from experiments.engine.training import load_stage_model
    from experiments.text.config import load_config
    from experiments.text.task import TextTask

    task, config = TextTask(), load_config("tiny")
    run = open_run(config, run_dir)
    data = task.prepare_data(config, run, log=lambda *a: None)
    model = load_stage_model(run, stage, lambda: task.new_model(config, data))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(run_dir: Path, reference: Path, stage: str) -> None:
    """Bit-identical parameters (on a GPU without --xla_gpu_deterministic_ops: to float rounding,
    `tiny_models.assert_same_run`)."""
    a, b = _params(run_dir, stage), _params(reference, stage)
    assert a.keys() == b.keys()
    for key in a:
        assert_same_run(a[key], b[key], err_msg=f"{stage} {key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run (the data stage is copied from it into the faulty runs)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _run("run", "--out", str(out)) == 0
    return out


def _with_data(reference: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("data", "tokenizer"):
        shutil.copytree(reference / name, dest / name)
    return dest


def test_killed_stage_and_a_corrupt_latest_checkpoint_resume_to_the_same_run(reference, tmp_path):
    """Stopped mid-stage (two checkpoints kept), the latest checkpoint then truncated: the resume
    warns, falls back to the previous checkpoint and ends in exactly the uninterrupted run."""
    from dfm.train import CheckpointFallbackWarning

    out = _with_data(reference, tmp_path / "run")
    assert _run("train", "--base", "--out", str(out), "--stop-after", "20") == 0
    steps = sorted(int(p.name) for p in (out / "checkpoints" / "base").iterdir() if p.name.isdigit())
    assert steps == [16, 20]
    for f in (out / "checkpoints" / "base" / "20").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])      # truncate every file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run("run", "--out", str(out)) == 0
    fallback = [w for w in caught if issubclass(w.category, CheckpointFallbackWarning)]
    assert fallback and "checkpoint step 20" in str(fallback[0].message) and "does not restore" in str(fallback[0].message)
    assert same_numbers(_losses(out), _losses(reference))
    _assert_same_params(out, reference, "base")


def test_a_signalled_stage_checkpoints_exits_75_and_resumes_to_the_same_run(reference, tmp_path):
    """SIGTERM to `dfm train --base` mid-stage (the scheduler's preemption notice): a checkpoint of
    the next step boundary, one line, exit status 75; the same command then finishes the stage with
    the uninterrupted run's parameters."""
    from dfm.train.loop import read_metrics

    out = _with_data(reference, tmp_path / "run")
    metrics = out / "logs" / "base" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from experiments.cli import main; sys.exit(main())",
                             "train", "--base", "--config", "tiny", "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(metrics):          # rows are written inside the training loop only
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGSTOP)         # hold it inside the loop while we look and signal
        logged = max(row["step"] for row in read_metrics(metrics))
        assert logged < 20, f"the stage ran to step {logged} before it could be signalled"
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"dfm: preempted: stage 'base' checkpointed at step (\d+) in (.+); "
                         r"re-run the same command to resume", last)
    assert match and match[2] == str(out / "checkpoints" / "base"), last
    step = int(match[1])
    assert logged < step < 24 and (out / "checkpoints" / "base" / str(step)).is_dir()
    assert not (out / "stages" / "base.json").exists() and not (out / "locks" / "base.lock").exists()
    assert _run("train", "--base", "--out", str(out)) == 0
    _assert_same_params(out, reference, "base")


def test_missing_or_truncated_model_behind_a_marker_is_retrained(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "models" / "expert-1")
    big = max((p for p in (out / "models" / "dense").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])
    assert _run("run", "--out", str(out)) == 0
    log = capsys.readouterr().out
    assert "[expert-1] the finished stage cannot be trusted: its model" in log and "is missing" in log
    assert "[dense] the finished stage cannot be trusted" in log and "does not match the checksum" in log
    for stage in ("expert-1", "dense"):
        _assert_same_params(out, reference, stage)


def test_truncated_report_is_rebuilt_and_bad_files_are_named(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "report.json").write_text((out / "report.json").read_text()[:50])
    assert _run("evaluate", "--out", str(out)) == 0
    assert "the finished report cannot be read" in capsys.readouterr().out
    assert same_numbers(_losses(out), _losses(reference))
    # an edited assignments file: a clear error naming it
    path = out / "partition" / "assignments.json"
    raw = json.loads(path.read_text())
    del raw["example_unit"]
    path.write_text(json.dumps(raw))
    shutil.rmtree(out / "models" / "expert-0")
    assert _run("run", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "not a partition's assignments" in err
    # a truncated token file: a clear error naming it
    fresh = tmp_path / "fresh"
    shutil.copytree(reference, fresh)
    tokens = fresh / "data" / "tokens.npz"
    tokens.write_bytes(tokens.read_bytes()[:1000])
    assert _run("run", "--out", str(fresh)) == 1
    err = capsys.readouterr().err
    assert str(tokens) in err and "unreadable arrays" in err


def test_two_writers_of_one_stage(reference, tmp_path, capsys):
    """A live holder: the second writer gets an error naming it. A dead holder on this host: the lock
    is taken over with a message and the stage runs."""
    out = _with_data(reference, tmp_path / "run")
    lock = out / "locks" / "base.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "now"}))
        assert _run("train", "--base", "--out", str(out)) == 1
        err = capsys.readouterr().err
        assert f"is being written by process {holder.pid}" in err and str(lock) in err
    finally:
        holder.kill()
        holder.wait()
    assert _run("train", "--base", "--out", str(out)) == 0
    assert f"taking over the stale lock {lock} of process {holder.pid}" in capsys.readouterr().out
    assert not lock.exists()
    _assert_same_params(out, reference, "base")


def test_a_lost_expert_is_survived(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for d in ("models", "checkpoints"):
        shutil.rmtree(out / d / "expert-1")
    (out / "stages" / "expert-1.json").unlink()
    (out / "stages" / "evaluate.json").unlink()
    assert main(["evaluate", "--config", "tiny", "--out", str(out), "--quiet"]) == 1
    assert "unfinished stages expert-1" in capsys.readouterr().err
    assert main(["evaluate", "--config", "tiny", "--out", str(out), "--quiet", "--skip-expert", "1"]) == 0
    assert "WARNING: expert(s) [1] skipped" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    by = {s["name"]: s["loss"] for s in rep["systems"]}
    assert "ensemble/oracle" not in by and rep["eval"]["skipped_experts"] == [1]
    # with one expert left, every cluster ensemble is that expert alone
    assert by["ensemble/bayes"] == pytest.approx(by["ensemble/centroid-top1"], abs=1e-6)
    assert "WARNING: expert(s) [1] were skipped" in (out / "report.md").read_text()
    assert main(["evaluate", "--config", "tiny", "--out", str(out), "--quiet", "--skip-expert", "0",
                 "--skip-expert", "1"]) == 1
    assert "at least one expert must remain" in capsys.readouterr().err


def test_bad_settings_fail_early_with_a_clear_message(reference, tmp_path, capsys, monkeypatch):
    assert main(["run", "--config", "tiny", "--out", ""]) == 2
    assert "--out: an empty directory name" in capsys.readouterr().err
    cfg = tmp_path / "hot.toml"
    cfg.write_text((Path(__file__).resolve().parents[2] / "experiments" / "configs" / "tiny.toml").read_text()
                   .replace("learning_rate = 3e-3", "learning_rate = 1e6"))
    out = _with_data(reference, tmp_path / "hot")
    assert main(["train", "--base", "--config", str(cfg), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "base: the loss is nan at step" in err and "lower it" in err
    cfg.write_text('[data]\nseq_len = 8192\nvocab_size = 512\n[eval]\nsample_length = 16\n')
    from experiments.engine import pipeline

    monkeypatch.setattr(pipeline, "physical_memory_bytes", lambda: 2**30)   # the same on any machine
    main(["partition", "--config", str(cfg), "--out", str(tmp_path / "long"), "--quiet"])
    assert "warning: a training stage needs about" in capsys.readouterr().out


def test_run_files_are_shareable(reference):
    mode = os.stat(reference / "report.json").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_more_clusters_than_train_images_fails_before_training(tmp_path, capsys):
    cfg = tmp_path / "many.toml"
    cfg.write_text((Path(__file__).resolve().parents[2] / "experiments" / "configs" / "mllm-tiny.toml").read_text()
                   .replace("[partition]\nnum_clusters = 2", "[partition]\nnum_clusters = 100")
                   .replace("[stage2]\nsteps = 8", "[stage2]\nsteps = 100"))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "K=100 experts but only" in err and "train units" in err
    assert not (out / "stages" / "stage1.json").exists()
