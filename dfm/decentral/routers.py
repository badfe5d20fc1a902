"""Routers: weights over experts, `[batch, K]`, rows summing to 1 (THEORY S8-S10, S12, S13).

One interface (`Router`), the router `rho_t(k | c, x_t)` of THEORY S8 as a small state machine:

    state = router.init(batch, context)          # context: conditioning input c (e.g. features) or None
    w = router.weights(state, x_t, t)            # [batch, K], rows sum to 1 (log_weights: their log)
    state = router.update(state, token_log_probs)  # evidence [K, batch]: each expert's log-prob of
                                                   # the tokens revealed since the last call

`router.uses_evidence` says whether `update` reads its evidence (only the Bayes filter does: its
weights follow the tokens, a sequential router), so a caller may skip computing it;
`router.needs_context` whether `init` needs conditioning features (the centroid router). Every
consumer (`dfm.decentral.ensemble_posterior_fn` in the samplers, `dfm.decentral.mixture_token_log_probs`
for teacher-forced scoring) calls these three methods and nothing else. Callers that pick experts
use `support` (the experts that can get weight), `subset` (the router over some experts) and
`with_top_k` (the router with another top-k), so no caller needs to know a router's type.
- `BayesFilterRouter` (THEORY S9): the exact AR router, the posterior over clusters given the
  prefix, from the experts' own likelihoods and the priors `w_k`; online (`init`/`update`/
  `weights`, usable in `lax.scan`) or batch (`posterior`).
- `CentroidRouter` (the paper's inference; THEORY S12, S13): softmax of cosine similarity of the
  context features to the partition centroids over a temperature, top-k renormalized, optional
  threshold; the weights are fixed at `init` from the context.
- `FixedRouter`: given weights `[batch, K]` (oracle labels, uniform, precomputed centroid weights).
- `CallableRouter`: weights from a function `(x_t, t) -> [batch, K]` (e.g. an exact table).
- `LearnedRouter` (THEORY S10) lives in `dfm.decentral.learned_router`.
Helpers: `top_k`, `apply_threshold`, `centroid_weights`, `uniform_weights`, `oracle_weights`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from dfm.decentral.partition import Partition
from dfm.decentral.arguments import check_positive_int, check_weights, is_concrete

Array = jax.Array


@runtime_checkable
class Router(Protocol):
    """The router interface (module docstring): `init`, `weights`, `update`, `uses_evidence`,
    `needs_context`, `support`, `subset`, `with_top_k`, `log_weights`."""

    num_experts: int
    uses_evidence: bool
    needs_context: bool

    def init(self, batch: int, context: Any = None) -> Any: ...

    def weights(self, state: Any, x_t: Array | None = None, t: Any = None) -> Array: ...

    def update(self, state: Any, token_log_probs: Array) -> Any: ...

    def support(self, top_k: int | None = None, available: np.ndarray | None = None) -> np.ndarray | None: ...

    def log_weights(self, state: Any, x_t: Array | None = None, t: Any = None) -> Array: ...

    def subset(self, experts: Any) -> Any: ...

    def with_top_k(self, k: int | None) -> Any: ...


class RouterBase:
    """Defaults of `Router.support` (None: any expert may get weight), `Router.log_weights`
    (the log of `weights`; routers with a log-space state override it, so that restricting them
    to some experts never underflows), `needs_context` (False), `subset` (not supported) and
    `with_top_k` (the router itself)."""

    needs_context = False  # class attribute: `init` needs no conditioning features

    def subset(self, experts: Any) -> Any:
        """The router over the experts `experts` only (indices into its K, in order), its weights
        renormalized over them. Raises NotImplementedError for a router that cannot be restricted."""
        raise NotImplementedError(f"{type(self).__name__}.subset: this router cannot be restricted to some "
                                  f"experts; pass every expert, or use a FixedRouter / BayesFilterRouter")

    def with_top_k(self, k: int | None) -> Any:
        """The router keeping each row's k largest weights (THEORY S13). Routers without a top-k
        setting (the Bayes filter, fixed and callable weights) return themselves: pass `top_k=` to
        `ensemble_posterior_fn` / `mixture_token_log_probs` instead."""
        del k
        return self

    def support(self, top_k: int | None = None, available: np.ndarray | None = None) -> np.ndarray | None:
        """`[K]` bool of the experts that can get weight (restricted to the `available` mask, then
        top-k), or None when unknown (any available expert may)."""
        del top_k, available
        return None

    def settings(self) -> dict:
        """The router as `decentral.json`'s ``"router"`` entry (`dfm.hf.experts`). Raises ValueError
        for routers that a decentralized directory cannot store (fixed, callable, learned)."""
        raise ValueError(f"{type(self).__name__} cannot be saved in decentral.json (a centroid or Bayes-filter "
                         f"router, or the settings 'bayes' / 'uniform', can)")

    def log_weights(self, state: Any, x_t: Array | None = None, t: Any = None) -> Array:
        """`log weights(state, x_t, t)`, `[batch, K]` (-inf where a weight is 0)."""
        return jnp.log(self.weights(state, x_t, t))


class StatelessRouter(RouterBase):
    """Defaults for routers whose weights do not depend on the revealed tokens' likelihoods:
    no evidence is read (`uses_evidence = False`) and `update` returns the state unchanged."""

    uses_evidence = False

    def init(self, batch: int, context: Any = None) -> Any:
        """No state (None); `context` is not used."""
        del batch, context
        return None

    def update(self, state: Any, token_log_probs: Array) -> Any:
        """The state, unchanged (this router reads no evidence)."""
        del token_log_probs
        return state


def check_router(router: Any, num_experts: int | None = None, name: str = "router") -> None:
    """ValueError naming `name` unless `router` implements `Router` (with `num_experts` experts)."""
    if not isinstance(router, Router):
        raise ValueError(f"{name}: expected a router with init / weights / update / uses_evidence "
                         f"(dfm.decentral.routers.Router), got {type(router).__name__}; wrap fixed "
                         f"weights [batch, K] in FixedRouter and a function (x_t, t) -> [batch, K] in "
                         f"CallableRouter")
    if num_experts is not None and router.num_experts != num_experts:
        raise ValueError(f"{name} has {router.num_experts} experts but there are {num_experts}")


def _expert_indices(experts: Any, num_experts: int) -> np.ndarray:
    """Distinct expert indices in [0, K) as int64 `[n]`, n >= 1 (ValueError naming `experts`)."""
    idx = np.asarray(experts).reshape(-1)
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= num_experts \
            or np.unique(idx).size != idx.size:
        raise ValueError(f"experts: expected distinct indices in [0, {num_experts}), got {idx.tolist()}")
    return idx.astype(np.int64)


def top_k(weights: Array, k: int) -> Array:
    """Keep the k largest weights of each row and renormalize them to sum to 1 (THEORY S13).

    Ties are broken deterministically: among equal weights the lower expert index is kept
    (`jax.lax.top_k` order). Renormalizing to a set S changes the mixture by at most `1 - rho(S)`
    in total variation (THEORY S13).

    Args:
      weights: `[..., K]` non-negative router weights.
      k: number of experts kept, 1 <= k <= K (k = K renormalizes only).

    Returns:
      `[..., K]` weights with at most k non-zero entries per row, rows summing to 1.

    Raises:
      ValueError: k not an integer in [1, K].
    """
    num = weights.shape[-1]
    k = check_positive_int(k, "k")
    if k > num:
        raise ValueError(f"k={k} is larger than the number of experts ({num})")
    if k < num:
        _, idx = jax.lax.top_k(weights, k)
        keep = jnp.any(jax.nn.one_hot(idx, num, dtype=jnp.bool_), axis=-2)
        weights = jnp.where(keep, weights, jnp.zeros_like(weights))
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def apply_threshold(weights: Array, threshold: float) -> Array:
    """Drop experts whose weight is below `threshold` and renormalize; the largest is always kept.

    Args:
      weights: `[..., K]` router weights (rows sum to 1).
      threshold: in [0, 1].

    Raises:
      ValueError: threshold outside [0, 1].
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    largest = jax.nn.one_hot(jnp.argmax(weights, axis=-1), weights.shape[-1], dtype=jnp.bool_)
    keep = (weights >= threshold) | largest
    kept = jnp.where(keep, weights, jnp.zeros_like(weights))
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def uniform_weights(batch: int, num_experts: int, dtype=jnp.float32) -> Array:
    """Uniform router weights `[batch, K]`, every entry 1/K."""
    check_positive_int(batch, "batch", minimum=0)
    check_positive_int(num_experts, "num_experts")
    return jnp.full((batch, num_experts), 1.0 / num_experts, dtype=dtype)


def oracle_weights(labels: Any, num_experts: int, dtype=jnp.float32) -> Array:
    """One-hot router weights `[batch, K]` from known cluster labels `[batch]` (top-1 oracle).

    Raises:
      ValueError: labels not 1-D, or (concrete) outside [0, K).
    """
    check_positive_int(num_experts, "num_experts")
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be 1-D [batch], got shape {np.shape(labels)}")
    if is_concrete(labels):
        lab = np.asarray(labels)
        if lab.size and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= num_experts):
            raise ValueError(f"labels must be integers in [0, {num_experts}), got range "
                             f"[{lab.min()}, {lab.max()}] with dtype {lab.dtype}")
    return jax.nn.one_hot(jnp.asarray(labels), num_experts, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BayesFilterRouter(RouterBase):
    """The exact router for AR experts: a Bayes filter over clusters (THEORY S9).

    `rho_t(k | x^{<t}) ∝ w_k q_k(x^{<t})` (0-indexed: `x^{<t}` are the t tokens before position t), updated
    online `rho_{t+1}(k) ∝ rho_t(k) q_k(x^t | x^{<t})`. It needs nothing but the experts' own
    token log-probabilities and the priors `w_k` (share of the data in cluster k). All state is
    log-weights `[batch, K]`, renormalized (log-softmax) after each update, so long prefixes do
    not underflow. Pure jax: a registered pytree, jittable, usable as a `lax.scan` carry.

    Attributes:
      log_priors: `[K]` log w_k (need not be normalized; -inf gives an expert prior 0).

    Raises (construction, on concrete arrays):
      ValueError: log_priors not 1-D, empty, NaN or +inf, or all -inf.
    """

    log_priors: Array
    uses_evidence = True  # class attribute (not a pytree field)

    def __post_init__(self):
        lp = self.log_priors
        if not isinstance(lp, (np.ndarray, jax.Array)) or not is_concrete(lp):
            return  # pytree reconstruction with tracers or placeholders
        a = np.asarray(lp)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"log_priors must be a non-empty 1-D array [K], got shape {a.shape}")
        if np.isnan(a).any() or np.isposinf(a).any() or np.isneginf(a).all():
            raise ValueError("log_priors must not contain NaN or +inf, nor be all -inf")

    @classmethod
    def from_priors(cls, priors: Any) -> "BayesFilterRouter":
        """Build from priors `w_k` `[K]` (non-negative, normalized here).

        Raises:
          ValueError: negative, NaN, or all-zero priors.
        """
        w = np.asarray(priors, dtype=np.float64)
        if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"priors must be a 1-D array of non-negative finite weights, got {w}")
        with np.errstate(divide="ignore"):
            return cls(jnp.asarray(np.log(w / w.sum())))

    @property
    def num_experts(self) -> int:
        return int(self.log_priors.shape[0])

    def init(self, batch: int, context: Any = None) -> Array:
        """Initial state: log prior weights broadcast to `[batch, K]` (`context` is not used: the
        filter conditions on the tokens only)."""
        del context
        return jnp.broadcast_to(jax.nn.log_softmax(self.log_priors), (batch, self.num_experts))

    def update(self, state: Array, expert_token_logprobs: Array, *, expert_axis: int = 0) -> Array:
        """One Bayes step: add each expert's log-prob of the revealed token, renormalize.

        Args:
          state: `[batch, K]` log-weights.
          expert_token_logprobs: `log q_k(x^t | x^{<t})` of the token just revealed, `[K, batch]` (expert_axis=0, the
            ensemble layout) or `[batch, K]` (expert_axis=1). A zero row adds no evidence.

        Returns:
          `[batch, K]` log-weights of the posterior after the token.

        Raises:
          ValueError: shapes that do not match the state and layout.
        """
        if expert_axis not in (0, 1):
            raise ValueError(f"expert_axis must be 0 ([K, batch]) or 1 ([batch, K]), got {expert_axis}")
        lp = expert_token_logprobs if expert_axis == 1 else jnp.swapaxes(expert_token_logprobs, 0, 1)
        if lp.shape != state.shape or state.ndim != 2 or state.shape[1] != self.num_experts:
            raise ValueError(f"expert_token_logprobs has shape {expert_token_logprobs.shape} "
                             f"(expert_axis={expert_axis}), incompatible with state {state.shape} "
                             f"and {self.num_experts} experts")
        return jax.nn.log_softmax(state + lp, axis=-1)

    def log_weights(self, state: Array, x_t: Array | None = None, t: Any = None) -> Array:
        """Normalized log-weights `[batch, K]` (exact where `weights` underflows to 0)."""
        del x_t, t
        return jax.nn.log_softmax(state, axis=-1)

    def weights(self, state: Array, x_t: Array | None = None, t: Any = None) -> Array:
        """Router weights `[batch, K]` (rows sum to 1): `softmax(state)`; x_t, t are not used."""
        del x_t, t
        return jax.nn.softmax(state, axis=-1)

    def subset(self, experts: Any) -> "BayesFilterRouter":
        """The filter over the experts `experts` (indices, in order): their log priors (renormalized
        by `init`), i.e. the exact router of the mixture of those experts (THEORY S9).

        Raises:
          ValueError: no index, an index outside [0, K) or repeated, or only experts of prior 0.
        """
        idx = _expert_indices(experts, self.num_experts)
        return BayesFilterRouter(jnp.asarray(self.log_priors)[idx])

    def settings(self) -> dict:
        """``{"type": "bayes"}``: the priors are stored beside it (`dfm.hf.experts`)."""
        return {"type": "bayes"}

    def posterior(self, prefix_logliks: Array) -> Array:
        """Batch form: `rho(k | prefix) = softmax_k(log w_k + log q_k(prefix))`, `[batch, K]`.

        Args:
          prefix_logliks: `[batch, K]` each expert's log-likelihood of the whole prefix
            (sum of its token log-probs). Equal to `weights` after the online updates.

        Raises:
          ValueError: width different from K.
        """
        if prefix_logliks.ndim != 2 or prefix_logliks.shape[1] != self.num_experts:
            raise ValueError(f"prefix_logliks must have shape [batch, {self.num_experts}], "
                             f"got {prefix_logliks.shape}")
        return jax.nn.softmax(self.log_priors + prefix_logliks, axis=-1)


def centroid_weights(cosines: Array, temperature: float, top_k_experts: int | None = None,
                     threshold: float | None = None) -> Array:
    """`softmax(cosine / T)` over experts, then top-k renormalization and threshold.

    The top-k set of a row does not depend on T (T > 0 keeps the order), so this equals the
    paper's "softmax over the top-k similarities".

    Args:
      cosines: `[batch, K]` cosine similarities to the centroids.
      temperature: T > 0 (may be traced; then not checked).
      top_k_experts: keep the k largest (None: all). threshold: see `apply_threshold`.

    Raises:
      ValueError: T <= 0 or bad k / threshold.
    """
    if is_concrete(temperature) and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    w = jax.nn.softmax(cosines / temperature, axis=-1)
    if top_k_experts is not None:
        w = top_k(w, top_k_experts)
    if threshold is not None:
        w = apply_threshold(w, threshold)
    return w


@dataclasses.dataclass(frozen=True)
class CentroidRouter(StatelessRouter):
    """Route by cosine similarity of a conditioning feature to the partition's centroids.

    The paper's inference rule (and THEORY S12: with a partition that is a function of the
    conditioning input, top-1 nearest-centroid routing is the exact posterior). Features go
    through the partition's own map (normalize, subtract mean, normalize), then
    `weights = top_k(softmax(cosine / T))`, optionally thresholded (THEORY S13). The weights depend
    on the context only: `init(batch, features [batch, D])` computes them (the state), `weights`
    returns them at every step. `route(features)` is the same in one call. The temperature is
    fitted with `dfm.decentral.fit_centroid_router`.

    Attributes:
      partition: the fitted `Partition`.
      temperature: T > 0 (small T -> top-1 of the nearest centroid).
      top_k: number of experts kept (None: all K).
      threshold: drop experts under this weight after top-k and renormalize (None: off).

    Raises:
      ValueError: T <= 0, top_k not in [1, K], threshold not in [0, 1].
    """

    partition: Partition
    temperature: float = 1.0
    top_k: int | None = None
    threshold: float | None = None
    needs_context = True  # class attribute: `init` takes the conditioning features

    def __post_init__(self):
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None:
            check_positive_int(self.top_k, "top_k")
            if self.top_k > self.partition.num_clusters:
                raise ValueError(f"top_k={self.top_k} exceeds the number of experts "
                                 f"({self.partition.num_clusters})")
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def num_experts(self) -> int:
        return self.partition.num_clusters

    def similarities(self, features: Any) -> np.ndarray:
        """Cosine similarities `[batch, K]` (float64 numpy) of conditioning features `[batch, D]`."""
        return self.partition.cosine(features, "features")

    def route(self, features: Any) -> Array:
        """Router weights `[batch, K]` for conditioning features `[batch, D]`.

        Raises:
          ValueError: features of the wrong dimension, NaN/inf or zero norm.
        """
        return centroid_weights(jnp.asarray(self.similarities(features)), self.temperature,
                                self.top_k, self.threshold)

    def subset(self, experts: Any) -> "CentroidRouter":
        """The router over the clusters `experts` (`Partition.subset`: the softmax over their cosines
        renormalized; top-k capped at their number)."""
        idx = _expert_indices(experts, self.num_experts)
        top = None if self.top_k is None else min(self.top_k, len(idx))
        return CentroidRouter(self.partition.subset(idx), temperature=self.temperature, top_k=top,
                              threshold=self.threshold)

    def settings(self) -> dict:
        """``{"type": "centroid", "temperature", "top_k", "threshold"}``; the partition is stored
        beside it (`dfm.hf.experts`)."""
        return {"type": "centroid", "temperature": float(self.temperature), "top_k": self.top_k,
                "threshold": self.threshold}

    def with_top_k(self, k: int | None) -> "CentroidRouter":
        """This router with `top_k = k` (None: keep the stored one)."""
        return self if k is None else dataclasses.replace(self, top_k=k)

    def init(self, batch: int, context: Any = None) -> Array:
        """State = the weights `[batch, K]` of the context features `[batch, D]` (`route`).

        Raises:
          ValueError: no context, or a context whose batch is not `batch`.
        """
        if context is None:
            raise ValueError("context: the centroid router needs conditioning features [batch, D]")
        if np.shape(context)[0] != batch:
            raise ValueError(f"context has {np.shape(context)[0]} rows, expected batch={batch}")
        return self.route(context)

    def weights(self, state: Array, x_t: Array | None = None, t: Any = None) -> Array:
        """The weights fixed at `init` (`[batch, K]`)."""
        del x_t, t
        return state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedRouter(StatelessRouter):
    """Given weights `[batch, K]`, the same at every step: oracle labels (`oracle_weights`), uniform
    weights, or centroid weights computed beforehand. A registered pytree (jittable).

    Attributes:
      table: `[batch, K]` non-negative weights, rows summing to 1.

    Raises (construction, on concrete arrays):
      ValueError: not `[batch, K]`, negative or NaN entries, rows not summing to 1.
    """

    table: Array

    def __post_init__(self):
        if isinstance(self.table, (np.ndarray, jax.Array)) and is_concrete(self.table):
            check_weights(self.table, None, "table")

    @property
    def num_experts(self) -> int:
        return int(np.shape(self.table)[1])

    def support(self, top_k: int | None = None, available: np.ndarray | None = None) -> np.ndarray | None:
        """`[K]` bool: experts with weight in some row once restricted to the `available` mask
        (renormalizing keeps the order) and after top-k (ties as `jax.lax.top_k`: the lower index is
        kept); None when the table is traced.

        Raises:
          ValueError: naming `available`, for a row with no weight on any available expert.
        """
        if not is_concrete(self.table):
            return None
        w = np.asarray(self.table, dtype=np.float64)
        if available is not None:
            w = np.where(np.asarray(available, bool), w, 0.0)
            empty = np.flatnonzero(~(w > 0).any(axis=1))
            if empty.size:
                raise ValueError(f"available: {empty.size} router weight rows give no weight to any available "
                                 f"expert (first at index ({int(empty[0])},)); route to the available experts, "
                                 f"or pass weights that cover them")
        keep = w > 0
        if top_k is not None:
            order = np.argsort(-w, axis=1, kind="stable")[:, :top_k]
            in_top = np.zeros_like(keep)
            np.put_along_axis(in_top, order, True, axis=1)
            keep &= in_top
        return keep.any(axis=0)

    def subset(self, experts: Any) -> "FixedRouter":
        """The table's columns `experts` (indices, in order). Rows that had weight elsewhere are
        renormalized over them; rows that did not are kept bit for bit.

        Raises:
          ValueError: a bad index (as `BayesFilterRouter.subset`), or a row with no weight left.
        """
        idx = _expert_indices(experts, self.num_experts)
        table = jnp.asarray(self.table)
        kept = table[:, idx]
        lost = jnp.sum(jnp.delete(table, idx, axis=1), axis=1, keepdims=True) > 0
        return FixedRouter(jnp.where(lost, kept / jnp.sum(kept, axis=1, keepdims=True), kept))

    def weights(self, state: Any = None, x_t: Array | None = None, t: Any = None) -> Array:
        """The table `[batch, K]`."""
        del state, x_t, t
        return jnp.asarray(self.table)


@dataclasses.dataclass(frozen=True)
class CallableRouter(StatelessRouter):
    """Weights from a function `fn(x_t [batch, length], t) -> [batch, K]` (e.g. the exact router
    of THEORY S8 looked up in a table, or any classifier's softmax).

    Attributes:
      fn: the weight function (jittable when used inside a sampler).
      num_experts: K.
    """

    fn: Callable[[Array, Any], Array]
    num_experts: int

    def weights(self, state: Any = None, x_t: Array | None = None, t: Any = None) -> Array:
        """`fn(x_t, t)`; raises ValueError when `x_t` is None (the function needs the state)."""
        del state
        if x_t is None:
            raise ValueError("x_t: a CallableRouter needs the noised state x_t")
        return self.fn(x_t, t)
