"""Placing NNX state and batches on a mesh from logical axis names.

Every `nnx.Variable` created with `nnx.with_partitioning` carries its logical names in the
`out_sharding` metadata (optimizer moments inherit them from their parameter, flax
`nnx.training.optimizer.to_opt_state`). These helpers turn the names into `NamedSharding`s with
`dfm.sharding.rules.logical_to_spec`; variables without names (step counters, RNG keys) are
replicated.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dfm.sharding.rules import logical_sharding, logical_to_spec


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: jax.sharding.Mesh, rules=None) -> NamedSharding:
    """The `NamedSharding` of one variable (replicated when it carries no logical names).

    Raises ValueError (`names`) when the number of names differs from the value's rank.
    """
    value = var.get_value()
    shape = tuple(getattr(value, "shape", ()))
    names = var.get_metadata().get("out_sharding")
    if not names:
        return NamedSharding(mesh, PartitionSpec())
    return logical_sharding(tuple(names), shape, mesh, rules)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=None):
    """A tree like `state` (an `nnx.State` or any pytree of Variables / arrays) of `NamedSharding`s.

    Usable as jit `in_shardings` / `out_shardings` for that state and with `jax.device_put`.
    """
    def one(x):
        if _is_var(x):
            return x.replace(variable_sharding(x, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh, rules=None) -> nnx.Module:
    """Move every variable of `module` (a model, an `nnx.Optimizer`) onto `mesh`, in place.

    Returns the same module. Values are unchanged; only their placement is.
    """
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
    return module


def init_sharded(factory: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules=None) -> nnx.Module:
    """Build `factory()` directly sharded: initialization is jitted with the shardings as
    `out_shardings`, so no device ever holds the whole model (the large-model path).

    `factory` must be deterministic (e.g. `lambda: Decoder(config, rngs=nnx.Rngs(0))`); the
    result equals `shard_module(factory(), mesh, rules)`.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    init = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)
    return nnx.merge(graphdef, init())


def abstract_state(tree, mesh: jax.sharding.Mesh | None, rules=None):
    """`jax.ShapeDtypeStruct`s of `tree` (an `nnx.State`), with shardings on `mesh` when given.

    The orbax restore target: restoring a checkpoint into it places each array on `mesh`
    whatever mesh it was saved from.
    """
    def one(x):
        if not _is_var(x):
            sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
        value = x.get_value()
        sharding = None if mesh is None else variable_sharding(x, mesh, rules)
        return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return jax.tree.map(one, tree, is_leaf=_is_var)


def batch_spec(ndim: int, mesh: jax.sharding.Mesh, rules=None) -> PartitionSpec:
    """`PartitionSpec` of a batch-major input of rank `ndim`: logical ("batch", None, ...)."""
    if ndim == 0:
        return PartitionSpec()
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), None, dict(mesh.shape), rules)


def global_batch(local: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
    """Assemble this process's rows into global arrays split over the batch mesh axes.

    Args:
      local: a pytree of batch-major arrays `[local_batch, ...]`: the rows this process feeds
        (on one process: the whole batch). Scalars are replicated (every process must give the
        same value).
    Returns:
      The same tree of global `jax.Array`s `[local_batch * process_count, ...]`, built with
      `jax.make_array_from_process_local_data` and sharded by `batch_spec`.
    Raises:
      ValueError: (`batch`) a global batch size not divisible by the batch mesh axes' size.
    """
    def one(x):
        x = np.asarray(x)
        spec = batch_spec(x.ndim, mesh, rules)
        if x.ndim:
            axes = spec[0] if spec else None
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            split = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            rows = x.shape[0] * jax.process_count()
            if rows % split:
                raise ValueError(f"batch: global batch size {rows} is not divisible by the batch mesh axes "
                                 f"{list(axes)} of total size {split}")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree.map(one, local)
