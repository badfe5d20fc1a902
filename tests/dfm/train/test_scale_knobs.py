"""The scale knobs: remat, scan over layers, gradient accumulation, mixed precision, matmul
precision, frozen parameters without optimizer state, async checkpoints, the cached train step.

Each knob is checked against the plain computation it replaces: same loss and gradients within
float32 rounding (remat, scan, microbatches), same parameters after training, same tokens.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dfm import autoregressive, losses
from dfm.models import (
    Decoder,
    DecoderConfig,
    greedy_generate,
    stack_layers,
    unstack_layers,
)
from dfm.train import TrainConfig, make_optimizer, make_train_step, train
from dfm.train.steps import value_and_grads

CONFIG = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                       num_kv_heads=2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 39, (4, 12)), jnp.int32)


def ar_loss(model, x, key):
    del key
    return jnp.mean(losses.ar_nll(model(autoregressive.shift_right(x, 39)), x)) / x.shape[1], {}


def grads_of(model, x=TOKENS):
    loss, _, grads = value_and_grads(ar_loss, model, x, jax.random.key(0))
    return float(loss), nnx.to_pure_dict(grads)


def host(model):
    """A host copy of the model's variables (the train step donates the device buffers)."""
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def stacked(pure):
    """Per-layer gradients `{"layers": {i: ...}}` stacked like a scanned model's."""
    out = dict(pure)
    layers = out.pop("layers")
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
    return out


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    plain = Decoder(CONFIG, rngs=nnx.Rngs(1))
    rematted = Decoder(CONFIG.replace(remat=remat), rngs=nnx.Rngs(1))
    loss0, g0 = grads_of(plain)
    loss1, g1 = grads_of(rematted)
    assert loss1 == pytest.approx(loss0, abs=1e-7)
    assert max_diff(g0, g1) < 1e-6


def test_scanned_layers_same_logits_gradients_tokens_and_back():
    plain = Decoder(CONFIG, rngs=nnx.Rngs(2))
    scanned = stack_layers(plain)
    assert scanned.config.scan_layers
    kernel = scanned.layers.self_attn.q_proj.kernel
    assert kernel.shape == (3, 32, 32) and nnx.get_partition_spec(nnx.state(scanned.layers))  # stacked
    np.testing.assert_allclose(scanned(TOKENS), plain(TOKENS), atol=2e-6)
    loss0, g0 = grads_of(plain)
    loss1, g1 = grads_of(scanned)
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert max_diff(stacked(g0), g1) < 1e-6
    np.testing.assert_array_equal(greedy_generate(scanned, TOKENS[:, :4], 6), greedy_generate(plain, TOKENS[:, :4], 6))
    cache = scanned.init_cache(4, 12)
    assert cache["k"].shape == (3, 4, 2, 12, 8)                        # [layers, batch, kv_heads, max_length, head_dim]
    _, cache = scanned.prefill(TOKENS[:, :5], cache)
    step_logits, _ = scanned.decode_step(TOKENS[:, 5], 5, cache)
    np.testing.assert_allclose(step_logits, plain(TOKENS[:, :6])[:, 5], atol=2e-6)
    back = unstack_layers(scanned)
    assert max_diff(nnx.to_pure_dict(nnx.state(back)), nnx.to_pure_dict(nnx.state(plain))) == 0.0
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(scanned)
    with pytest.raises(ValueError, match="not stacked"):
        unstack_layers(plain)


def test_scanned_and_plain_models_train_to_the_same_parameters():
    config = TrainConfig(steps=3, learning_rate=1e-2, schedule="constant", log_every=1)
    batch_fn = lambda step: jnp.roll(TOKENS, step, axis=0)
    plain = Decoder(CONFIG.replace(remat="dots"), rngs=nnx.Rngs(3))
    scanned = stack_layers(plain)
    h0 = train(plain, ar_loss, batch_fn, config, progress=False).history
    h1 = train(scanned, ar_loss, batch_fn, config, progress=False).history
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h0], abs=1e-6)
    # Adam divides by sqrt(v): for entries whose gradient is ~0, rounding-level gradient
    # differences (1e-8) become update differences of order lr = 1e-2 times a small factor
    diff = max_diff(nnx.to_pure_dict(nnx.state(unstack_layers(scanned))), nnx.to_pure_dict(nnx.state(plain)))
    assert diff < 5e-4


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(microbatches):
    model = Decoder(CONFIG, rngs=nnx.Rngs(4))
    loss0, g0 = grads_of(model)
    loss1, _, g1 = value_and_grads(ar_loss, model, TOKENS, jax.random.key(0), microbatches)
    assert float(loss1) == pytest.approx(loss0, abs=1e-6)
    assert max_diff(g0, nnx.to_pure_dict(g1)) < 1e-6
    # and through training: the same parameters after 3 steps
    config = TrainConfig(steps=3, learning_rate=1e-2, schedule="constant")
    a, b = Decoder(CONFIG, rngs=nnx.Rngs(5)), Decoder(CONFIG, rngs=nnx.Rngs(5))
    train(a, ar_loss, lambda s: TOKENS, config, progress=False)
    train(b, ar_loss, lambda s: TOKENS, config.replace(microbatches=microbatches), progress=False)
    # CPU: < 2e-6. Adam's 1 / sqrt(v) turns rounding-level gradient differences of near-zero
    # entries into larger update differences (6.5e-5 seen on a GPU with TF32 matmuls)
    assert max_diff(nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))) < 5e-4


def test_microbatches_must_divide_the_batch():
    model = Decoder(CONFIG, rngs=nnx.Rngs(4))
    with pytest.raises(ValueError, match="batch"):
        value_and_grads(ar_loss, model, TOKENS[:3], jax.random.key(0), 2)
    with pytest.raises(ValueError, match="microbatches"):
        TrainConfig(steps=1, microbatches=0)


def test_mixed_precision_policy():
    """Params float32, compute bfloat16, logits and loss float32, optimizer moments float32."""
    model = Decoder(CONFIG.replace(dtype="bfloat16", param_dtype="float32"), rngs=nnx.Rngs(6))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda x: model(x))(TOKENS)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert model(TOKENS).dtype == jnp.float32
    loss, _ = ar_loss(model, TOKENS, None)
    assert loss.dtype == jnp.float32
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(steps=2)), wrt=nnx.Param)
    moments = [x for x in jax.tree.leaves(nnx.state(optimizer)) if getattr(x, "ndim", 0) >= 1]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}


def test_matmul_precision_reaches_every_dot():
    x = TOKENS[:, :5]
    for precision, expected in (("highest", jax.lax.Precision.HIGHEST), ("high", jax.lax.Precision.HIGH)):
        model = Decoder(CONFIG.replace(matmul_precision=precision), rngs=nnx.Rngs(7))
        eqns = jax.make_jaxpr(lambda t, model=model: model(t))(x).jaxpr.eqns
        dots = [e for e in eqns if e.primitive.name == "dot_general"]
        assert dots and all(e.params["precision"] == (expected, expected) for e in dots), precision
    default = Decoder(CONFIG, rngs=nnx.Rngs(7))
    highest = Decoder(CONFIG.replace(matmul_precision="highest"), rngs=nnx.Rngs(7))
    if jax.default_backend() == "cpu":                      # CPU float32 matmuls are full precision anyway
        np.testing.assert_array_equal(default(x), highest(x))


def test_frozen_parameters_get_no_optimizer_state():
    model = Decoder(CONFIG, rngs=nnx.Rngs(8))
    frozen = ("embed_tokens", "layers")
    tx = make_optimizer(TrainConfig(steps=2, learning_rate=1e-2, frozen=frozen))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    trainable = sum(x.size for path, x in nnx.to_flat_state(params)
                    if not any(str(path[0]) == p for p in frozen))
    moment_size = sum(x.size for x in jax.tree.leaves(nnx.state(optimizer)) if getattr(x, "ndim", 0) >= 1)
    assert moment_size == 2 * trainable                     # Adam mu and nu of the trainable ones only
    before = host(model)
    step = make_train_step(ar_loss, model, optimizer)
    step(TOKENS, jax.random.key(0))
    after = host(model)
    assert max_diff(before["layers"], after["layers"]) == 0.0
    assert max_diff(before["embed_tokens"], after["embed_tokens"]) == 0.0
    assert max_diff(before["lm_head"], after["lm_head"]) > 0.0


def test_cached_train_step_sees_changes_made_between_calls():
    """The step flattens the graph once, but reads the current values: a model modified between
    calls (e.g. restored from a checkpoint) trains from the modified values."""
    a, b = Decoder(CONFIG, rngs=nnx.Rngs(9)), Decoder(CONFIG, rngs=nnx.Rngs(10))
    tx = optax.sgd(0.1)
    opt_a = nnx.Optimizer(a, tx, wrt=nnx.Param)
    step = make_train_step(ar_loss, a, opt_a)
    step(TOKENS, jax.random.key(0))
    nnx.update(a, jax.tree.map(jnp.copy, nnx.state(b)))     # overwrite a's weights with (a copy of) b's
    step(TOKENS, jax.random.key(0))
    opt_b = nnx.Optimizer(b, tx, wrt=nnx.Param)
    make_train_step(ar_loss, b, opt_b)(TOKENS, jax.random.key(0))
    assert max_diff(nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))) == 0.0


def test_async_checkpoints_resume_exactly(tmp_path):
    config = TrainConfig(steps=6, learning_rate=1e-2, checkpoint_every=2, log_every=1, async_checkpoint=True)
    batch_fn = lambda step: jnp.roll(TOKENS, step, axis=1)
    whole = Decoder(CONFIG, rngs=nnx.Rngs(11))
    h_whole = train(whole, ar_loss, batch_fn, config, progress=False).history
    part = Decoder(CONFIG, rngs=nnx.Rngs(11))
    train(part, ar_loss, batch_fn, config, checkpoint_dir=tmp_path / "ck", stop_after=3, progress=False)
    resumed = Decoder(CONFIG, rngs=nnx.Rngs(11))
    result = train(resumed, ar_loss, batch_fn, config, checkpoint_dir=tmp_path / "ck", progress=False)
    assert result.steps_done == 6
    assert [r["loss"] for r in result.history] == [r["loss"] for r in h_whole]
    assert max_diff(nnx.to_pure_dict(nnx.state(resumed)), nnx.to_pure_dict(nnx.state(whole))) == 0.0
