"""Tests for dfm.train: optimizer and schedule, the training loop, exact resume, model hand-off."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dfm.models import Decoder, DecoderConfig
from tiny_models import assert_same_run, lm_loss, same_numbers, tiny_decoder
from dfm.train import TrainConfig, learning_rate_schedule, load_model, make_optimizer, save_model, train

CONFIG = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2)
DATA = jax.random.randint(jax.random.key(0), (4, 12), 0, 50, dtype=jnp.int32)


def new_model(seed=0):
    return tiny_decoder(CONFIG, seed)


def batches(step):
    return jnp.roll(DATA, step % 3, axis=0)  # deterministic in the step, not constant


def params(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def no_wall(history):
    return [{k: v for k, v in row.items() if k != "wall"} for row in history]


def test_loss_decreases_on_a_memorizable_batch():
    config = TrainConfig(steps=40, learning_rate=1e-2, warmup_steps=3, log_every=1, weight_decay=0.01)
    result = train(new_model(), lm_loss, lambda step: DATA, config, progress=False)
    losses = [row["nll"] for row in result.history]
    assert result.steps_done == 40 and len(result.history) == 40
    assert losses[0] > np.log(50) - 0.3            # starts near uniform
    assert losses[-1] < 0.25 * losses[0]
    assert [row["step"] for row in result.history] == list(range(1, 41))
    assert result.history[0]["tokens"] == 44.0
    assert result.history[0]["lr"] == 0.0 and result.history[3]["lr"] == pytest.approx(1e-2)


# One optimizer setting for most tests, so the jitted step is compiled once per test session.
RESUME_CONFIG = TrainConfig(steps=10, learning_rate=5e-3, warmup_steps=2, log_every=2, checkpoint_every=4,
                            weight_decay=0.1, seed=7)


def test_resume_is_exact(tmp_path):
    config = RESUME_CONFIG
    straight = train(new_model(), lm_loss, batches, config, progress=False)

    ckpt = tmp_path / "run"
    first = train(new_model(), lm_loss, batches, config, checkpoint_dir=ckpt, stop_after=6, progress=False)
    assert first.steps_done == 6 and [r["step"] for r in first.history] == [2, 4, 6]
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [4, 6]
    # a fresh model object with different initial values: everything must come from the checkpoint
    resumed = train(new_model(seed=1), lm_loss, batches, config, checkpoint_dir=ckpt, progress=False)
    assert resumed.steps_done == 10
    # bit-exact on CPU, and on a GPU with XLA_FLAGS=--xla_gpu_deterministic_ops=true; otherwise GPU
    # reductions are nondeterministic and the two runs agree to float rounding (tiny_models.assert_same_run)
    assert same_numbers(no_wall(resumed.history), no_wall(straight.history))
    for a, b in zip(params(straight.model), params(resumed.model), strict=True):
        assert_same_run(a, b)
    walls = [row["wall"] for row in resumed.history]
    assert walls == sorted(walls)

    # a finished run returns at once, restoring the final parameters, without asking for data
    def no_batches(step):
        raise AssertionError("a finished run must not train")

    again = train(new_model(seed=2), lm_loss, no_batches, config, checkpoint_dir=ckpt, progress=False)
    assert again.steps_done == 10 and again.history == resumed.history
    for a, b in zip(params(resumed.model), params(again.model), strict=True):
        np.testing.assert_array_equal(a, b)          # restored from the final checkpoint: always exact


def test_key_changes_with_seed():
    config = RESUME_CONFIG.replace(log_every=1)
    a = train(new_model(), lm_loss, batches, config, stop_after=1, progress=False)
    b = train(new_model(), lm_loss, batches, config.replace(seed=1), stop_after=1, progress=False)
    assert a.history[0]["nll"] == b.history[0]["nll"]        # same data and init
    assert a.history[0]["loss"] != b.history[0]["loss"]      # different per-step key


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "ckpt"
    with pytest.raises(ValueError, match=r"checkpoint_dir.*a_file"):
        train(new_model(), lm_loss, batches, TrainConfig(steps=2), checkpoint_dir=bad, progress=False)


def test_checkpoint_from_a_longer_run_is_rejected(tmp_path):
    train(new_model(), lm_loss, batches, RESUME_CONFIG, checkpoint_dir=tmp_path, stop_after=3, progress=False)
    with pytest.raises(ValueError, match="step 3 > config.steps=2"):
        train(new_model(), lm_loss, batches, RESUME_CONFIG.replace(steps=2, warmup_steps=0),
              checkpoint_dir=tmp_path, progress=False)


def test_nan_loss_raises():
    def nan_loss(model, batch, key):
        return jnp.sum(model.norm.scale[...]) * jnp.nan, {}

    with pytest.raises(FloatingPointError, match="step 1"):
        train(new_model(), nan_loss, batches, TrainConfig(steps=3, log_every=1), progress=False)


def test_learning_rate_schedules():
    cos = learning_rate_schedule(TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1))
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.55, abs=1e-6)      # half-way down the cosine
    assert float(cos(100)) == pytest.approx(0.1)
    const = learning_rate_schedule(TrainConfig(steps=100, learning_rate=2.0, warmup_steps=4, schedule="constant"))
    assert [float(const(s)) for s in (0, 2, 4, 99)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    flat = learning_rate_schedule(TrainConfig(steps=10, learning_rate=3.0, schedule="constant"))
    assert float(flat(0)) == 3.0


def test_weight_decay_skips_vectors_and_clipping_bounds_the_update():
    config = TrainConfig(steps=10, learning_rate=0.1, weight_decay=0.5, grad_clip=1.0, b1=0.0, b2=0.0,
                         schedule="constant")
    tx = make_optimizer(config)
    p = {"matrix": jnp.ones((2, 2)), "vector": jnp.ones(3)}
    zero = jax.tree.map(jnp.zeros_like, p)
    updates, _ = tx.update(zero, tx.init(p), p)
    np.testing.assert_allclose(updates["matrix"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["vector"], np.zeros(3))
    # clipping: a huge gradient is scaled to global norm 1 before Adam (b2 = 0: update = -lr * sign)
    grads = {"matrix": jnp.full((2, 2), 1e6), "vector": jnp.zeros(3)}
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, clip.init(p))
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0)
    updates, _ = tx.update(grads, tx.init(p), p)
    assert np.all(np.isfinite(updates["matrix"])) and float(jnp.abs(updates["matrix"]).max()) < 0.2


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(warmup_steps=11), "warmup_steps"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(b2=1.0), "b2"),
    (dict(schedule="linear"), "schedule"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(checkpoint_every=0), "checkpoint_every"),
])
def test_train_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{"steps": 10, **kwargs})


def test_train_argument_errors():
    with pytest.raises(ValueError, match="stop_after"):
        train(new_model(), lm_loss, batches, TrainConfig(steps=2), stop_after=0, progress=False)
    with pytest.raises(ValueError, match="config"):
        train(new_model(), lm_loss, batches, {"steps": 2}, progress=False)


def test_save_and_load_model_round_trip(tmp_path):
    model = new_model(seed=3)
    save_model(model, tmp_path / "base")
    from_factory = load_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "base")
    template = new_model(seed=4)
    from_template = load_model(template, tmp_path / "base")
    for a, b, c in zip(params(model), params(from_factory), params(from_template), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert not np.array_equal(params(template)[0], params(model)[0])   # the template is left alone
    assert isinstance(from_factory, Decoder) and from_factory.config == CONFIG
    # default placement, like a fresh model: a committed array would recompile the first train step
    assert not any(a.committed for a in jax.tree.leaves(nnx.state(from_factory)))
    with pytest.raises(ValueError, match="directory"):
        load_model(new_model, tmp_path / "missing")


def test_learning_rate_argument_optimizer_matches_the_scheduled_one():
    config = TrainConfig(steps=6, learning_rate=0.05, warmup_steps=2, weight_decay=0.1, grad_clip=0.5)
    scheduled, dynamic = make_optimizer(config), make_optimizer(config, lr_argument=True)
    schedule = learning_rate_schedule(config)
    p = {"matrix": jnp.arange(6.0).reshape(2, 3), "vector": jnp.ones(3)}
    s1, s2, p1, p2 = scheduled.init(p), dynamic.init(p), p, p
    for step in range(config.steps):
        g = jax.tree.map(lambda x: jnp.sin(x * (step + 1)), p1)
        u1, s1 = scheduled.update(g, s1, p1)
        u2, s2 = dynamic.update(g, s2, p2, learning_rate=schedule(step))
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(p1["matrix"], p["matrix"])
    with pytest.raises(ValueError, match="learning_rate"):
        dynamic.update(p, dynamic.init(p), p)


def test_stages_with_different_schedules_share_the_optimizer():
    """The jitted step keys on the optimizer object: steps, LR, warmup, schedule must not change it."""
    from dfm.train.loop import _optimizer_for

    a = TrainConfig(steps=24, learning_rate=3e-3, warmup_steps=4, weight_decay=0.01, seed=0)
    b = TrainConfig(steps=7, learning_rate=1e-3, warmup_steps=1, weight_decay=0.01, seed=5, schedule="constant")
    assert _optimizer_for(a) is _optimizer_for(b)
    assert _optimizer_for(a) is not _optimizer_for(a.replace(weight_decay=0.0))


def test_frozen_prefixes_keep_parameters_bit_identical():
    model = tiny_decoder(CONFIG)
    before = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    data = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 9)))
    cfg = TrainConfig(steps=3, learning_rate=1e-2, weight_decay=0.1, frozen=("embed_tokens", "layers.0.mlp"))
    train(model, lm_loss, lambda step: data, cfg, progress=False)
    after = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    frozen = [k for k in before if k.startswith(("embed_tokens.", "layers.0.mlp."))]
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)
    assert set(moved) == set(before) - set(frozen)   # everything else was updated
    with pytest.raises(ValueError, match="frozen"):
        TrainConfig(steps=1, frozen=["embed_tokens"])
