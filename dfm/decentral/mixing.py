"""The mixture of experts' distributions: the one place where THEORY S8 / S9 are computed.

- `mix_log_probs` (alias `mix_probabilities`): probability mixing of whole distributions,
  `log sum_k w_k softmax(logits_k)` over a vocabulary. With the exact router this is exactly the
  centralized model's distribution (THEORY S8, S9). Used by the samplers' ensembles
  (`dfm.decentral.ensemble_posterior_fn`) and by the masked-DFM ELBO of ensembles.
- `mix_logits`: logit mixing `softmax(sum_k w_k logits_k)`, a normalized weighted geometric
  mean. APPROXIMATE: it is not the mixture and does not satisfy THEORY S8 unless the weights are
  one-hot or the experts agree.
- `mixture_token_log_probs`: teacher-forced scoring of observed tokens under the mixture, with any
  router (`dfm.decentral.routers.Router`): fixed weights (S8), the Bayes filter updated by every
  observed token (S9), centroid weights (S12, S13). Both jobs score held-out text and answers with
  it; the centroid router's temperature is fitted with it.
All three reduce to one log-sum-exp, `_weighted_logsumexp`.
- A lost expert: `available_mask` (the `available=` argument of `mixture_token_log_probs` and
  `dfm.decentral.ensemble_posterior_fn`), `available_weights` (router weights renormalized over
  the available experts), `check_available_rows`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dfm.decentral.routers import check_router, top_k as top_k_weights
from dfm.decentral.arguments import check_weights, is_concrete

Array = jax.Array


def _weighted_logsumexp(weights: Array, log_p: Array) -> Array:
    """`log sum_k w_k exp(log_p_k)` over axis 0, exact for zero weights (they contribute 0, not NaN).

    Args:
      weights: `[K, batch, 1, ...]` broadcastable to `log_p`.
      log_p: `[K, batch, ...]` log-probabilities (-inf allowed).
    """
    positive = weights > 0
    log_w = jnp.where(positive, jnp.log(jnp.where(positive, weights, 1.0)), -jnp.inf)
    return jax.nn.logsumexp(jnp.where(positive, log_w + log_p, -jnp.inf), axis=0)


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
    return _weighted_logsumexp(w, jax.nn.log_softmax(expert_logits, axis=-1))


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


def available_mask(available: Any, num_experts: int, name: str = "available") -> np.ndarray | None:
    """The experts that can be used, as a `[K]` bool numpy mask (None for `available=None`: all).

    Args:
      available: None, a `[K]` bool mask, or a sequence (1-D array) of distinct expert indices in
        `[0, K)`. Must be concrete (a Python / numpy value or a concrete jax array, not a tracer).
      num_experts: K.

    Raises:
      ValueError naming `name`: a traced value, a mask of another length, indices that are not
        integers, out of range or repeated, or an empty selection (no available expert).
    """
    if available is None:
        return None
    if not is_concrete(available):
        raise ValueError(f"{name}: must be concrete (a [K] bool mask or expert indices known at trace "
                         f"time), got a traced value")
    a = np.asarray(available)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a [K={num_experts}] bool mask or a 1-D sequence of expert "
                         f"indices, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty selection (at least one expert must be available)")
    if a.dtype == np.bool_:
        if a.shape != (num_experts,):
            raise ValueError(f"{name}: bool mask of length {a.size}, expected one entry per expert "
                             f"(K={num_experts})")
        mask = a.copy()
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() >= num_experts:
            raise ValueError(f"{name}: expert indices must lie in [0, {num_experts}), got {a.tolist()}")
        if np.unique(a).size != a.size:
            raise ValueError(f"{name}: repeated expert indices {a.tolist()}")
        mask = np.zeros(num_experts, np.bool_)
        mask[a] = True
    else:
        raise ValueError(f"{name}: expected a [K] bool mask or integer expert indices, got dtype {a.dtype}")
    if not mask.any():
        raise ValueError(f"{name}: empty selection (no expert is available)")
    mask.setflags(write=False)
    return mask


def available_weights(router: Any, state: Any, x_t: Array | None, t: Any, mask: Any) -> tuple[Array, Array]:
    """The router's weights restricted to the available experts: `softmax` of its log-weights
    (`Router.log_weights`) with -inf on the missing experts, i.e. `weights * mask` renormalized.
    Done in log space, so weights that underflow to 0 in probability space (the Bayes filter after
    a long prefix whose mass sits on missing experts) stay exact: `w_k q_k(prefix)` renormalized
    over the available experts (THEORY S9). A row with no weight on any available expert falls
    back to uniform weights over them and is flagged.

    Returns:
      `(weights [batch, K], empty [batch] bool)`: the restricted weights (exactly 0 on missing
      experts) and the rows that had no weight on any available expert.
    """
    m = jnp.asarray(mask, jnp.bool_)
    log_w = router.log_weights(state, x_t, t)
    log_w = jnp.where(m, log_w, -jnp.inf)
    empty = jnp.all(jnp.where(m, log_w == -jnp.inf, True), axis=-1)
    log_w = jnp.where(empty[..., None], jnp.where(m, 0.0, -jnp.inf).astype(log_w.dtype), log_w)
    return jax.nn.softmax(log_w, axis=-1), empty


def check_available_rows(empty: Any, name: str = "available") -> None:
    """ValueError naming `name` when a concrete `empty` flag (`available_weights`) is set anywhere:
    some router row gives no weight to any available expert. Traced flags are not checked (the
    weights then fall back to uniform over the available experts)."""
    if not is_concrete(empty):
        return
    bad = np.argwhere(np.asarray(empty))
    if bad.size:
        raise ValueError(f"{name}: {len(bad)} router weight rows give no weight to any available expert "
                         f"(first at index {tuple(int(i) for i in bad[0])}); route to the available "
                         f"experts, or pass weights that cover them")


class MixtureScores(NamedTuple):
    """Result of `mixture_token_log_probs`.

    Attributes:
      log_probs: `[batch, length]` log-probability of each observed token under the mixture.
      weights: `[batch, length, K]` the router weights used for each token (before seeing it).
      final_state: the router state after the last token (the Bayes filter: the posterior over
        clusters given the whole sequence, `router.weights(final_state)`; with missing experts,
        `available_weights(router, final_state, None, None, mask)` restricts it to the available).
      missing: the experts that were not available (`available=`), sorted; () when all were
        (Python ints; a result returned from `jax.jit` holds them as int32 scalars).
    """

    log_probs: Array
    weights: Array
    final_state: Any
    missing: tuple[int, ...] = ()


MixtureScores.__new__.__module__ = __name__   # lets pdoc resolve the field annotations (namedtuple quirk)


def mixture_token_log_probs(router: Any, expert_log_probs: Array, *, context: Any = None,
                            state: Any = None, valid: Array | None = None,
                            top_k: int | None = None, available: Any = None) -> MixtureScores:
    """Teacher-forced mixture scoring of observed tokens (THEORY S8, S9).

    For each position j in order: `w = router.weights(state, None, j)`; the mixture's log-prob of
    the observed token is `log sum_k w_k p_k(x^j | x^{<j})`; then `state = router.update(state,
    log p_k(x^j | x^{<j}))`. With `BayesFilterRouter.from_priors(w)` the weights are the exact
    posterior `rho(k | x^{<j}) ∝ w_k q_k(x^{<j})` (S9) and the result is `log q(x^j | x^{<j})` of the
    mixture `q = sum_k w_k q_k`; with fixed weights (`FixedRouter`, `CentroidRouter` from the
    context features) it is the mixture with those weights (S8, S12, S13).

    Args:
      router: a `dfm.decentral.Router` (its `weights` is called with `x_t = None`: routers that
        need the noised state, e.g. `LearnedRouter`, do not apply to teacher forcing).
      expert_log_probs: `[K, batch, length]` each expert's log-prob of the observed token at each
        position (e.g. `log_softmax` of a causal model's logits read at the next token).
      context: the conditioning input passed to `router.init` (centroid features `[batch, D]`).
      state: initial router state (default `router.init(batch, context)`).
      valid: `[batch, length]` bool; False marks padding: its token adds no evidence to the router
        (its log-prob is still returned; mask it).
      top_k: keep each row's k largest weights, renormalized (THEORY S13).
      available: None (all experts), or the experts that can be used: a `[K]` bool mask or a
        sequence of expert indices (`available_mask`; concrete). A missing expert's rows of
        `expert_log_probs` are ignored (pass anything, e.g. zeros); before top-k, the router's
        weights are multiplied by the mask and renormalized over the available experts
        (`available_weights`), so top-k picks among them; an evidence-reading router (the Bayes
        filter) gets zero evidence for missing experts, which makes its weights exactly
        `w_k q_k(x^{<j})` renormalized over the available experts: the mixture of the available
        experts (THEORY S9). A row whose router gives no weight to any available expert raises
        ValueError when the call is eager (concrete result); under `jit` (traced) that row falls
        back to uniform weights over the available experts. All experts available: as None.

    Returns:
      `MixtureScores(log_probs [batch, length], weights [batch, length, K], final_state, missing)`,
      in the dtype of `expert_log_probs` (float64 under `jax.enable_x64`); `weights` is 0 on
      missing experts.

    Raises:
      ValueError: `expert_log_probs` not 3-D, a router that is not a `Router` or has another K,
        `valid` of another shape; bad `available` (naming it), or (eager) a router row with no
        weight on any available expert (naming `available`).
    """
    lp = jnp.asarray(expert_log_probs)
    if lp.ndim != 3:
        raise ValueError(f"expert_log_probs must be [K, batch, length], got shape {lp.shape}")
    num, batch, length = lp.shape
    check_router(router, num)
    mask = available_mask(available, num)
    if mask is not None and mask.all():
        mask = None                                               # all available: exactly as None
    missing = () if mask is None else tuple(int(i) for i in np.flatnonzero(~mask))
    if mask is not None:                                          # missing rows: anything -> 0
        lp = jnp.where(jnp.asarray(mask)[:, None, None], lp, jnp.zeros((), lp.dtype))
    if valid is None:
        valid = jnp.ones((batch, length), jnp.bool_)
    valid = jnp.asarray(valid, jnp.bool_)
    if valid.shape != (batch, length):
        raise ValueError(f"valid must have shape [batch, length] = {(batch, length)}, got {valid.shape}")
    if state is None:
        state = router.init(batch, context)
    # the scan carry keeps one dtype: floating router state in the dtype of the log-probs
    state = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, lp.dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, state)

    def step(st, xs):
        lp_j, ok_j, j = xs                                         # [K, batch], [batch], scalar
        if mask is None:
            w = router.weights(st, None, j)
        else:
            w, empty = available_weights(router, st, None, j, mask)
        if top_k is not None:
            w = top_k_weights(w, top_k)
        w = w.astype(lp.dtype)
        mix = _weighted_logsumexp(w.T, lp_j)
        if router.uses_evidence:
            st = router.update(st, jnp.where(ok_j[None, :], lp_j, 0.0))
        return st, ((mix, w) if mask is None else (mix, w, empty))

    positions = jnp.arange(length, dtype=jnp.int32)
    final, out = jax.lax.scan(step, state, (jnp.moveaxis(lp, 2, 0), valid.T, positions))
    if mask is None:
        mix, w = out
        return MixtureScores(mix.T, jnp.swapaxes(w, 0, 1), final)
    mix, w, empty = out
    check_available_rows(jnp.swapaxes(empty, 0, 1))                # [batch, length]; eager only
    return MixtureScores(mix.T, jnp.swapaxes(w, 0, 1), final, missing)
