"""``[numerics] loss_chunk``: both jobs' training losses through the vocabulary-tiled cross-entropy
(`dfm.train.tiled_loss`) equal their plain full-logits losses, value and gradients, on the shipped
tiny configs' models (the plain path is the independent reference: logits, then log-softmax)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.engine.config import ConfigError
from experiments.mllm import modeling as mllm_modeling
from experiments.registry import load_job
from experiments.text import modeling as text_modeling
from experiments.text.config import load_config as load_text


def _value_and_grads(loss_fn, model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(0))[0]

    value, grads = jax.value_and_grad(f)(params)
    return float(value), jax.tree.leaves(grads)


def _assert_same(plain, tiled):
    (v0, g0), (v1, g1) = plain, tiled
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_text_job_tiled_loss_equals_the_full_logits_loss():
    config = load_text("tiny")
    vocab, bos = config.data.vocab_size, 1
    model = text_modeling.new_model(config, vocab, seed=0)
    x1 = jax.random.randint(jax.random.key(1), (3, 13), 3, vocab)
    plain = text_modeling.ar_loss_fn(bos, 0)
    tiled = text_modeling.ar_loss_fn(bos, 5)       # 13 positions: chunks of 5, 5, 3
    assert text_modeling.training_loss_fn(config.replace(numerics=config.numerics.__class__(loss_chunk=5)),
                                          vocab, bos) is tiled
    _assert_same(_value_and_grads(plain, model, x1), _value_and_grads(tiled, model, x1))


def test_multimodal_job_tiled_loss_equals_the_full_logits_loss():
    _, config = load_job("mllm-tiny")
    vocab = config.data.vocab_size + 1
    model = mllm_modeling.run_model(config, vocab, vocab - 1)
    s = config.data.image_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab - 1, (2, 11)).astype(np.int32)
    per_image = model.config.num_image_tokens
    tokens[:, 1:1 + per_image] = vocab - 1                 # the image's placeholder tokens
    mask = np.zeros((2, 11), bool)
    mask[:, 6:] = True
    mask[1, 9:] = False
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
             "pixels": jnp.asarray(rng.normal(size=(2, s, s, 3)), jnp.float32)}
    plain, tiled = mllm_modeling.training_loss_fn(0), mllm_modeling.training_loss_fn(4)
    assert plain is mllm_modeling.llava_loss and mllm_modeling.training_loss_fn(4) is tiled
    _assert_same(_value_and_grads(plain, model, batch), _value_and_grads(tiled, model, batch))


def test_a_negative_loss_chunk_is_refused_naming_it():
    try:
        load_job("tiny", overrides=["numerics.loss_chunk=-1"])
    except ConfigError as exc:
        assert "numerics.loss_chunk: must be >= 0, got -1" in str(exc)
    else:
        raise AssertionError("numerics.loss_chunk = -1 was accepted")


def test_the_masked_schedule_refuses_a_loss_chunk():
    """The masked schedule's DFM loss is not the tiled causal-LM loss: a chunk there is an error, not ignored."""
    try:
        load_job("tiny", "masked", ["numerics.loss_chunk=64"])
    except ConfigError as exc:
        assert "numerics.loss_chunk: the vocabulary-tiled loss is the AR (causal LM) loss" in str(exc)
    else:
        raise AssertionError("numerics.loss_chunk with schedule = masked was accepted")
