"""`TrainConfig` and the optimizer: AdamW with linear warmup, cosine (or constant) schedule, clipping."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
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
      frozen: dotted parameter-path prefixes that get no update (e.g. `("vision_tower",)` or
        `("language_model", "vision_tower")` for LLaVA's stage-1 alignment, which trains only
        the projector). They are routed to `optax.set_to_zero()` by `optax.multi_transform`: no
        Adam moments are allocated for them, they do not count in the clipping norm, and they
        stay bit-identical. Default: nothing frozen.
      microbatches: gradient accumulation: each step's batch is cut into this many equal slices
        whose gradients are averaged before the one update (`dfm.train.steps.value_and_grads`);
        the batch size must be divisible by it. 1 = none.
      async_checkpoint: True = orbax writes checkpoints in a background thread while training
        goes on (worth it on accelerators, where a save would stall the device); the loop waits
        for the previous save before the next and at the end. False = every save completes
        before the next step (default; what CPU runs and the tests use).
      validate_every: with a `validate` function given to `dfm.train.train`, compute the
        validation loss before the first step, every this many steps and at the last step;
        0 = never (default).
      keep_best: with validation, the model returned at the end is the one with the lowest
        validation loss (`dfm.train.selection.BestCheckpoint`; ties keep the earlier step, step 0
        = the model as it came in) instead of the last one.

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
    frozen: tuple[str, ...] = ()
    microbatches: int = 1
    async_checkpoint: bool = False
    validate_every: int = 0
    keep_best: bool = False

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "log_every", "microbatches"):
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
        if not isinstance(self.frozen, tuple) or not all(isinstance(p, str) and p for p in self.frozen):
            raise ValueError(f"frozen: must be a tuple of non-empty dotted path prefixes, got {self.frozen!r}")
        if not isinstance(self.validate_every, int) or isinstance(self.validate_every, bool) or self.validate_every < 0:
            raise ValueError(f"validate_every: must be an int >= 0 (0 = never), got {self.validate_every!r}")
        if not isinstance(self.keep_best, bool):
            raise ValueError(f"keep_best: must be a bool, got {self.keep_best!r}")
        if not isinstance(self.async_checkpoint, bool):
            raise ValueError(f"async_checkpoint: must be a bool, got {self.async_checkpoint!r}")

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


def path_name(path) -> str:
    """The dotted name of a pytree key path (`('layers', 0, 'mlp')` -> \"layers.0.mlp\")."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return ".".join(parts)


def frozen_mask(params, frozen: tuple[str, ...]):
    """Pytree of bools like `params`: True where the dotted path starts with a prefix in `frozen`."""
    def is_frozen(path, _):
        name = path_name(path)
        return any(name == p or name.startswith(p + ".") for p in frozen)
    return jax.tree_util.tree_map_with_path(is_frozen, params)


def _freeze(tx: optax.GradientTransformation, frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """`tx` on the trainable parameters, `set_to_zero` (stateless) on the frozen ones."""
    if not frozen:
        return tx

    def labels(params):
        return jax.tree.map(lambda is_frozen: "frozen" if is_frozen else "train", frozen_mask(params, frozen))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def scale_by_learning_rate_argument() -> optax.GradientTransformationExtraArgs:
    """`updates -> -learning_rate * updates`, the rate read from the keyword `learning_rate` of `update`.

    The learning rate is then data (a traced scalar), not a constant of the compiled step, so
    optimizers that differ only in their schedule share one compilation. Stateless.

    Raises:
      ValueError: `update` called without `learning_rate`.
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, learning_rate=None, **extra_args):
        del params, extra_args
        if learning_rate is None:
            raise ValueError("learning_rate: this optimizer needs `update(..., learning_rate=lr)`")
        lr = jnp.asarray(learning_rate)
        return jax.tree.map(lambda u: (-lr).astype(u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(config: TrainConfig, *, lr_argument: bool = False) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule(config)`, preceded by global-norm clipping (if `grad_clip > 0`).

    Args:
      config: `TrainConfig`.
      lr_argument: False (default): the schedule is part of the transformation (its state counts
        steps). True: the same AdamW update, but the learning rate of each update is the keyword
        argument `tx.update(grads, state, params, learning_rate=lr)` (e.g.
        `nnx.Optimizer.update(model, grads, learning_rate=lr)` with
        `lr = learning_rate_schedule(config)(step)`); the transformation then depends only on
        `b1`, `b2`, `weight_decay` and `grad_clip`, so stages differing in steps, learning rate or
        warmup share one compiled train step (`dfm.train.train` uses this form).
    """
    if lr_argument:
        adam = optax.chain(
            optax.scale_by_adam(b1=config.b1, b2=config.b2),
            optax.add_decayed_weights(config.weight_decay, _decay_mask),
            scale_by_learning_rate_argument())
        if config.grad_clip > 0:
            adam = optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
        return _freeze(adam, config.frozen)
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2,
        weight_decay=config.weight_decay, mask=_decay_mask)
    if config.grad_clip > 0:
        adamw = optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return _freeze(adamw, config.frozen)
