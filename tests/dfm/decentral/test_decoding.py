"""`dfm.decentral.mixture_decode` / `mixture_generate` against independent references: plain greedy
decoding of one expert, a step-by-step NumPy mixture of two experts' next-token distributions from
full forward passes, and `dfm.samplers.sample_discrete` under the AR schedule (draw for draw); the
decoding program does not grow with the number of new tokens."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.decentral import BayesFilterRouter, FixedRouter, mixture_decode, mixture_generate
from dfm.models import Decoder, DecoderConfig, greedy_generate

CONFIG = DecoderConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2)
PROMPT = jnp.asarray([[3, 7, 1], [5, 2, 9]], jnp.int32)
NEW = 6


def prefilled(model, prompt=PROMPT, cache_length=PROMPT.shape[1] + NEW):
    logits, cache = model.prefill(prompt, model.init_cache(prompt.shape[0], cache_length))
    return cache, jax.nn.log_softmax(logits[:, -1], axis=-1)


def test_one_expert_is_greedy_decoding():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    out = mixture_decode([model], [prefilled(model)], PROMPT.shape[1], NEW, FixedRouter(jnp.ones((2, 1))))
    np.testing.assert_array_equal(out, greedy_generate(model, PROMPT, NEW)[:, PROMPT.shape[1]:])


@pytest.mark.parametrize("router_kind", ["fixed", "bayes"])
def test_two_experts_follow_the_mixture_argmax(router_kind):
    """Each generated token is the argmax of sum_k w_k p_k(. | prefix), with w fixed or the Bayes
    posterior (prior w_k times the experts' likelihood of the tokens generated so far)."""
    models = [Decoder(CONFIG, rngs=nnx.Rngs(s)) for s in (1, 2)]
    prior = np.array([0.3, 0.7])
    router = (FixedRouter(jnp.asarray(np.tile(prior, (2, 1)), jnp.float32)) if router_kind == "fixed"
              else BayesFilterRouter.from_priors(prior))
    out = np.asarray(mixture_decode(models, [prefilled(m) for m in models], PROMPT.shape[1], NEW, router))
    seq = np.asarray(PROMPT)
    log_w = np.log(np.tile(prior, (2, 1)))
    for j in range(NEW):
        logp = np.stack([np.asarray(jax.nn.log_softmax(m(jnp.asarray(seq))[:, -1], axis=-1), np.float64)
                         for m in models])                            # [K, batch, vocab]
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        mix = np.einsum("bk,kbv->bv", w, np.exp(logp))
        np.testing.assert_array_equal(out[:, j], mix.argmax(axis=1))
        if router_kind == "bayes":
            log_w = log_w + np.take_along_axis(logp, out[None, :, j, None], axis=2)[..., 0].T
        seq = np.concatenate([seq, out[:, j:j + 1]], axis=1)


def _numpy_mixture_greedy(models, prompt, steps, log_w, bayes):
    """Greedy tokens `[batch, steps]` of the mixture from full forward passes of the whole sequence;
    with `bayes` the weights are `prior * p_k(tokens after the first)` (THEORY S9)."""
    seq, out = np.asarray(prompt), []
    for _ in range(steps):
        logp = np.stack([np.asarray(jax.nn.log_softmax(m(jnp.asarray(seq)), axis=-1), np.float64) for m in models])
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        y = np.einsum("bk,kbv->bv", w, np.exp(logp[:, :, -1])).argmax(axis=1)
        if bayes:
            log_w = log_w + logp[:, np.arange(len(y)), -1, y].T
        out.append(y)
        seq = np.concatenate([seq, y[:, None]], axis=1)
    return np.stack(out, axis=1)


def test_mixture_generate_conditions_the_bayes_filter_on_the_prompt():
    """The Bayes filter started at the posterior given the prompt (`condition_on_prompt`): each
    token is the argmax of `sum_k rho_k p_k(. | prefix)` with `rho_k ∝ w_k p_k(prompt[1:] + generated)`."""
    models = [Decoder(CONFIG, rngs=nnx.Rngs(s)) for s in (3, 4)]
    prior = np.array([0.6, 0.4])
    seq = np.asarray(PROMPT)
    logp = np.stack([np.asarray(jax.nn.log_softmax(m(PROMPT), axis=-1), np.float64) for m in models])
    prompt_ll = np.take_along_axis(logp[:, :, :-1], seq[None, :, 1:, None], axis=-1)[..., 0].sum(-1)   # [K, batch]
    want = _numpy_mixture_greedy(models, PROMPT, NEW, np.log(prior)[None] + prompt_ll.T, bayes=True)
    got = mixture_generate(models, PROMPT, NEW, BayesFilterRouter.from_priors(prior), condition_on_prompt=True)
    np.testing.assert_array_equal(got, want)
    # without the prompt as evidence: the filter starts at the priors
    np.testing.assert_array_equal(mixture_generate(models, PROMPT, NEW, BayesFilterRouter.from_priors(prior)),
                                  _numpy_mixture_greedy(models, PROMPT, NEW, np.log(np.tile(prior, (2, 1))), True))
    # an unavailable expert (None) is never run: the mixture of the others
    only = mixture_generate([models[0], None], PROMPT, NEW, BayesFilterRouter.from_priors(prior),
                            available=[0], condition_on_prompt=True)
    np.testing.assert_array_equal(only, _numpy_mixture_greedy(models[:1], PROMPT, NEW, np.zeros((2, 1)), True))


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("router_kind", ["fixed", "bayes"])
def test_decoding_is_the_samplers_ar_schedule_draw_for_draw(router_kind, temperature):
    """The while loop reproduces `sample_discrete` under `autoregressive(N)` over the same mixture
    exactly: same posterior, same kernel, same key per step (`split(key, bound)[t] == split(key, N)[t]`)."""
    from dfm.autoregressive import prompted_posterior_fn
    from dfm.decentral import ensemble_init_state, ensemble_posterior_fn
    from dfm.paths import mask_source
    from dfm.samplers import sample_discrete
    from dfm.schedules import autoregressive

    models = [Decoder(CONFIG, rngs=nnx.Rngs(s)) for s in (5, 6)]
    router = (FixedRouter(jnp.asarray([[0.3, 0.7], [0.9, 0.1]], jnp.float32)) if router_kind == "fixed"
              else BayesFilterRouter.from_priors([0.3, 0.7]))
    starts = [prefilled(m) for m in models]
    key = jax.random.PRNGKey(11)
    got = mixture_decode(models, starts, PROMPT.shape[1], NEW, router, temperature=temperature, key=key)
    fn = ensemble_posterior_fn([prompted_posterior_fn(m.decode_step, PROMPT.shape[1]) for m in models], router,
                               mask_id=CONFIG.vocab_size)
    state = ensemble_init_state(router, starts, batch=2, num_moving=1, vocab=CONFIG.vocab_size)
    want = sample_discrete(key, fn, autoregressive(NEW), mask_source((2, NEW), CONFIG.vocab_size),
                           temperature=temperature, mask_id=CONFIG.vocab_size, state=state)
    np.testing.assert_array_equal(got, want)


def test_the_decoding_program_does_not_grow_with_the_number_of_new_tokens():
    """No table of N steps (the length is a traced trip count under a static power-of-two buffer):
    the lowered program for N = 3000 has no constant larger than the one for N = 16, its text is
    as long up to the digits of its shapes, and one compilation serves every N up to the bound."""
    import re

    from dfm.decentral.decoding import _decode, decode_bound

    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    router = FixedRouter(jnp.ones((2, 1), jnp.float32))

    def lowered(n):
        start = prefilled(model, cache_length=PROMPT.shape[1] + n)
        return _decode.lower((graphdef,), (state,), (start,), jnp.int32(3), jnp.int32(n), decode_bound(n), router,
                             None, 0.0, jax.random.PRNGKey(0)).as_text()

    small, large = lowered(16), lowered(3000)
    assert decode_bound(16) == 16 and decode_bound(3000) == 4096 and decode_bound(17) == 32

    def biggest_constant(text):
        shapes = re.findall(r"stablehlo\.constant dense<.*?> : tensor<([0-9x]+)x", text)
        return max([int(np.prod([int(d) for d in s.split("x")])) for s in shapes] + [1])

    assert biggest_constant(large) == biggest_constant(small) < 256
    assert abs(len(large) - len(small)) < 0.02 * len(small)
    before = _decode._cache_size()
    outs = [mixture_decode([model], [prefilled(model, cache_length=PROMPT.shape[1] + 16)], PROMPT.shape[1], n,
                           router) for n in (5, 9, 16)]
    assert _decode._cache_size() == before + 1
    full = np.asarray(outs[-1])
    assert all(np.array_equal(np.asarray(o), full[:, :o.shape[1]]) for o in outs)


def test_bad_arguments_are_named():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    start = prefilled(model)
    router = FixedRouter(jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="starts"):
        mixture_decode([model], [], 3, NEW, router)
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(ValueError, match=f"^max_new_tokens: must be an int >= 1, got {bad!r}$"):
            mixture_decode([model], [start], 3, bad, router)
    for bad in (-1.0, 1e-30, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^temperature: must be 0 \(greedy\) or a finite number >= 0.0001, "
                                             rf"got {re.escape(repr(bad))}$"):
            mixture_decode([model], [start], 3, NEW, router, temperature=bad)
    with pytest.raises(ValueError, match=r"^temperature: must be a number \(0 = greedy, or >= 0.0001\), got True$"):
        mixture_decode([model], [start], 3, NEW, router, temperature=True)
    with pytest.raises(ValueError, match=r"^models: experts \[1\] are None but the router may weigh them"):
        mixture_generate([model, None], PROMPT, NEW, FixedRouter(jnp.full((2, 2), 0.5)))
