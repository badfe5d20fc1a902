"""Ensembles in the samplers: the experts' posterior functions mixed with a router at every step.

- `ExpertSpec` / `check_compatible_experts`: what must agree for experts to be mixed.
- `ensemble_posterior_fn`: a `PosteriorFn` (docs/design.md, `dfm.samplers`) that calls the
  experts' posterior functions and mixes them (`dfm.decentral.mixing.mix_log_probs`, THEORY S8)
  with any `dfm.decentral.Router`: the AR Bayes filter (THEORY S9), a learned router (S10),
  centroid or fixed weights (S12), full, top-k or top-1 (`top_k=None | k | 1`, S13).
- `ensemble_init_state` / `EnsembleState`: its scan carry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm.decentral.mixing import (available_mask, available_weights, check_available_rows, mix_log_probs,
                                  mix_logits)
from dfm.decentral.routers import check_router, top_k as top_k_weights
from dfm.decentral.arguments import check_positive_int

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


class EnsembleState(NamedTuple):
    """Carry of `ensemble_posterior_fn` (a pytree, usable in `lax.scan`).

    Attributes:
      expert_states: tuple of each expert's posterior-fn state (e.g. KV caches; None if stateless).
      router_state: the router's state (`router.init(batch, context)`; None for stateless routers).
      prev_positions: `[m]` int32 positions queried at the previous call (routers that read
        evidence, i.e. `router.uses_evidence`; else None).
      prev_masked: `[batch, m]` bool, whether those positions were masked then.
      prev_log_probs: `[K, batch, m, vocab]` the experts' log-probs at those positions.
    """

    expert_states: tuple
    router_state: Any = None
    prev_positions: Array | None = None
    prev_masked: Array | None = None
    prev_log_probs: Array | None = None


EnsembleState.__new__.__module__ = __name__   # lets pdoc resolve the field annotations (namedtuple quirk)


def ensemble_init_state(router: Any, expert_states: Sequence[Any], *, batch: int, num_moving: int,
                        vocab: int, context: Any = None, dtype=jnp.float32) -> EnsembleState:
    """Initial `EnsembleState` for `ensemble_posterior_fn`.

    Args:
      router: the same `Router` passed to `ensemble_posterior_fn`.
      expert_states: each expert's initial state (None for stateless experts).
      batch: batch size; num_moving: m, positions per call (the schedule's `max_moves`);
      vocab: the experts' vocabulary size.
      context: the conditioning input of the router (`router.init(batch, context)`), e.g. the
        centroid router's features `[batch, D]`.

    Raises:
      ValueError: `router` is not a `Router`.
    """
    check_router(router)
    expert_states = tuple(expert_states)
    router_state = router.init(batch, context)
    if not router.uses_evidence:
        return EnsembleState(expert_states, router_state)
    return EnsembleState(
        expert_states, jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(dtype), router_state),
        jnp.zeros((num_moving,), jnp.int32), jnp.zeros((batch, num_moving), jnp.bool_),
        jnp.zeros((router.num_experts, batch, num_moving, vocab), dtype))


def _revealed_evidence(state: EnsembleState, x_t: Array, mask_id: int) -> Array:
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


def _called_experts(router: Any, num: int, top_k: int | None, mask: np.ndarray | None) -> tuple[int, ...]:
    """Experts to call: those `router.support(top_k, available=mask)` marks; when it returns None
    (unknown: traced or state-dependent weights), every available expert. A `FixedRouter` with a
    concrete table marks the experts with weight in some row after the restriction and top-k, so
    top-k decoding costs about k experts, not K (and it raises naming `available` for a row with
    no weight on any available expert)."""
    support = router.support(top_k, available=mask)
    if support is None:
        support = np.ones(num, bool) if mask is None else mask
    return tuple(int(i) for i in np.flatnonzero(support))


def ensemble_posterior_fn(expert_posterior_fns: Sequence[PosteriorFn | None], router: Any, *,
                          experts: Sequence[ExpertSpec] | None = None, mask_id: int | None = None,
                          top_k: int | None = None, mixing: str = "probability",
                          available: Any = None) -> PosteriorFn:
    """A `PosteriorFn` that mixes expert posterior functions with router weights at every step.

    `fn(x_t [batch, length], t, positions [m], state: EnsembleState) -> (log-probs [batch, m, vocab], state)`
    (normalized log-probs are valid logits for `dfm.samplers`). Build the initial state with
    `ensemble_init_state`. At each call:
      1. if `router.uses_evidence` (the Bayes filter): `router.update` with each expert's log-prob
         (stored at the previous call) of the tokens revealed since, at the previously queried
         positions that were masked then (THEORY S9). Exact for the AR schedule (one token per
         step); for other schedules it uses the experts' factorized posteriors and is an
         approximation.
      2. weights `[batch, K]` = `router.weights(router_state, x_t, t)`.
      3. call the experts, mix (`mix_log_probs`, or `mix_logits` if `mixing="logit"`), top-k.
         With a `FixedRouter` holding a concrete table only the experts that carry weight in some
         row (after top-k) are called.
    The returned function has an attribute `missing`: the tuple of experts not available (() when
    all are).

    Args:
      expert_posterior_fns: K posterior functions, same vocabulary (None allowed at the positions
        of experts that are not `available`).
      router: a `dfm.decentral.Router` over K experts (`BayesFilterRouter`, `CentroidRouter`,
        `FixedRouter`, `CallableRouter`, `LearnedRouter`).
      experts: optional `ExpertSpec` per expert, checked with `check_compatible_experts`
        (and supplying `mask_id` when not given).
      mask_id: the mask token (required by routers that read evidence).
      top_k: mix only the k largest weights (renormalized); None: all.
      mixing: "probability" (exact, S8) or "logit" (approximate).
      available: None (all experts), or the experts that can be used: a `[K]` bool mask or a
        sequence of expert indices (`dfm.decentral.mixing.available_mask`; concrete, not traced).
        Experts not available are never called. Before top-k the router's weights are multiplied
        by the mask and renormalized over the available experts
        (`dfm.decentral.mixing.available_weights`), so top-k picks among the available ones (a
        `top_k` larger than their number keeps them all). An evidence-reading router (the Bayes
        filter) gets zero evidence for missing experts: its weights over the available experts are
        exactly `w_k q_k(prefix)` renormalized over them, the exact router of the mixture of the
        available experts (THEORY S9). A router row with no weight on any available expert raises
        ValueError naming `available` when the weights are concrete (a `FixedRouter` table, checked
        here; a call outside any trace); on traced weights (inside the sampler's scan or `jit`:
        e.g. a `CentroidRouter` built with its own top-k whose row picks a missing expert) that row
        falls back to uniform weights over the available experts. All experts available: exactly
        as None.

    Raises:
      ValueError: no experts; specs that differ or whose count differs from the functions;
        a router that is not a `Router` or whose expert count differs; an evidence-reading router
        without mask_id; bad `mixing`/`top_k`; at trace time, experts returning different
        vocabularies; bad `available`, an available expert whose posterior function is not
        callable, or a (concrete) router row with no weight on any available expert.
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
    check_router(router, num)
    evidence = router.uses_evidence
    if evidence and mask_id is None:
        raise ValueError("mask_id is required with a router that reads evidence (the Bayes filter "
                         "detects revealed tokens by the mask)")
    mask = available_mask(available, num)
    if mask is not None and mask.all():
        mask = None                                          # all available: exactly as None
    missing = () if mask is None else tuple(int(i) for i in np.flatnonzero(~mask))
    if mask is not None:
        for i in np.flatnonzero(mask):
            if not callable(fns[i]):
                raise ValueError(f"expert_posterior_fns[{i}]: expert {i} is available but its posterior "
                                 f"function is {fns[i]!r}")
    used = _called_experts(router, num, top_k, mask)
    mix = mix_log_probs if mixing == "probability" else mix_logits

    def posterior_fn(x_t, t, positions, state: EnsembleState):
        if not isinstance(state, EnsembleState) or len(state.expert_states) != num:
            raise ValueError("state must be an EnsembleState with one expert state per expert "
                             "(build it with ensemble_init_state)")
        router_state = state.router_state
        if evidence:
            router_state = router.update(router_state, _revealed_evidence(state, x_t, mask_id))
        if mask is None:
            weights = router.weights(router_state, x_t, t)
        else:
            weights, empty = available_weights(router, router_state, x_t, t, mask)
            check_available_rows(empty)                      # concrete weights only
        outs = {i: fns[i](x_t, t, positions, state.expert_states[i]) for i in used}
        first = outs[used[0]][0]
        for i, (lg, _) in outs.items():
            if lg.shape != first.shape:
                raise ValueError(f"expert_posterior_fns[{i}] returned logits of shape {lg.shape}, "
                                 f"expert {used[0]} returned {first.shape}: vocabularies must match")
        logits = jnp.stack([outs[i][0] for i in used])  # [K_used, batch, m, vocab]
        if top_k is not None:
            weights = top_k_weights(weights, top_k)
        if len(used) < num:  # the experts not called carry no weight after top-k
            weights = jnp.take(weights, jnp.asarray(used), axis=1)
        mixed = mix(logits, weights.astype(logits.dtype))
        new_states = tuple(outs[i][1] if i in outs else s for i, s in enumerate(state.expert_states))
        if not evidence:
            return mixed, EnsembleState(new_states, router_state)
        masked = jnp.take(x_t, positions, axis=1) == mask_id
        log_probs = jax.nn.log_softmax(logits, axis=-1).astype(state.prev_log_probs.dtype)
        if len(used) < num:                                   # experts not called: zero evidence
            log_probs = jnp.zeros((num,) + log_probs.shape[1:], log_probs.dtype).at[
                jnp.asarray(used)].set(log_probs)
        return mixed, EnsembleState(new_states, router_state, positions.astype(jnp.int32), masked, log_probs)

    posterior_fn.missing = missing
    return posterior_fn
