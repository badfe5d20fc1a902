"""`dfm.decentral.mixture_decode` against independent references: plain greedy decoding of one
expert, and a step-by-step NumPy mixture of two experts' next-token distributions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.decentral import BayesFilterRouter, FixedRouter, mixture_decode
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


def test_bad_arguments_are_named():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    start = prefilled(model)
    router = FixedRouter(jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="starts"):
        mixture_decode([model], [], 3, NEW, router)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mixture_decode([model], [start], 3, 0, router)
    with pytest.raises(ValueError, match="temperature"):
        mixture_decode([model], [start], 3, NEW, router, temperature=-1.0)
