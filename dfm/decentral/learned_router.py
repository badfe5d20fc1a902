"""Learned router for masked-DFM experts (THEORY S10).

The exact router `rho_t(k | x) ∝ w_k p_t^k(x)` (THEORY S8) is the minimizer of the
classification loss `E_{k ~ w, x_1 ~ q_k, t, x_t ~ p_t(.|x_1)} [-log r(k | x_t)]` (THEORY S10), so
a classifier trained with cross-entropy on noised states and cluster labels estimates it.
`LearnedRouter` is a `dfm.models.SequenceClassifier` on `(x_t, t)`; `router_objective` is that
objective, `router_loss` evaluates it on one batch (t ~ U{0..T-1}, x_t ~ masked path, `dfm.paths.sample_masked_path`);
`train_learned_router` runs it with the project's one training loop `dfm.train.train`.
Sampling `k ~ w, x_1 ~ q_k` is sampling `(x_1, label)` pairs uniformly from the pooled data.

Note: on a masked path the path factor `p_t(x | x_1)` is the same for every `x_1` consistent
with x, so the exact router depends on x_t only; passing t (`use_time=True`) is harmless and is
needed for other sources.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfm.models.classifier import SequenceClassifier
from dfm.models.config import DecoderConfig
from dfm.paths import sample_masked_path
from dfm.schedules import DiscreteSchedule
from dfm.train import TrainConfig, TrainResult, train
from dfm.decentral.routers import StatelessRouter
from dfm.decentral.arguments import check_positive_int

Array = jax.Array


class LearnedRouter(StatelessRouter, nnx.Module):
    """Classifier router `r(k | x_t, t)` over K experts (THEORY S10).

    Args:
      config: `DecoderConfig` of the classifier trunk; `vocab_size` must cover the mask token
        (`vocab + 1` with `mask_id = vocab`). Attention is made bidirectional.
      num_experts: K.
      num_steps: T of the discrete schedule; integer steps t are fed as `t / T` (None: t is
        already a float time in [0, 1]).
      use_time: feed t to the classifier (False: weights depend on x_t only).
      rngs: `nnx.Rngs`.

    Call / `logits(x_t, t)`: `[batch, K]` float32 logits; `x_t [batch, length]` int, `t [batch]`
    or a scalar (broadcast). As a `dfm.decentral.Router` it is stateless (`init` -> None) and
    `weights(state, x_t, t)` is the softmax of the logits (rows sum to 1).

    Raises:
      ValueError: num_experts < 1, num_steps < 1.
    """

    def __init__(self, config: DecoderConfig, num_experts: int, *, num_steps: int | None = None,
                 use_time: bool = True, rngs: nnx.Rngs):
        check_positive_int(num_experts, "num_experts")
        if num_steps is not None:
            check_positive_int(num_steps, "num_steps")
        self.num_experts = num_experts
        self.num_steps = num_steps
        self.use_time = use_time
        self.classifier = SequenceClassifier(config, num_experts, rngs=rngs)

    def logits(self, x_t: Array, t: Any = None) -> Array:
        x_t = jnp.asarray(x_t)
        time = None
        if self.use_time:
            if t is None:
                raise ValueError("t is required when use_time=True")
            time = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
            if self.num_steps is not None:
                time = time / self.num_steps
        return self.classifier(x_t, time)

    def __call__(self, x_t: Array, t: Any = None) -> Array:
        return self.logits(x_t, t)

    def log_weights(self, state: Any = None, x_t: Array | None = None, t: Any = None) -> Array:
        """`[batch, K]` log router weights (`log_softmax` of the logits); `state` is not used."""
        del state
        if x_t is None:
            raise ValueError("x_t: the learned router classifies the noised state x_t; it does not "
                             "apply to teacher-forced scoring")
        return jax.nn.log_softmax(self.logits(x_t, t), axis=-1)

    def weights(self, state: Any = None, x_t: Array | None = None, t: Any = None) -> Array:
        """`[batch, K]` router weights (rows sum to 1); `state` is not used.

        Raises:
          ValueError: `x_t` is None (the classifier reads the noised state).
        """
        del state
        if x_t is None:
            raise ValueError("x_t: the learned router classifies the noised state x_t; it does not "
                             "apply to teacher-forced scoring")
        return jax.nn.softmax(self.logits(x_t, t), axis=-1)


def router_objective(logits: Array, labels: Array, sample_weight: Array | None = None) -> Array:
    """The router's classification loss `E[-log r(k | x_t)]` (THEORY S10), a scalar in nats.

    Its minimizer over routers is the exact router `rho_t(k | x)` of THEORY S8, where it equals
    `H(K | X_t)`; any other router is worse by `E_x KL(rho || r)`.

    Args:
      logits: `[batch, K]` router logits (`r = softmax(logits)`).
      labels: `[batch]` int cluster labels in [0, K).
      sample_weight: `[batch]` non-negative weights of the rows (None: the plain mean), e.g. the
        joint probabilities `P(X_t = x, K = k)` of enumerated pairs.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if sample_weight is None:
        return jnp.mean(ce)
    return jnp.sum(sample_weight * ce) / jnp.sum(sample_weight)


def router_loss(router: LearnedRouter, batch: tuple[Array, Array], key: Array, *,
                schedule: DiscreteSchedule, mask_id: int) -> tuple[Array, dict]:
    """`router_objective` of the router on one batch of noised states (THEORY S10).

    Args:
      router: `LearnedRouter`.
      batch: `(x1 [batch, length] int, labels [batch] int in [0, K))`.
      key: PRNG key for t ~ U{0..T-1} and x_t ~ p_t(. | x_1) (masked path).
      schedule: the experts' `DiscreteSchedule`; mask_id: the mask token.

    Returns:
      `(loss scalar nats, {"accuracy": fraction of argmax == label})`.
    """
    x1, labels = batch
    key_t, key_x = jax.random.split(key)
    t = jax.random.randint(key_t, (x1.shape[0],), 0, schedule.num_steps)
    x_t = sample_masked_path(key_x, x1, schedule.kappa[t], mask_id)
    logits = router(x_t, t)
    loss = router_objective(logits, labels)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, {"accuracy": accuracy}


def train_learned_router(router: LearnedRouter, x1: Any, labels: Any, schedule: DiscreteSchedule,
                         config: TrainConfig, *, mask_id: int, batch_size: int, data_seed: int = 0,
                         **train_kwargs) -> TrainResult:
    """Train `router` in place with `dfm.train.train` on `router_loss`.

    Batches: `batch_size` pairs drawn uniformly with replacement from `(x1, labels)` by
    `numpy.random.default_rng([data_seed, step])` (deterministic in the step, so resume is exact).

    Args:
      router: `LearnedRouter` with K = `router.num_experts`.
      x1: `[N, length]` int data; labels: `[N]` int cluster labels in [0, K).
      schedule, mask_id: the masked path the experts are trained on.
      config: `TrainConfig`; batch_size: sequences per step; train_kwargs: passed to `train`.

    Raises:
      ValueError: shapes or labels that do not match, labels out of range.
    """
    x1 = np.asarray(x1)
    labels = np.asarray(labels)
    if x1.ndim != 2 or labels.shape != (x1.shape[0],):
        raise ValueError(f"x1 must be [N, length] and labels [N]; got {x1.shape} and {labels.shape}")
    if x1.shape[1] != schedule.length:
        raise ValueError(f"x1 has length {x1.shape[1]}, the schedule has length {schedule.length}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= router.num_experts:
        raise ValueError(f"labels must be integers in [0, {router.num_experts})")
    check_positive_int(batch_size, "batch_size")
    n = x1.shape[0]
    x1_j, labels_j = jnp.asarray(x1, jnp.int32), jnp.asarray(labels, jnp.int32)

    def batch_fn(step: int):
        idx = np.random.default_rng([data_seed, step]).integers(0, n, batch_size)
        return x1_j[idx], labels_j[idx]

    def loss_fn(model, batch, key):
        return router_loss(model, batch, key, schedule=schedule, mask_id=mask_id)

    train_kwargs.setdefault("desc", "router")
    return train(router, loss_fn, batch_fn, config, **train_kwargs)
