"""Decoding from a mixture of cached causal experts: one jitted program for any router.

`mixture_decode` continues prompts that every expert has already prefilled into its KV cache:
the experts' cached next-token posteriors (`dfm.autoregressive.prompted_posterior_fn`) are mixed
at every step by `ensemble_posterior_fn` under the router (THEORY S8; the Bayes filter S9 updates
with each generated token), and `dfm.samplers.sample_discrete` draws the new tokens under the
autoregressive schedule (S5) — greedy at temperature 0. Used by `dfm.DecentralizedModel.generate`
(text) and the multimodal job's answer decoding (experts whose prefill scattered image features).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def mixture_decode(models: Sequence[Any], starts: Sequence[tuple[Any, jax.Array]], prompt_length: int,
                   max_new_tokens: int, router: Any, *, temperature: float = 0.0,
                   key: jax.Array | None = None) -> jax.Array:
    """`[batch, max_new_tokens]` int32 tokens continuing the prefilled prompts under `router`.

    Args:
      models: K causal models with `decode_step(tokens [batch], position, cache) -> (logits
        [batch, vocab], cache)` (`dfm.models.Decoder`, `MultimodalModel`), NNX modules.
      starts: per model `(cache, log_probs [batch, vocab])`: its KV cache after prefilling the
        `prompt_length` prompt tokens (cache length >= prompt_length + max_new_tokens) and its
        log-probabilities of the first new token (the prefill's last row).
      prompt_length: P, the position of the first new token (traced: one compilation serves
        every prompt length with the same cache length).
      max_new_tokens: tokens to generate (static).
      router: a `dfm.decentral` router over the K models for these rows (`FixedRouter(weights
        [batch, K])`, `BayesFilterRouter`, ...; a pytree).
      temperature: 0 = greedy (argmax of the mixture); > 0 samples at that temperature with `key`.
      key: `jax.random` key (default `PRNGKey(0)`; unused when greedy).
    Returns:
      The new tokens (the model continues after an EOS; cut where the caller wants).
    Raises:
      ValueError: no models, `starts` not one per model, `max_new_tokens < 1`, `temperature < 0`.
    """
    if not models or len(starts) != len(models):
        raise ValueError(f"starts: need one (cache, log_probs) per model, got {len(starts)} for {len(models)} models")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature!r}")
    split = [nnx.split(m) for m in models]
    key = jax.random.PRNGKey(0) if key is None else key
    return _decode(tuple(g for g, _ in split), tuple(s for _, s in split), tuple(starts),
                   jnp.asarray(prompt_length, jnp.int32), max_new_tokens, router, float(temperature), key)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _decode(graphdefs, states, starts, prompt_length, max_new_tokens, router, temperature, key):
    from dfm.autoregressive import prompted_posterior_fn
    from dfm.decentral.ensemble import ensemble_init_state, ensemble_posterior_fn
    from dfm.paths import mask_source
    from dfm.samplers import sample_discrete
    from dfm.schedules import autoregressive

    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
    batch, vocab = starts[0][1].shape
    fn = ensemble_posterior_fn([prompted_posterior_fn(m.decode_step, prompt_length) for m in models], router,
                               mask_id=vocab)
    state = ensemble_init_state(router, starts, batch=batch, num_moving=1, vocab=vocab)
    return sample_discrete(key, fn, autoregressive(max_new_tokens), mask_source((batch, max_new_tokens), vocab),
                           temperature=temperature, mask_id=vocab, state=state, check_finite=True)
