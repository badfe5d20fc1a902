"""Ensembles: mix the experts' next-token / denoiser distributions with router weights.

- `mix_log_probs` (alias `mix_probabilities`, the docs/design.md name): probability mixing
  `p = sum_k w_k p_k`, computed as `logsumexp_k(log w_k + log_softmax(logits_k))`. With the
  exact router this is exactly the centralized model's distribution (THEORY S8, S9).
- `mix_logits`: logit mixing `softmax(sum_k w_k logits_k)`, a normalized weighted geometric
  mean. APPROXIMATE: it is not the mixture and does not satisfy THEORY S8 unless the weights are
  one-hot or the experts agree.
- `ensemble_posterior_fn`: a `PosteriorFn` (docs/design.md, `dfm.samplers`) that calls every
  expert's posterior function and mixes them at each sampler step, with a router that is either
  the AR Bayes filter (stateful, THEORY S9) or any `(x_t, t) -> [batch, K]` weight function
  (learned router, THEORY S10; fixed centroid weights, THEORY S12).
All mixers take full, top-k or top-1 weights (`top_k=None | k | 1`, THEORY S13).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm.decentral.routers import BayesFilterRouter, top_k as top_k_weights
from dfm.decentral.validation import check_positive_int, check_weights, is_concrete

Array = jax.Array
PosteriorFn = Callable[[Array, Any, Array, Any], tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """What must agree between experts for their distributions to be mixable.

    Attributes:
      vocab_size: size of the output vocabulary (logits' last dimension).
      mask_id: the mask token id (`vocab_size` by convention) or None (uniform source / AR only).
      tokenizer_fingerprint: any string identifying the tokenizer (e.g. a hash of its vocab file),
        or None when unknown.
    """

    vocab_size: int
    mask_id: int | None = None
    tokenizer_fingerprint: str | None = None


def check_compatible_experts(experts: Sequence[ExpertSpec]) -> None:
    """Raise ValueError unless all experts share vocab_size, mask_id and tokenizer fingerprint.

    Raises:
      ValueError: empty `experts`, or the first differing field, naming `experts[i]`.
    """
    if len(experts) == 0:
        raise ValueError("experts is empty: an ensemble needs at least one expert")
    ref = experts[0]
    for i, spec in enumerate(experts[1:], start=1):
        for field in ("vocab_size", "mask_id", "tokenizer_fingerprint"):
            if getattr(spec, field) != getattr(ref, field):
                raise ValueError(f"experts[{i}].{field}={getattr(spec, field)!r} differs from "
                                 f"experts[0].{field}={getattr(ref, field)!r}: experts must share "
                                 "vocabulary, mask id and tokenizer to be mixed")


def _prepare_weights(expert_logits: Array, weights: Array, top_k: int | None) -> Array:
    """Validate and broadcast weights `[batch, K]` to `[K, batch, 1, ..., 1]`."""
    if expert_logits.ndim < 3:
        raise ValueError(f"expert_logits must be [K, batch, ..., vocab], got shape {expert_logits.shape}")
    num, batch = expert_logits.shape[0], expert_logits.shape[1]
    check_weights(weights, num, "weights")
    if weights.shape[0] != batch:
        raise ValueError(f"weights has batch {weights.shape[0]} but expert_logits has batch {batch}")
    if top_k is not None:
        weights = top_k_weights(weights, top_k)
    w = jnp.swapaxes(jnp.asarray(weights), 0, 1)
    return w.reshape(w.shape + (1,) * (expert_logits.ndim - 2)).astype(expert_logits.dtype)


def mix_log_probs(expert_logits: Array, weights: Array, *, top_k: int | None = None) -> Array:
    """Probability mixing (exact, THEORY S8): log of `sum_k w_k softmax(logits_k)`.

    Args:
      expert_logits: `[K, batch, ..., vocab]` logits (or log-probs) of each expert.
      weights: `[batch, K]` router weights, rows summing to 1.
      top_k: if given, keep each row's k largest weights, renormalized (1: top-1).

    Returns:
      `[batch, ..., vocab]` normalized log-probabilities of the mixture
      (`logsumexp_k(log w_k + log_softmax(logits_k))`; zero weights contribute exactly 0).

    Raises:
      ValueError: weights not `[batch, K]` for K experts, batch mismatch, or (concrete) rows not
        summing to 1 / negative entries.
    """
    w = _prepare_weights(expert_logits, weights, top_k)
    log_p = jax.nn.log_softmax(expert_logits, axis=-1)
    safe = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    terms = jnp.where(w > 0, safe + log_p, -jnp.inf)
    return jax.nn.logsumexp(terms, axis=0)


#: The name used in docs/design.md.
mix_probabilities = mix_log_probs


def mix_logits(expert_logits: Array, weights: Array, *, top_k: int | None = None) -> Array:
    """Logit mixing (APPROXIMATE): `log_softmax(sum_k w_k logits_k)`.

    This is a normalized weighted geometric mean of the experts' distributions, NOT the mixture
    of THEORY S8: it agrees with `mix_log_probs` only for one-hot weights or identical experts.
    Shift-invariant per expert (raw logits or log-probs give the same result).

    Args / Returns / Raises: as `mix_log_probs`.
    """
    w = _prepare_weights(expert_logits, weights, top_k)
    log_p = jax.nn.log_softmax(expert_logits, axis=-1)
    return jax.nn.log_softmax(jnp.sum(jnp.where(w > 0, w * log_p, 0.0), axis=0), axis=-1)


class EnsembleState(NamedTuple):
    """Carry of `ensemble_posterior_fn` (a pytree, usable in `lax.scan`).

    Attributes:
      expert_states: tuple of each expert's posterior-fn state (e.g. KV caches; None if stateless).
      router_state: `[batch, K]` Bayes-filter log-weights, or None for a stateless router.
      prev_positions: `[m]` int32 positions queried at the previous call (Bayes filter only).
      prev_masked: `[batch, m]` bool, whether those positions were masked then.
      prev_log_probs: `[K, batch, m, vocab]` the experts' log-probs at those positions.
    """

    expert_states: tuple
    router_state: Array | None = None
    prev_positions: Array | None = None
    prev_masked: Array | None = None
    prev_log_probs: Array | None = None


def ensemble_init_state(router: Any, expert_states: Sequence[Any], *, batch: int, num_moving: int,
                        vocab: int, dtype=jnp.float32) -> EnsembleState:
    """Initial `EnsembleState` for `ensemble_posterior_fn`.

    Args:
      router: the same router passed to `ensemble_posterior_fn`.
      expert_states: each expert's initial state (None for stateless experts).
      batch: batch size; num_moving: m, positions per call (the schedule's `max_moves`);
      vocab: the experts' vocabulary size.
    """
    expert_states = tuple(expert_states)
    if not isinstance(router, BayesFilterRouter):
        return EnsembleState(expert_states)
    k = router.num_experts
    return EnsembleState(
        expert_states, router.init(batch).astype(dtype), jnp.zeros((num_moving,), jnp.int32),
        jnp.zeros((batch, num_moving), jnp.bool_), jnp.zeros((k, batch, num_moving, vocab), dtype))


def _bayes_evidence(state: EnsembleState, x_t: Array, mask_id: int) -> Array:
    """Sum over newly revealed positions of each expert's log-prob of the revealed token: [K, batch]."""
    pos = state.prev_positions
    tokens = jnp.take(x_t, pos, axis=1)  # [batch, m]
    # A padded repeat of a position (design.md: moving_positions) must count once.
    m = pos.shape[0]
    earlier_same = (pos[:, None] == pos[None, :]) & (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])
    first = ~jnp.any(earlier_same, axis=1)  # [m]
    revealed = state.prev_masked & (tokens != mask_id) & first[None, :]
    vocab = state.prev_log_probs.shape[-1]
    safe = jnp.clip(tokens, 0, vocab - 1)
    lp = jnp.take_along_axis(state.prev_log_probs, safe[None, :, :, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(revealed[None], lp, 0.0), axis=-1)


def ensemble_posterior_fn(expert_posterior_fns: Sequence[PosteriorFn], router: Any, *,
                          experts: Sequence[ExpertSpec] | None = None, mask_id: int | None = None,
                          top_k: int | None = None, mixing: str = "probability") -> PosteriorFn:
    """A `PosteriorFn` that mixes expert posterior functions with router weights at every step.

    `fn(x_t [batch, length], t, positions [m], state: EnsembleState) -> (log-probs [batch, m, vocab], state)`
    (normalized log-probs are valid logits for `dfm.samplers`). Build the initial state with
    `ensemble_init_state`. At each call:
      1. Bayes filter only: add to the router state each expert's log-prob (stored at the
         previous call) of the tokens revealed since, at the previously queried positions that
         were masked then (THEORY S9). Exact for the AR schedule (one token per step); for other
         schedules it uses the experts' factorized posteriors and is an approximation.
      2. weights `[batch, K]`: the Bayes posterior, `router(x_t, t)` for a callable router
         (e.g. `LearnedRouter`), or a fixed `[batch, K]` array (e.g. `CentroidRouter.weights`).
      3. call the experts, mix (`mix_log_probs`, or `mix_logits` if `mixing="logit"`), top-k.
         With a fixed weight array only the experts that carry weight in some row (after top-k)
         are called, so top-k decoding costs about k experts; the Bayes filter needs every
         expert's likelihood of each revealed token, so it always calls all K.

    Args:
      expert_posterior_fns: K posterior functions, same vocabulary.
      router: `BayesFilterRouter`, a callable `(x_t, t) -> [batch, K]`, or an array `[batch, K]`.
      experts: optional `ExpertSpec` per expert, checked with `check_compatible_experts`
        (and supplying `mask_id` when not given).
      mask_id: the mask token (required for the Bayes filter).
      top_k: mix only the k largest weights (renormalized); None: all.
      mixing: "probability" (exact, S8) or "logit" (approximate).

    Raises:
      ValueError: no experts; specs that differ or whose count differs from the functions;
        a router whose expert count differs; Bayes filter without mask_id; bad `mixing`/`top_k`;
        at trace time, experts returning different vocabularies or weights of the wrong width.
    """
    fns = tuple(expert_posterior_fns)
    if not fns:
        raise ValueError("expert_posterior_fns is empty")
    num = len(fns)
    if experts is not None:
        if len(experts) != num:
            raise ValueError(f"experts has {len(experts)} specs for {num} expert_posterior_fns")
        check_compatible_experts(experts)
        if mask_id is None:
            mask_id = experts[0].mask_id
        elif experts[0].mask_id is not None and mask_id != experts[0].mask_id:
            raise ValueError(f"mask_id={mask_id} differs from the experts' mask_id={experts[0].mask_id}")
    if mixing not in ("probability", "logit"):
        raise ValueError(f"mixing must be 'probability' or 'logit', got {mixing!r}")
    if top_k is not None:
        check_positive_int(top_k, "top_k")
        if top_k > num:
            raise ValueError(f"top_k={top_k} exceeds the number of experts ({num})")
    bayes = isinstance(router, BayesFilterRouter)
    used = tuple(range(num))  # experts that are called; the others keep their state untouched
    if bayes:
        if router.num_experts != num:
            raise ValueError(f"router has {router.num_experts} experts but there are {num} "
                             "expert_posterior_fns")
        if mask_id is None:
            raise ValueError("mask_id is required with a BayesFilterRouter (to detect revealed tokens)")
    elif not callable(router):
        fixed = jnp.asarray(router)
        check_weights(fixed, num, "router")
        if is_concrete(router):
            # Fixed weights (e.g. centroid routing, THEORY S12/S13): call only the experts that carry
            # weight for some row after top-k, so top-k decoding costs about k experts, not K. Numpy
            # here: inside a jit trace even jnp ops on constants give tracers. Ties as lax.top_k.
            w_np = np.asarray(router)
            support = w_np > 0
            if top_k is not None:
                keep = np.zeros_like(support)
                np.put_along_axis(keep, np.argsort(-w_np, axis=1, kind="stable")[:, :top_k], True, axis=1)
                support &= keep
            used = tuple(int(i) for i in np.flatnonzero(support.any(axis=0)))
        if top_k is not None:
            fixed = top_k_weights(fixed, top_k)
        router = lambda x_t, t: fixed  # noqa: E731
    mix = mix_log_probs if mixing == "probability" else mix_logits

    def posterior_fn(x_t, t, positions, state: EnsembleState):
        if not isinstance(state, EnsembleState) or len(state.expert_states) != num:
            raise ValueError("state must be an EnsembleState with one expert state per expert "
                             "(build it with ensemble_init_state)")
        router_state = state.router_state
        if bayes:
            router_state = router.update(router_state, _bayes_evidence(state, x_t, mask_id))
            weights = router.weights(router_state)
        else:
            weights = router(x_t, t)
        outs = {i: fns[i](x_t, t, positions, state.expert_states[i]) for i in used}
        first = outs[used[0]][0]
        for i, (lg, _) in outs.items():
            if lg.shape != first.shape:
                raise ValueError(f"expert_posterior_fns[{i}] returned logits of shape {lg.shape}, "
                                 f"expert {used[0]} returned {first.shape}: vocabularies must match")
        logits = jnp.stack([outs[i][0] for i in used])  # [K_used, batch, m, vocab]
        w = weights if len(used) == num else jnp.take(weights, jnp.asarray(used), axis=1)
        mixed = mix(logits, w.astype(logits.dtype), top_k=top_k if len(used) == num else None)
        new_states = tuple(outs[i][1] if i in outs else s for i, s in enumerate(state.expert_states))
        if not bayes:
            return mixed, EnsembleState(new_states)
        masked = jnp.take(x_t, positions, axis=1) == mask_id
        log_probs = jax.nn.log_softmax(logits, axis=-1).astype(state.prev_log_probs.dtype)
        return mixed, EnsembleState(new_states, router_state, positions.astype(jnp.int32), masked, log_probs)

    return posterior_fn
