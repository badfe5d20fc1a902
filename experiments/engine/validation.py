"""Validation during training: the loss of a stage's model on its own validation units.

One rule for every model (`experiments.engine.config.StageConfig`): stage 1, dense and the random
control are validated on all validation units, expert k on the validation units that the
partition assigns to cluster k (its share of the distribution, THEORY S8: expert k models
`q_k`). The loss is the stage's own training loss (`Task.loss_fn`) on fixed batches
(`Task.validation_batches`) with a fixed key, averaged over target tokens (each batch weighted by
its "tokens" metric, else by its rows), so it is a deterministic function of the parameters and
comparable across steps. Only validation units are read: no code path here touches the test split.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

#: the seed of the key passed to the loss (the masked schedule draws t and x_t from it)
VALIDATION_SEED = 20260101


def validation_units(stage: str, assignments) -> np.ndarray | None:
    """Indices of the validation units a stage's model is selected on (None = all of them).

    Args:
      stage: stage 1, "dense", "expert-k" or "random-k".
      assignments: the run's `experiments.engine.graph.Assignments` (unused for stage 1 and dense).

    Returns:
      ``[n]`` int64 unit indices for "expert-k" (its cluster's validation units, possibly empty);
      None for the others (a random-partition expert's training data is a uniform sample of all
      training units, so all validation units are its distribution).
    """
    kind, _, k = stage.partition("-")
    if kind == "expert" and k.isdigit():
        return np.flatnonzero(assignments.units["val"] == int(k))
    return None


@functools.lru_cache(maxsize=16)
def _loss_step(loss_fn: Callable, graphdef) -> Callable:
    """`(state, batch, key) -> (loss, weight)` jitted once per loss and model structure."""
    def pure(state, batch, key):
        loss, metrics = loss_fn(nnx.merge(graphdef, state), batch, key)
        rows = jax.tree.leaves(batch)[0].shape[0]
        return loss, metrics.get("tokens", rows) if isinstance(metrics, dict) else rows

    return jax.jit(pure)


def make_validate(loss_fn: Callable, batches: list) -> Callable[[nnx.Module], float]:
    """`validate(model) -> float`: the token-weighted mean of `loss_fn(model, batch, key)` over
    `batches` (fixed key `VALIDATION_SEED`), for `dfm.train.train(validate=...)`.

    Raises:
      ValueError: `batches` is empty, or a batch's weight is not positive.
    """
    if not batches:
        raise ValueError("batches: no validation batches")
    key = jax.random.PRNGKey(VALIDATION_SEED)

    def validate(model: nnx.Module) -> float:
        graphdef, state = nnx.split(model)
        step = _loss_step(loss_fn, graphdef)
        total, weight = 0.0, 0.0
        for batch in batches:
            loss, w = step(state, batch, key)
            w = float(w)
            if not w > 0:
                raise ValueError("batches: a validation batch has no target tokens")
            total += float(loss) * w
            weight += w
        return total / weight

    return validate
