"""`dfm plan`: abstract model + optimizer laid out on the mesh; exact parameter / optimizer bytes."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.cli import main
from experiments.engine import plan as planning
from experiments.registry import load_job


@pytest.fixture(scope="module")
def tiny_plan():
    task, config = load_job("mllm-tiny", None, ["mesh.fsdp=-1", "numerics.dtype=bfloat16"])
    return task, config, planning.plan(task, config, 8, planning.parse_size("80GiB"))


def test_parameter_count_matches_the_built_model(tiny_plan):
    task, config, p = tiny_plan
    factory, _ = planning.model_factory(task, config)
    model = factory()   # concrete
    params = nnx.state(model, nnx.Param)
    assert p["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and p["mesh_built"]


def test_fsdp_shards_parameters_by_eight_except_non_divisible(tiny_plan):
    _, _, p = tiny_plan
    sharded = replicated = 0
    for leaf in p["parameter_leaves"]:
        n, k = np.prod(leaf["shape"]), np.prod(leaf["shard"])
        assert k in (n, n / 8), leaf
        if k == n:
            replicated += n * 4
        else:
            sharded += n * 4
    assert sharded > replicated
    for row in p["stages"].values():
        assert row["parameters"] == sharded / 8 + replicated


def test_optimizer_state_is_two_float32_copies_of_the_trainable_parameters(tiny_plan):
    _, _, p = tiny_plan
    s1, s2 = p["stages"]["stage1"], p["stages"]["stage2"]
    assert s1["trainable"] == p["parameters"]                  # stage 1 trains everything
    assert s2["trainable"] < p["parameters"]                   # stage 2 freezes the vision tower
    for row in (s1, s2):
        # + the int32 step counters of the optimizer and of scale_by_adam
        assert 0 <= row["optimizer_global"] - 2 * 4 * row["trainable"] <= 16
    assert s2["activations_detail"]["vision"] == 0 < s1["activations_detail"]["vision"]


def test_remat_orders_the_activation_estimate():
    task, config = load_job("mllm-tiny", None, ["mesh.fsdp=-1", "text.num_layers=4"])
    acts = {r: planning.plan(task, config.replace(numerics=config.numerics.__class__(remat=r)), 8)
            ["stages"]["stage2"]["activations_detail"]["decoder"] for r in ("none", "dots", "full")}
    assert acts["full"] < acts["dots"] < acts["none"]


def test_arithmetic_layout_equals_the_mesh_layout(monkeypatch, tiny_plan):
    """More devices than exist: shard shapes come from the PartitionSpecs, same numbers as a mesh."""
    task, config, built = tiny_plan
    one = [jax.devices("cpu")[0]]
    monkeypatch.setattr(planning.jax, "devices", lambda *a: one)
    computed = planning.plan(task, config, 8, planning.parse_size("80GiB"))
    assert built["mesh_built"] and not computed["mesh_built"]
    assert computed["parameter_leaves"] == built["parameter_leaves"]
    assert computed["stages"] == built["stages"]


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("80e9", 80 * 10**9),
                                            ("141 gb", 141 * 10**9), ("512MiB", 2**29), ("1024", 1024)])
def test_parse_size(text, expected):
    assert planning.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "80XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="device memory"):
        planning.parse_size(text)


def test_cli_plan_llava_7b(capsys):
    assert main(["plan", "--config", "llava-1.5-7b", "--devices", "8", "--device-memory", "80GiB", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert 7.0e9 < p["parameters"] < 7.1e9                     # LLaVA-1.5-7B: ~7.06B parameters
    assert 112e9 < p["rule_of_thumb"]["total"] < 114e9         # 16 B / parameter ~ 113 GB
    assert p["fits"] is True
    s2 = p["stages"]["stage2"]
    assert s2["parameters"] == pytest.approx(p["parameter_bytes"] / 8, rel=1e-3)
    assert main(["plan", "--config", "llava-1.5-7b", "--devices", "8", "--device-memory", "80GiB"]) == 0
    text = capsys.readouterr().out
    assert "| **total** |" in text and "fits" in text and "rule of thumb" in text


def test_cli_plan_errors(capsys):
    assert main(["plan", "--config", "mllm-tiny", "--devices", "3", "mesh.fsdp=2"]) == 2
    assert "plan:" in capsys.readouterr().err
    assert main(["plan", "--config", "mllm-tiny", "--devices", "8", "--device-memory", "lots"]) == 2
    assert "device memory" in capsys.readouterr().err


def test_plan_text_task():
    task, config = load_job("tiny", None, ["mesh.data=-1"])
    p = planning.plan(task, config, 8, 2**30)
    assert set(p["stages"]) == {"base", "stage2"} and p["fits"]
    assert p["stages"]["base"]["trainable"] == p["parameters"]


def test_logits_estimate_counts_one_microbatch_and_one_chunk_of_the_tiled_loss():
    """Logits and their gradient in float32 for the microbatch's sequences (`2 x 4 b s V` + the float32
    output-projection gradient `4 V h`); with `numerics.loss_chunk = N` only one chunk's (`b N V`)."""
    from types import SimpleNamespace

    dims = planning.Dims(seq_len=8192, hidden=896, intermediate=4864, layers=2, heads=14, kv_dim=128, vocab=151674)
    plain = SimpleNamespace(dtype="bfloat16", remat="full", attention="auto", loss_chunk=0)
    tiled = SimpleNamespace(dtype="bfloat16", remat="full", attention="auto", loss_chunk=256)
    head = 4 * 151674 * 896
    assert planning.activation_bytes(dims, plain, 4, 1, False)["logits"] == 8 * 4 * 8192 * 151674 + head
    assert planning.activation_bytes(dims, tiled, 4, 1, False)["logits"] == 8 * 4 * 256 * 151674 + head
    assert planning.loss_chunk(plain) == 0 and planning.loss_chunk(tiled) == 256
    # the microbatch, not the per-device batch: 4 microbatches of 128 / 8 devices = 4 sequences each
    task, config = load_job("internvl2.5-1b", None, [])
    row = planning.plan(task, config, 8, vocab=151674)["stages"]["stage2"]
    assert config.numerics.microbatches == 4 and row["sequences_per_device"] == 4
    assert config.numerics.loss_chunk == 256                    # the shipped config tiles the loss
    assert row["activations_detail"]["logits"] == 8 * 4 * 256 * 151674 + head
    task, config = load_job("internvl2.5-1b", None, ["numerics.loss_chunk=0"])
    row = planning.plan(task, config, 8, vocab=151674)["stages"]["stage2"]
    assert row["activations_detail"]["logits"] == 8 * 4 * 8192 * 151674 + head
