"""Sampler guards: a posterior whose classes leave the mask inside the vocabulary is refused at trace
time, and `check_finite=True` reports the first step with non-finite logits, eager and inside jit."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm.paths import mask_source, uniform_source
from dfm.samplers import posterior_fn_from_denoiser, sample_discrete, sample_euler
from dfm.schedules import LinearScheduler, autoregressive, discretize

BATCH, LENGTH, VOCAB = 3, 4, 5
TABLE = np.random.default_rng(0).normal(size=(BATCH, LENGTH, VOCAB)).astype(np.float32)


def table_posterior(vocab=VOCAB):
    """A stateless posterior: fixed logits per position (the first `vocab` columns of a random table)."""
    table = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, LENGTH, vocab)).astype(np.float32))
    return posterior_fn_from_denoiser(lambda x: table)


def poisoned(bad_step, value, *, euler_steps=None, column=None):
    """Logits of TABLE at the moving positions, with `value` written at step `bad_step` (integer step,
    or the Euler time `bad_step / euler_steps`) into every column, or only into `column`."""
    def posterior_fn(x_t, t, positions, state):
        logits = jnp.take(jnp.asarray(TABLE), jnp.asarray(positions), axis=1)
        step = t if euler_steps is None else jnp.round(t * euler_steps).astype(jnp.int32)
        cols = jnp.ones(VOCAB, bool) if column is None else jnp.arange(VOCAB) == column
        return jnp.where((step == bad_step) & cols, jnp.asarray(value, logits.dtype), logits), state
    return posterior_fn


def run(sampler, posterior_fn, *, jit=False, **kw):
    x0 = mask_source((BATCH, LENGTH), VOCAB)
    key = jax.random.PRNGKey(0)
    if sampler == "discrete":
        call = lambda k: sample_discrete(k, posterior_fn, autoregressive(LENGTH), x0, mask_id=VOCAB, **kw)
    else:
        call = lambda k: sample_euler(k, posterior_fn, LinearScheduler(), x0, 6, mask_id=VOCAB, **kw)
    out = jax.jit(call)(key) if jit else call(key)
    return jax.tree_util.tree_map(np.asarray, out)           # reading the result surfaces async errors


# ------------------------------------------------------------------ (a) mask id vs the posterior's classes
@pytest.mark.parametrize("sampler", ["discrete", "euler"])
@pytest.mark.parametrize("jit", [False, True])
def test_mask_inside_the_posterior_vocabulary_is_refused_at_trace_time(sampler, jit):
    # the posterior returns VOCAB + 2 classes, but the mask id VOCAB lies inside them
    with pytest.raises(ValueError, match=re.escape(f"posterior_fn: returned logits over {VOCAB + 2} classes, "
                                                   f"but mask_id={VOCAB} lies inside [0, {VOCAB + 2})")):
        run(sampler, table_posterior(VOCAB + 2), jit=jit)


def test_mask_id_outside_the_vocabulary_still_samples_tokens():
    """mask_id = vocab + 2 (outside, not equal to vocab) is allowed; every sample is a token."""
    x0 = mask_source((BATCH, LENGTH), VOCAB + 2)
    x1 = sample_discrete(jax.random.PRNGKey(3), table_posterior(), autoregressive(LENGTH), x0, mask_id=VOCAB + 2)
    assert np.asarray(x1).min() >= 0 and np.asarray(x1).max() < VOCAB


# ------------------------------------------------------------------ (b) check_finite
@pytest.mark.parametrize("sampler", ["discrete", "euler"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_logits_raise_floating_point_error_eager(sampler, value):
    euler = None if sampler == "discrete" else 6
    fn = poisoned(2, value, euler_steps=euler)
    with pytest.raises(FloatingPointError, match=r"posterior_fn \(.*posterior_fn\): non-finite logits .* "
                                                 r"first at step 2 "):
        run(sampler, fn, check_finite=True)
    # the default does not look: NaN logits silently give samples (today's behaviour, documented)
    x1 = run(sampler, fn)
    assert x1.shape == (BATCH, LENGTH)


@pytest.mark.parametrize("sampler", ["discrete", "euler"])
def test_non_finite_logits_inside_jit_raise_jax_runtime_error_naming_posterior_fn(sampler):
    euler = None if sampler == "discrete" else 6
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        run(sampler, poisoned(1, np.nan, euler_steps=euler), jit=True, check_finite=True)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "FloatingPointError: posterior_fn (" in message and "first at step 1 " in message


def test_all_minus_inf_row_is_bad_but_some_minus_inf_entries_are_not():
    # a moving masked coordinate whose logits are all -inf: its softmax (and kernel) is NaN
    with pytest.raises(FloatingPointError, match="first at step 3 "):
        run("discrete", poisoned(3, -np.inf), check_finite=True)
    # one -inf column (a token of probability 0) is a valid posterior: same samples as unchecked
    fn = poisoned(3, -np.inf, column=2)
    checked = run("discrete", fn, check_finite=True)
    np.testing.assert_array_equal(checked, run("discrete", fn))
    assert (checked[:, 3] != 2).all()


@pytest.mark.parametrize("sampler", ["discrete", "euler"])
@pytest.mark.parametrize("jit", [False, True])
def test_check_finite_leaves_finite_results_unchanged(sampler, jit):
    fn = table_posterior()
    plain = run(sampler, fn, jit=jit, return_intermediates=True)
    checked = run(sampler, fn, jit=jit, return_intermediates=True, check_finite=True)
    for a, b in zip(plain, checked):
        np.testing.assert_array_equal(a, b)


def test_uniform_source_and_greedy_nan_are_caught():
    """Greedy decoding (temperature 0) takes the argmax of NaN logits without a NaN kernel: the
    logits themselves are checked."""
    x0 = uniform_source(jax.random.PRNGKey(0), (BATCH, LENGTH), VOCAB)
    sched = discretize(LinearScheduler(), LENGTH, 3)
    with pytest.raises(FloatingPointError, match="first at step 0 "):
        sample_discrete(jax.random.PRNGKey(1), poisoned(0, np.nan), sched, x0, temperature=0.0, check_finite=True)


def test_default_program_has_no_host_callback():
    x0 = mask_source((BATCH, LENGTH), VOCAB)
    fn = table_posterior()

    def call(check):
        return lambda k: sample_discrete(k, fn, autoregressive(LENGTH), x0, mask_id=VOCAB, check_finite=check)

    assert "callback" not in str(jax.make_jaxpr(call(False))(jax.random.PRNGKey(0)))
    assert "debug_callback" in str(jax.make_jaxpr(call(True))(jax.random.PRNGKey(0)))
