"""Tests for dfm.sharding and the sharded steps of dfm.train, on 8 simulated CPU devices (conftest).

Sharded and one-device computations must agree: loss and every gradient within 1e-5 on data-only,
FSDP, tensor-parallel and mixed meshes; checkpoints saved on one mesh restore on another.

Every mesh is built from `cpu_devices(8)` and every one-device reference runs on the first CPU
device (`on_cpu`), so on a GPU machine these tests check the same sharding logic on the CPU
devices instead of failing for want of 8 accelerators.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from dfm.models import Decoder, DecoderConfig
from tiny_models import cpu_devices, lm_loss, on_cpu, tiny_decoder
from dfm.sharding import (DEFAULT_RULES, MeshConfig, constrain, global_batch, init_sharded, logical_to_spec,
                          make_mesh, rules_from_table, shard_module, use_rules)
from dfm.train import TrainConfig, load_model, make_eval_step, make_grad_fn, save_model, train

CONFIG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2)
DATA = np.random.default_rng(1).integers(0, 64, (8, 12)).astype(np.int32)
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2)}
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _run_on_cpu():
    """One-device references and fresh models on the CPU too (the meshes below are CPU devices)."""
    with on_cpu():
        yield


def mesh_of(data, fsdp, tensor, n=8):
    """`make_mesh` over the first `n` CPU devices."""
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices=cpu_devices(n))


def new_model(seed=0):
    return tiny_decoder(CONFIG, seed)


def flat(state):
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def reference():
    loss, metrics, grads = make_grad_fn(lm_loss, new_model())(jnp.asarray(DATA), jax.random.PRNGKey(3))
    return float(loss), flat(grads)


# ---------------------------------------------------------------------------------------------- mesh
def test_mesh_config_fills_one_axis_and_validates():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=2, tensor=4).shape(8) == (1, 2, 4)
    assert MeshConfig.from_mapping({"tensor": 2}) == MeshConfig(data=-1, fsdp=1, tensor=2)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="^fsdp:"):
        MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="^num_devices:"):
        MeshConfig(data=3).shape(8)
    with pytest.raises(ValueError, match="^num_devices:"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ValueError, match="unknown keys"):
        MeshConfig.from_mapping({"model": 2})
    mesh = mesh_of(2, 2, 2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert make_mesh(MeshConfig(data=-1, fsdp=2), devices=cpu_devices(4)).devices.shape == (2, 2, 1)


def test_rules_table_parses_toml_rows_and_resolves_forgivingly():
    rules = rules_from_table([["embed", "fsdp"], ["batch", ["data", "fsdp"]], ["norm", ""], ["mlp", "tensor"],
                              ["heads", ["tensor"]]])
    assert rules == (("embed", "fsdp"), ("batch", ("data", "fsdp")), ("norm", None), ("mlp", "tensor"),
                     ("heads", "tensor"))
    sizes = {"data": 2, "fsdp": 2, "tensor": 4}
    assert logical_to_spec(("embed", "mlp"), (32, 64), sizes, rules) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", None), (8, 3), sizes, rules) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", None), (6, 3), sizes, rules) == P("data", None)   # 4 does not divide 6
    assert logical_to_spec(("mlp", "heads"), (8, 8), sizes, rules) == P("tensor", None)  # tensor used once
    assert logical_to_spec(("vocab", "embed"), (50, 32), sizes, DEFAULT_RULES) == P(None, "fsdp")
    assert logical_to_spec(("embed",), (32,), {"data": 8, "fsdp": 1, "tensor": 1}, rules) == P(None)
    with pytest.raises(ValueError, match="^names: logical axis 'vocab' has no rule"):
        logical_to_spec(("vocab",), (64,), sizes, rules)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        rules_from_table([["mlp", "model"]])
    with pytest.raises(ValueError, match="appears twice"):
        rules_from_table([["mlp", "tensor"], ["mlp", None]])
    with pytest.raises(ValueError, match="rules: each row"):
        rules_from_table([["mlp"]])


def test_constrain_is_identity_without_a_mesh_and_pins_activations_inside_use_rules():
    x = jnp.ones((8, 4, 16))
    names = ("activation_batch", "activation_length", "activation_mlp")
    assert constrain(x, names) is x
    mesh = mesh_of(2, 2, 2)
    with use_rules(mesh):
        y = jax.jit(lambda a: constrain(a * 2, names))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 16)))


def test_parameters_and_batches_are_placed_by_logical_names():
    mesh = mesh_of(1, 2, 4)
    model = shard_module(new_model(), mesh)
    assert model.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers[0].mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers[0].self_attn.k_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.norm.scale[...].sharding.spec == P(None)
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), np.asarray(new_model().lm_head.kernel[...]))
    batch = global_batch({"tokens": DATA, "n": np.int32(3)}, mesh)
    assert batch["tokens"].sharding.spec == P("fsdp", None) and batch["n"].sharding.spec == P()
    with pytest.raises(ValueError, match="^batch: global batch size 6"):
        global_batch(DATA[:6], mesh_of(4, 1, 2))


# -------------------------------------------------------------------- sharded vs one-device numerics
@pytest.mark.parametrize("kind", list(MESHES))
def test_sharded_loss_and_gradients_equal_one_device(kind, reference):
    ref_loss, ref_grads = reference
    mesh = mesh_of(*MESHES[kind])
    loss, metrics, grads = make_grad_fn(lm_loss, new_model(), mesh=mesh)(DATA, jax.random.PRNGKey(3))
    assert abs(float(loss) - ref_loss) <= TOL
    got = flat(grads)
    assert got.keys() == ref_grads.keys()
    worst = max(float(np.max(np.abs(got[k] - ref_grads[k]))) for k in got)
    assert worst <= TOL, (kind, worst)
    assert max(float(np.max(np.abs(g))) for g in got.values()) > 1e-3   # gradients are not trivially zero
    # the gradients really are sharded like the parameters on this mesh
    mlp_spec = grads["layers"][0]["mlp"]["gate_proj"]["kernel"].get_value().sharding.spec
    expected = {"data": P(None, None), "fsdp": P("fsdp", None), "tensor": P(None, "tensor"),
                "mixed": P("fsdp", "tensor")}[kind]
    assert mlp_spec == expected


def test_sharded_inference_returns_batch_split_logits_equal_to_one_device():
    mesh = mesh_of(2, 2, 2)
    logits = make_eval_step(lambda m, tokens: m(tokens), new_model(), mesh=mesh, split_outputs=True)(DATA)
    assert logits.shape == (8, 12, 64) and logits.sharding.spec == P(("data", "fsdp"), None, None)
    one_device = make_eval_step(lambda m, tokens: m(tokens), new_model())(jnp.asarray(DATA))   # mesh=None
    np.testing.assert_allclose(np.asarray(logits), np.asarray(one_device), atol=TOL, rtol=0)
    assert float(np.std(np.asarray(one_device))) > 1e-3


# ---------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_saved_on_one_mesh_restores_identically_on_another(tmp_path):
    source = shard_module(new_model(seed=5), mesh_of(2, 2, 2))
    assert source.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    save_model(source, tmp_path / "model")
    target_mesh = mesh_of(1, 2, 4)
    restored = load_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "model", mesh=target_mesh)
    want, got = flat(nnx.state(source)), flat(nnx.state(restored))
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path])
    table = restored.embed_tokens.embedding[...]
    assert table.sharding.mesh == target_mesh and table.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in table.addressable_shards} == {(16, 16)}      # 64/4 x 32/2


def test_checkpoint_saved_on_a_mesh_restores_unsharded(tmp_path):
    """Saved from a mesh of 8 CPU devices, restored onto the default device (a GPU where there is
    one: `load_model` targets `jax.devices()[0]`, not the device ids in the checkpoint)."""
    source = shard_module(new_model(seed=5), mesh_of(2, 2, 2))
    save_model(source, tmp_path / "model")
    unsharded = load_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "model")
    np.testing.assert_array_equal(np.asarray(unsharded.lm_head.kernel[...]), np.asarray(source.lm_head.kernel[...]))


def test_training_resumes_on_a_different_mesh_and_matches_one_device(tmp_path):
    config = TrainConfig(steps=3, learning_rate=5e-3, log_every=1, checkpoint_every=100, seed=2)
    straight = train(new_model(), lm_loss, lambda step: jnp.asarray(np.roll(DATA, step, 0)), config, progress=False)
    batches = lambda step: np.roll(DATA, step, 0)   # noqa: E731  (process-local rows = all rows here)
    first = train(new_model(), lm_loss, batches, config, checkpoint_dir=tmp_path, stop_after=2, progress=False,
                  mesh=mesh_of(2, 2, 2))
    assert first.steps_done == 2
    mesh_b = mesh_of(1, 2, 4)
    resumed = train(new_model(seed=9), lm_loss, batches, config, checkpoint_dir=tmp_path, progress=False, mesh=mesh_b)
    assert resumed.steps_done == 3 and [r["step"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("loss", "nll", "grad_norm", "lr"):
            assert abs(a[key] - b[key]) <= TOL, (key, a[key], b[key])
    # Adam divides by sqrt(v): a 1e-8 gradient difference on a near-zero gradient entry moves that
    # parameter by up to ~lr, so parameters are compared at 2% of the learning rate (5e-3)
    want, got = flat(nnx.state(straight.model)), flat(nnx.state(resumed.model))
    assert max(float(np.max(np.abs(want[k] - got[k]))) for k in want) <= 1e-4
    assert resumed.model.lm_head.kernel[...].sharding.mesh == mesh_b


def test_init_sharded_equals_shard_module_of_the_same_factory():
    small = CONFIG.replace(num_layers=1, hidden_size=16, intermediate_size=32)
    mesh = mesh_of(2, 2, 2)
    direct = init_sharded(lambda: Decoder(small, rngs=nnx.Rngs(4)), mesh)
    assert direct.layers[0].mlp.up_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    one_device = jax.jit(lambda: nnx.state(Decoder(small, rngs=nnx.Rngs(4))))()
    want, got = flat(one_device), flat(nnx.state(direct))
    assert want.keys() == got.keys() and np.std(want[("lm_head", "kernel")]) > 0.01
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=1e-7, rtol=0)


def test_validation_of_a_sharded_model_equals_one_device(tmp_path):
    """`experiments.engine.validation.make_validate` on a model trained on a 2 x 2 x 2 mesh (its state
    sharded) gives the one-device value, and the kept best-validation parameters are placed back."""
    from experiments.engine.validation import make_validate

    validate = make_validate(lm_loss, [jnp.asarray(DATA[:5]), jnp.asarray(DATA[5:])])
    ref = validate(new_model())
    sharded = shard_module(new_model(), mesh_of(2, 2, 2))
    assert validate(sharded) == pytest.approx(ref, abs=TOL)
    config = TrainConfig(steps=4, learning_rate=1e-2, validate_every=2, keep_best=True, log_every=2)
    result = train(sharded, lm_loss, lambda step: DATA, config, mesh=mesh_of(2, 2, 2), progress=False,
                   validate=validate, checkpoint_dir=tmp_path / "ckpt")
    assert [r["step"] for r in result.validation] == [0, 2, 4]
    assert validate(sharded) == pytest.approx(result.best_val_loss, abs=TOL)
