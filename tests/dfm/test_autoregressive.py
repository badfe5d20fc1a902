"""A causal LM as a DFM denoiser (THEORY S5): shift_right, causal_denoiser, causal_posterior_fn."""
import jax
import jax.numpy as jnp
import numpy as np

from dfm import autoregressive as ar
from dfm import paths, samplers, schedules

VOCAB, LENGTH = 4, 5
MASK, BOS = VOCAB, VOCAB + 1


def test_shift_right_values():
    x1 = jnp.array([[0, 1, 2], [3, 2, 1]])
    np.testing.assert_array_equal(np.asarray(ar.shift_right(x1, 9)), [[9, 0, 1], [9, 3, 2]])
    assert ar.shift_right(x1, 9).dtype == x1.dtype


def test_causal_denoiser_row_is_prefix_posterior():
    """Row j of the denoiser depends only on x_t^{<j}: changing x_t^j.. leaves rows <= j unchanged."""
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(VOCAB + 2, VOCAB)))

    def causal_fn(tokens):                        # logits_j = sum_{k <= j} table[tokens_k]
        return jnp.cumsum(table[tokens], axis=1)

    den = ar.causal_denoiser(causal_fn, BOS)
    x = jnp.array([[0, 1, 2, 3, 0]])
    y = x.at[0, 2:].set(MASK)
    np.testing.assert_allclose(np.asarray(den(x)[:, :3]), np.asarray(den(y)[:, :3]))
    assert not np.allclose(np.asarray(den(x)[:, 3]), np.asarray(den(y)[:, 3]))
    np.testing.assert_allclose(np.asarray(den(x)[0, 0]), np.asarray(table[BOS]))
    np.testing.assert_allclose(np.asarray(den(x)[0, 2]), np.asarray(table[BOS] + table[0] + table[1]))


def test_causal_posterior_fn_feeds_shifted_tokens():
    """Under the AR schedule the cached model consumes exactly shift_right(x1) one token per step."""
    rng = np.random.default_rng(1)
    logits_table = jnp.asarray(rng.normal(size=(LENGTH, VOCAB)))

    def step_fn(tokens, position, state):
        fed, count = state
        fed = fed.at[:, position].set(tokens)
        return jnp.broadcast_to(logits_table[position], (tokens.shape[0], VOCAB)), (fed, count + 1)

    batch = 16
    state0 = (jnp.full((batch, LENGTH), -1, dtype=jnp.int32), jnp.int32(0))
    fn = ar.causal_posterior_fn(step_fn, BOS)
    x0 = paths.mask_source((batch, LENGTH), MASK)
    # run the scan by hand to read back the final state
    sched = schedules.autoregressive(LENGTH)
    x, st = x0, state0
    keys = jax.random.split(jax.random.key(0), LENGTH)
    for t in range(LENGTH):
        pos = sched.moving_positions(t)
        np.testing.assert_array_equal(np.asarray(pos), [t])
        logits, st = fn(x, t, pos, st)
        assert logits.shape == (batch, 1, VOCAB)
        x = x.at[:, t].set(jax.random.categorical(keys[t], logits[:, 0]))
    fed, count = st
    assert int(count) == LENGTH
    np.testing.assert_array_equal(np.asarray(fed), np.asarray(ar.shift_right(x, BOS)))


def test_cached_sampler_threads_state():
    def step_fn(tokens, position, count):
        # deterministic: predicts token (count mod VOCAB) with certainty
        logits = jnp.where(jnp.arange(VOCAB) == count % VOCAB, 0.0, -jnp.inf)
        return jnp.broadcast_to(logits, (tokens.shape[0], VOCAB)), count + 1

    x1 = samplers.sample_discrete(jax.random.key(0), ar.causal_posterior_fn(step_fn, BOS),
                                  schedules.autoregressive(LENGTH), paths.mask_source((3, LENGTH), MASK),
                                  mask_id=MASK, state=jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(x1), np.tile(np.arange(LENGTH) % VOCAB, (3, 1)))


def test_prompted_posterior_fn_continues_a_prefilled_prompt_as_greedy_decoding():
    """Greedy AR sampling after a prefilled prompt (`prompted_posterior_fn`) equals the decoder's
    own greedy continuation (`greedy_generate`: prefill, then argmax decode steps)."""
    from flax import nnx

    from dfm.models import Decoder, DecoderConfig
    from dfm.models.decoder import greedy_generate

    vocab, new = 11, 5
    model = Decoder(DecoderConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=2,
                                  num_heads=2), rngs=nnx.Rngs(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (3, 4)), jnp.int32)
    cache = model.init_cache(3, 4 + new)
    logits, cache = model.prefill(prompt, cache)
    fn = ar.prompted_posterior_fn(model.decode_step, 4)
    out = samplers.sample_discrete(jax.random.PRNGKey(0), fn, schedules.autoregressive(new),
                                   paths.mask_source((3, new), vocab), temperature=0.0, mask_id=vocab,
                                   state=(cache, jax.nn.log_softmax(logits[:, -1])))
    want = np.asarray(greedy_generate(model, prompt, new))[:, 4:]
    np.testing.assert_array_equal(np.asarray(out), want)
