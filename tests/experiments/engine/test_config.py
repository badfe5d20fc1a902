"""Job configs: every shipped TOML parses; unknown keys and bad values are named errors."""
import dataclasses
import tomllib

import pytest

from experiments.engine.config import ConfigError, available_configs, resolve_path
from experiments.registry import load_job
from experiments.text.config import ExperimentConfig, load_config

from_dict = ExperimentConfig.from_dict


def test_shipped_configs_include_default_and_tiny():
    names = available_configs()
    assert "default" in names and "tiny" in names and "mllm-tiny" in names


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_parses_and_round_trips(name):
    task, config = load_job(name)
    raw = tomllib.loads(resolve_path(name).read_text())
    assert task.name == raw.get("task", "text") == config.task
    assert config.name == name
    again = type(config).from_dict(tomllib.loads(config.to_toml()), name=name)
    assert again == config
    assert again.to_toml() == config.to_toml()


def test_unknown_task_is_named(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text('task = "speech"\n')
    with pytest.raises(ConfigError, match=r"odd.toml: task: must be one of \['text', 'mllm'\], got 'speech'"):
        load_job(str(path))


def test_load_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("seed = 3\n[data]\nseq_len = 64\n")
    config = load_config(str(path))
    assert (config.name, config.seed, config.data.seq_len) == ("mine", 3, 64)
    assert config.data.vocab_size == ExperimentConfig().data.vocab_size


def test_unknown_key_in_section_names_key_and_section():
    with pytest.raises(ConfigError, match=r"unknown key 'hiden_size' in section \[model\]"):
        from_dict({"model": {"hiden_size": 64}})


def test_unknown_top_level_key_and_section():
    with pytest.raises(ConfigError, match=r"unknown key 'sed' at top level"):
        from_dict({"sed": 1})
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer' at top level"):
        from_dict({"optimizer": {"lr": 1.0}})


def test_unknown_key_error_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[base]\nstep = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "'step'" in str(err.value) and "[base]" in str(err.value)


@pytest.mark.parametrize("raw, field", [
    ({"base": {"steps": 0}}, "base.steps: must be >= 1"),
    ({"base": {"steps": "ten"}}, "base.steps: expected int"),
    ({"base": {"steps": True}}, "base.steps: expected int"),
    ({"stage2": {"learning_rate": 0.0}}, "stage2.learning_rate: must be > 0"),
    ({"data": {"vocab_size": 100}}, "data.vocab_size: must be >= 260"),
    ({"schedule": "diffusion"}, "schedule: must be one of"),
    ({"masked": {"scheduler": "sigmoid"}}, "masked.scheduler: must be one of"),
    ({"data": {"exclude_dirs": [1, 2]}}, "data.exclude_dirs: expected list of str"),
    ({"eval": {"top_k": 5}, "partition": {"num_clusters": 4}}, "eval.top_k: must be <= partition.num_clusters"),
    ({"model": {"hidden_size": 100, "num_heads": 3}}, "model.num_heads"),
    ({"data": {"seq_len": 16}, "eval": {"sample_length": 32}}, "eval.sample_length"),
    ({"model": 3}, "model: expected a [model] table"),
])
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert field in str(err.value)


def test_float_field_accepts_int_and_config_is_frozen():
    config = from_dict({"stage2": {"learning_rate": 1}})
    assert config.stage2.learning_rate == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 2


def test_unknown_config_name_lists_available():
    with pytest.raises(ConfigError, match="available: .*default"):
        resolve_path("no-such-config")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_path("/nonexistent/x.toml")


def test_invalid_toml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[data\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(path))


def test_mesh_section_default_is_unsharded_and_fills_devices_when_asked(monkeypatch):
    from tiny_models import cpu_devices

    import dfm.sharding
    from experiments.engine.training import training_mesh

    assert training_mesh(from_dict({}).mesh) is None                  # default 1 x 1 x 1: no mesh
    devices = cpu_devices(8)    # the simulated CPU devices, also on a machine with one GPU
    make_mesh = dfm.sharding.make_mesh
    monkeypatch.setattr(dfm.sharding, "make_mesh", lambda config: make_mesh(config, devices=devices))
    mesh = training_mesh(from_dict({"mesh": {"data": -1, "tensor": 2}}).mesh)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match=r"^mesh\.fsdp: must be -1 \(fill\) or >= 1"):
        from_dict({"mesh": {"fsdp": 0}})
    with pytest.raises(ConfigError, match=r"unknown key 'pipeline' in section \[mesh\]"):
        from_dict({"mesh": {"pipeline": 2}})
