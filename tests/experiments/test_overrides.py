"""Command-line config overrides (`KEY=VALUE`), `dfm config show|list`, `--version`, `--help`,
and `import dfm; dfm.hf`."""
import subprocess
import sys
import tomllib

import pytest

from experiments.cli import main
from experiments.engine.config import (
    ConfigError,
    apply_overrides,
    available_configs,
    is_override,
    parse_override,
)
from experiments.registry import load_job


@pytest.mark.parametrize("arg, key, value", [
    ("stage2.steps=200", ("stage2", "steps"), 200),
    ("model.tie_word_embeddings=false", ("model", "tie_word_embeddings"), False),
    ('name="x"', ("name",), "x"),
    ('numerics.attention="xla"', ("numerics", "attention"), "xla"),
    ("numerics.attention=xla", ("numerics", "attention"), "xla"),          # bare string
    ("stage2.learning_rate=3e-4", ("stage2", "learning_rate"), 3e-4),
    ("seed=3", ("seed",), 3),
    ("name=my-run", ("name",), "my-run"),
])
def test_values_parse_as_toml_or_bare_strings(arg, key, value):
    assert parse_override(arg) == (key, value)
    assert is_override(arg)


def test_malformed_overrides():
    for arg in ("stage2.steps", "=3", "a.b.c=1", "stage 2.steps=1"):
        assert not is_override(arg)
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_override(arg)
    with pytest.raises(ConfigError, match="not a \\[seed\\] table"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


def test_overrides_are_applied_and_validated_like_the_file():
    _, config = load_job("tiny", None, ["stage2.steps=200", "seed=3", "numerics.attention=xla",
                                        "model.tie_word_embeddings=false"])
    assert (config.stage2.steps, config.seed, config.numerics.attention) == (200, 3, "xla")
    assert config.model.tie_word_embeddings is False
    assert config.stage2.batch_size == load_job("tiny")[1].stage2.batch_size   # the rest of the file stays
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in section \[stage2\]"):
        load_job("tiny", None, ["stage2.stepz=3"])
    with pytest.raises(ConfigError, match=r"stage2\.steps: must be >= 1, got 0"):
        load_job("tiny", None, ["stage2.steps=0"])
    with pytest.raises(ConfigError, match=r"stage2\.steps: expected int, got 'many'"):
        load_job("tiny", None, ["stage2.steps=many"])
    with pytest.raises(ConfigError, match=r"unknown key 'nope' at top level"):
        load_job("tiny", None, ["nope=1"])
    with pytest.raises(ConfigError, match=r"numerics\.attention: must be one of"):
        load_job("tiny", None, ["numerics.attention=flash"])


def test_config_show_prints_the_resolved_toml(capsys):
    assert main(["config", "show", "tiny", "stage2.steps=7", "seed=5"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["stage2"]["steps"] == 7 and resolved["seed"] == 5 and resolved["name"] == "tiny"
    assert main(["config", "show", "tiny", "stage2.stepz=7"]) == 2
    assert "unknown key 'stepz' in section [stage2]" in capsys.readouterr().err
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted(available_configs()) and {"default", "tiny", "mllm-tiny"} <= set(listed)


def test_bad_override_on_a_command_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main(["run", "--config", "tiny", "--out", str(tmp_path / "r"), "stage2.stepz=3"]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    assert main(["train", "--expert", "0", "--config", "tiny", "--out", str(tmp_path / "r"), "base.steps=-1"]) == 2
    assert "base.steps: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_overrides_are_pinned_and_a_changed_override_is_refused(tmp_path, capsys):
    """The run directory pins the resolved config: evaluating a run with another override value is
    the same error as a changed file (nothing trained here: evaluate stops at the missing stages)."""
    out = str(tmp_path / "run")
    assert main(["evaluate", "--config", "tiny", "--out", out, "stage2.steps=7"]) == 1
    captured = capsys.readouterr()
    assert "[config] stage2.steps = 7 (was 16 in tiny)" in captured.out
    assert tomllib.loads((tmp_path / "run" / "resolved.toml").read_text())["stage2"]["steps"] == 7
    assert main(["evaluate", "--config", "tiny", "--out", out, "stage2.steps=7", "--quiet"]) == 1   # same: fine
    assert "unfinished stages" in capsys.readouterr().err
    assert main(["evaluate", "--config", "tiny", "--out", out, "stage2.steps=8"]) == 1
    assert "holds a run of a different config (differs in: stage2.steps)" in capsys.readouterr().err
    assert main(["evaluate", "--config", "tiny", "--out", out]) == 1            # the file without the override
    assert "differs in: stage2.steps" in capsys.readouterr().err


def test_overrides_may_follow_options():
    from experiments.cli import _parse, _parser

    args = _parse(_parser(), ["train", "seed=1", "--expert", "1", "stage2.steps=3", "--quiet"])
    assert args.overrides == ["seed=1", "stage2.steps=3"] and args.expert == 1 and args.quiet
    with pytest.raises(SystemExit):
        _parse(_parser(), ["run", "--config", "tiny", "--bogus"])


def test_version_and_help(capsys):
    from dfm import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"dfm {__version__}"
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "--help"], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0
    for text in ("tiny", "default", "mllm-digits", "stage2.steps=", "config show", "--version", "examples"):
        assert text in out.stdout


def test_dfm_hf_is_a_lazy_submodule():
    out = subprocess.run([sys.executable, "-c", "import dfm; print(dfm.hf.__name__)"], capture_output=True, check=False,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dfm.hf"
