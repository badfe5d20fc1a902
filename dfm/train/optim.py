"""`TrainConfig` and the optimizer: AdamW with linear warmup, cosine (or constant) schedule, clipping."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import optax

_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `dfm.train.train`, shared by every stage (base, dense, expert, router).

    Attributes:
      steps: total optimizer steps (>= 1).
      learning_rate: peak learning rate (> 0).
      warmup_steps: linear warmup from 0 to `learning_rate` over this many steps (0 <= . <= steps).
      weight_decay: decoupled AdamW weight decay, applied to parameters with >= 2 dimensions only
        (not to norm scales or biases).
      grad_clip: global-norm clipping threshold; 0 disables clipping.
      b1, b2: Adam moment decay rates in [0, 1).
      seed: seed of the per-step keys `fold_in(PRNGKey(seed), step)`.
      checkpoint_every: save a checkpoint every this many steps (and at the end).
      log_every: append a history row every this many steps (and at the last step).
      schedule: "cosine" (decay to `min_lr_ratio * learning_rate` at `steps`) or "constant".
      min_lr_ratio: final learning rate as a fraction of the peak, in [0, 1].

    Raises:
      ValueError: naming the field that is out of range.
    """

    steps: int
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps: must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip: must be >= 0 (0 disables), got {self.grad_clip!r}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must lie in [0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an int, got {self.seed!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule: must be one of {_SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio!r}")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate as a function of the step count `s` (the update index, 0-based).

    Linear warmup `lr * s / warmup_steps` for `s < warmup_steps`; then cosine decay from `lr` to
    `min_lr_ratio * lr` at `s = steps` (schedule "cosine"), or `lr` (schedule "constant").
    """
    lr = config.learning_rate
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=config.warmup_steps,
            decay_steps=max(config.steps, config.warmup_steps + 1), end_value=lr * config.min_lr_ratio)
    if config.warmup_steps == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, config.warmup_steps), optax.constant_schedule(lr)],
        [config.warmup_steps])


def _decay_mask(params):
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule(config)`, preceded by global-norm clipping (if `grad_clip > 0`)."""
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2,
        weight_decay=config.weight_decay, mask=_decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
