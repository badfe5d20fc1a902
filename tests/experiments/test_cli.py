"""The `dfm` console script: argument handling and clear errors (no training here)."""
import subprocess
import sys

import pytest

from experiments.cli import main
from experiments.engine.rundir import RunDirError, prepare_run_dir
from experiments.text.config import load_config


def _entries(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_help_exits_zero():
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("partition", "train", "evaluate", "run"):
        assert command in out.stdout


def test_train_help_lists_stage_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--base", "--dense", "--expert", "--random-expert", "--router", "--config", "--out", "--schedule"):
        assert flag in text
    assert "--stop-after" not in text  # hidden testing flag


def test_train_needs_exactly_one_stage(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--base", "--dense", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert not (tmp_path / "r").exists()


def test_unknown_config_key_is_named_and_nothing_written(tmp_path, capsys):
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[model]\nhidden_sise = 64\n")
    out = tmp_path / "run"
    code = main(["run", "--config", str(cfg), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "hidden_sise" in err and "[model]" in err and str(cfg) in err
    assert not out.exists()


def test_bad_value_names_the_field(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[stage2]\nsteps = -3\n")
    code = main(["partition", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "stage2.steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_config_name(tmp_path, capsys):
    assert main(["run", "--config", "nope", "--out", str(tmp_path / "run")]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err


def test_unwritable_output_directory_is_named_and_nothing_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "run"
    before = _entries(tmp_path)
    code = main(["run", "--config", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "not writable" in err and str(out) in err
    assert _entries(tmp_path) == before
    assert blocker.read_text() == "not a directory"


def test_unwritable_nested_output_leaves_no_directories(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    code = main(["partition", "--config", "tiny", "--out", str(blocker / "x" / "y")])
    assert code == 1
    assert _entries(tmp_path) == ["f"]


def test_expert_index_out_of_range(tmp_path, capsys):
    code = main(["train", "--expert", "7", "--config", "tiny", "--out", str(tmp_path / "run")])
    assert code == 1
    assert "expert index 7 out of range" in capsys.readouterr().err


def test_router_stage_requires_masked_schedule(tmp_path, capsys):
    code = main(["train", "--router", "--config", "tiny", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "masked schedule" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_before_training_says_what_is_missing(tmp_path, capsys):
    code = main(["evaluate", "--config", "tiny", "--out", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "unfinished stages" in err and "base" in err


def test_run_dir_is_pinned_to_its_config(tmp_path):
    tiny = load_config("tiny")
    prepare_run_dir(tmp_path / "run", tiny)
    prepare_run_dir(tmp_path / "run", tiny)  # same config: fine
    with pytest.raises(RunDirError, match=r"different config \(differs in: name, schedule\)"):
        prepare_run_dir(tmp_path / "run", tiny.replace(schedule="masked", name="tiny-masked"))
