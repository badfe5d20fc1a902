"""Generation from a mixture of causal experts: one jitted decoding program for any router.

- `mixture_generate`: prompts `[batch, P]` -> new tokens `[batch, N]`: every expert the router can
  weigh prefills the prompts (`dfm.inference.prefill`, with the images for image-text experts),
  then `mixture_decode` continues them. The Bayes filter (THEORY S9) may start at the posterior
  given the prompt (`condition_on_prompt`). Used by `dfm.DecentralizedModel.generate`, the text
  job's samples (prompt = BOS) and the multimodal job's answers.
- `mixture_decode`: continues prompts every expert has already prefilled into its KV cache. At each
  step the experts' cached next-token posteriors (`dfm.autoregressive.prompted_posterior_fn`) are
  mixed by `ensemble_posterior_fn` under the router (S8; the Bayes filter updates with each
  generated token) and the new token is drawn by the sampler's own kernel
  (`dfm.samplers.transition_probabilities` + `categorical`) at the one moving position of the
  autoregressive schedule (S5): greedy at temperature 0. This is `dfm.samplers.sample_discrete`
  under `dfm.schedules.autoregressive(N)`, step for step and key for key (step t draws with
  `jax.random.split(key, bound)[t]`, equal to `split(key, N)[t]` under JAX's default partitionable
  threefry), written as a `lax.while_loop` whose trip count N is a traced value and whose token
  buffer has a static length `bound = decode_bound(N)` (a power of two >= 16): no table of N
  steps, so the program compiles in the same time for any N, and one compilation serves every
  N up to the bound (and every prompt length for a given cache length).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.autoregressive import prompted_posterior_fn
from dfm.decentral.ensemble import ensemble_init_state, ensemble_posterior_fn
from dfm.decentral.mixing import available_mask
from dfm.decentral.routers import check_router
from dfm.inference import prefill
from dfm.samplers import categorical, transition_probabilities

#: the smallest positive sampling temperature: `softmax(log_probs / T)` stays finite in float32 for
#: log-probabilities down to about -3e34 * T; below it, use 0 (greedy)
MIN_TEMPERATURE = 1e-4


def check_max_new_tokens(max_new_tokens: Any, limit: int | None = None, name: str = "max_new_tokens",
                         limit_what: str = "the limit") -> int:
    """`max_new_tokens` as an int in `[1, limit]` (limit None: no upper bound).

    Raises:
      ValueError: naming `name`, for a bool, a non-integer, a value < 1 or > `limit` (the message
        names `limit_what`, e.g. "the experts' context").
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"{name}: must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {max_new_tokens!r}")
    if limit is not None and max_new_tokens > limit:
        raise ValueError(f"{name}: {max_new_tokens} is more than {limit_what} of {limit} positions")
    return int(max_new_tokens)


def check_temperature(temperature: Any, name: str = "temperature") -> float:
    """`temperature` as a float: 0 (greedy) or finite and >= `MIN_TEMPERATURE`.

    Raises:
      ValueError: naming `name`, for a bool, a non-number, NaN / inf, a negative value or one in
        `(0, MIN_TEMPERATURE)`.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: must be a number (0 = greedy, or >= {MIN_TEMPERATURE:g}), got {temperature!r}")
    t = float(temperature)
    if not np.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"{name}: must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {temperature!r}")
    return t


def decode_bound(max_new_tokens: int) -> int:
    """The static token-buffer length for `max_new_tokens`: the next power of two, at least 16."""
    return max(16, 1 << (int(max_new_tokens) - 1).bit_length())


def mixture_generate(models: Sequence[Any], tokens: Any, max_new_tokens: int, router: Any, *,
                     pixels: Any = None, cache_length: int | None = None, condition_on_prompt: bool = False,
                     temperature: float = 0.0, key: jax.Array | None = None,
                     available: Any = None) -> np.ndarray:
    """`[batch, max_new_tokens]` int32 tokens continuing `tokens` under the mixture of `models`.

    Only the experts the router can weigh are run (`router.support(available=...)`: a
    `FixedRouter` with a concrete table, e.g. top-1 weights, runs the experts with weight in some
    row; otherwise every available expert), on the router restricted to them (`router.subset`).

    Args:
      models: K causal experts (`Decoder` or `MultimodalModel`, NNX modules); None where an
        expert is not `available` (it is never run).
      tokens: `[batch, P]` int prompt ids, one length for all rows (image tokens expanded).
      max_new_tokens: N >= 1.
      router: a `dfm.decentral` router over the K experts for these rows (`FixedRouter(weights
        [batch, K])`, `BayesFilterRouter`, ...).
      pixels: `[batch, H, W, C]` normalized images of image-text experts (None for text).
      cache_length: KV cache positions, >= P + N - 1 (the prompt and every new token but the last,
        which is never read back; default P + N - 1); a fixed value across calls lets one decoding
        program serve every prompt length.
      condition_on_prompt: a router that reads evidence (the Bayes filter) starts at the posterior
        given the prompt: `update(init(batch), sum_j log p_k(tokens[:, j + 1] | tokens[:, :j + 1]))`
        (S9 with the prompt as the prefix). False: at `router.init` (e.g. the priors: the job's
        image-text experts, never trained on question tokens, take no evidence from them).
      temperature: 0 = greedy; else sampling at that temperature (`check_temperature`) with `key`.
      key: `jax.random` key (default `PRNGKey(0)`).
      available: None (all experts) or a `[K]` bool mask / expert indices
        (`dfm.decentral.mixing.available_mask`): the experts that can be used.
    Returns:
      `[batch, N]` int32 new tokens (the model continues after an EOS; cut where the caller wants).
    Raises:
      ValueError: bad `tokens`, `max_new_tokens`, `temperature` or `cache_length`; a router over
        another number of experts; an expert the router may weigh that is None.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens: expected [batch >= 1, P >= 1], got shape {tokens.shape}")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    temperature = check_temperature(temperature)
    check_router(router, len(models))
    batch, prompt_length = tokens.shape
    needed = prompt_length + max_new_tokens - 1
    cache_length = needed if cache_length is None else cache_length
    if cache_length < needed:
        raise ValueError(f"cache_length: {cache_length} < prompt {prompt_length} + {max_new_tokens} new tokens - 1 "
                         f"(the last is never read back)")
    mask = available_mask(available, len(models))
    support = router.support(available=mask)
    if support is None:
        support = np.ones(len(models), bool) if mask is None else mask
    used = np.flatnonzero(support)
    missing = [int(k) for k in used if models[k] is None]
    if missing:
        raise ValueError(f"models: experts {missing} are None but the router may weigh them (pass available=)")
    if len(used) < len(models):
        router = router.subset(used)
    chosen = [models[k] for k in used]
    x = jnp.asarray(tokens, jnp.int32)
    px = None if pixels is None else jnp.asarray(pixels)
    score = condition_on_prompt and router.uses_evidence and prompt_length > 1
    outs = [prefill(m, x, int(cache_length), pixels=px, score_prompt=score) for m in chosen]
    state = None
    if score:
        evidence = jnp.stack([lp.sum(axis=1) for _, _, lp in outs])             # [K_used, batch]
        state = router.update(router.init(batch), evidence)
    starts = [(cache, first) for cache, first, _ in outs]
    return np.asarray(mixture_decode(chosen, starts, prompt_length, max_new_tokens, router, temperature=temperature,
                                     key=key, router_state=state), np.int32)


def mixture_decode(models: Sequence[Any], starts: Sequence[tuple[Any, jax.Array]], prompt_length: int,
                   max_new_tokens: int, router: Any, *, temperature: float = 0.0,
                   key: jax.Array | None = None, router_state: Any = None) -> jax.Array:
    """`[batch, max_new_tokens]` int32 tokens continuing the prefilled prompts under `router` (module doc).

    Args:
      models: K causal models with `decode_step(tokens [batch], position, cache) -> (logits
        [batch, vocab], cache)` (`dfm.models.Decoder`, `MultimodalModel`), NNX modules.
      starts: per model `(cache, log_probs [batch, vocab])`: its KV cache after prefilling the
        `prompt_length` prompt tokens (cache length >= prompt_length + max_new_tokens - 1) and its
        log-probabilities of the first new token (`dfm.inference.prefill`).
      prompt_length: P, the position of the first new token (traced: one compilation serves
        every prompt length with the same cache length).
      max_new_tokens: N, tokens to generate (traced, under the static `decode_bound(N)`).
      router: a `dfm.decentral` router over the K models for these rows (`FixedRouter(weights
        [batch, K])`, `BayesFilterRouter`, ...; a pytree).
      temperature: 0 = greedy (argmax of the mixture); else sampling at that temperature with `key`
        (`check_temperature`: finite, >= `MIN_TEMPERATURE`).
      key: `jax.random` key (default `PRNGKey(0)`; unused when greedy).
      router_state: the router's state before the first new token (default `router.init(batch)`;
        e.g. the Bayes filter's posterior given the prompt).
    Returns:
      The new tokens (the model continues after an EOS; cut where the caller wants).
    Raises:
      ValueError: no models, `starts` not one per model, bad `max_new_tokens` / `temperature`.
      FloatingPointError: a step's mixture or transition probabilities were not finite (naming the step).
    """
    if not models or len(starts) != len(models):
        raise ValueError(f"starts: need one (cache, log_probs) per model, got {len(starts)} for {len(models)} models")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    temperature = check_temperature(temperature)
    split = [nnx.split(m) for m in models]
    key = jax.random.PRNGKey(0) if key is None else key
    tokens, first_bad = _decode(tuple(g for g, _ in split), tuple(s for _, s in split), tuple(starts),
                                jnp.asarray(prompt_length, jnp.int32), jnp.asarray(max_new_tokens, jnp.int32),
                                decode_bound(max_new_tokens), router, router_state, temperature, key)
    bad = int(first_bad)
    if bad >= 0:
        raise FloatingPointError(f"mixture_decode: non-finite mixture or transition probabilities at new token {bad} "
                                 f"(0..{max_new_tokens - 1}), temperature={temperature!r}")
    return tokens[:, :max_new_tokens]


@functools.partial(jax.jit, static_argnums=(0, 5, 8))
def _decode(graphdefs, states, starts, prompt_length, num_new, bound, router, router_state, temperature, key):
    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
    batch, vocab = starts[0][1].shape
    fn = ensemble_posterior_fn([prompted_posterior_fn(m.decode_step, prompt_length) for m in models], router,
                               mask_id=vocab)
    state = ensemble_init_state(router, starts, batch=batch, num_moving=1, vocab=vocab)
    if router_state is not None:
        state = state._replace(router_state=jax.tree_util.tree_map(
            lambda given, init: jnp.asarray(given, jnp.asarray(init).dtype), router_state, state.router_state))
    keys = jax.random.split(key, bound)
    masked = jnp.full((batch, 1), vocab, jnp.int32)

    def step(t, carry):
        x, st, first_bad = carry
        positions = t[None]
        logits, st = fn(x, t, positions, st)                                  # [batch, 1, vocab]
        kernel = transition_probabilities(logits, masked, jnp.ones((1,), logits.dtype),
                                          temperature=temperature, mask_id=vocab)
        new = categorical(keys[t], jnp.log(kernel)).astype(x.dtype)          # [batch, 1]
        x = jax.lax.dynamic_update_slice(x, new, (0, t))
        finite = (~jnp.any(jnp.isnan(logits) | jnp.isposinf(logits))) & jnp.all(jnp.isfinite(kernel))
        return x, st, jnp.where((first_bad < 0) & ~finite, t, first_bad)

    x0 = jnp.full((batch, bound), vocab, jnp.int32)
    x, _, first_bad = jax.lax.fori_loop(jnp.int32(0), num_new, step, (x0, state, jnp.int32(-1)))
    return x, first_bad
