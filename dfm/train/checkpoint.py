"""Checkpoints: the training loop's orbax `CheckpointManager`, and model hand-off helpers.

`save_model` / `load_model` hand a finished model from one stage to the next (e.g. the base
checkpoint that every expert starts from). Both use orbax, which writes into a temporary
directory and renames it when complete, so a crashed save never looks like a checkpoint; the
temporary directory a killed save left (``<name>.orbax-checkpoint-tmp*``) is removed by the next
save. `model_sha256` hashes a saved model's parameters (names, dtypes, shapes, values), so two
saves of equal parameters have equal digests whatever orbax's metadata holds (timestamps).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dfm.io import arrays_sha256, raise_naming, remove_temporaries
from dfm.sharding.placement import abstract_state

# Model-held RNG streams (nnx.RngState) are not checkpointed: randomness in training comes from
# the explicit per-step key, so these streams do not affect a resumed run's result.
MODEL_STATE = nnx.Not(nnx.RngState)


def ensure_writable_dir(path: str | os.PathLike, name: str = "checkpoint_dir") -> Path:
    """Create `path` (and parents) if needed and check that files can be written in it.

    Returns the absolute path. Raises ValueError naming `name` and `path` when the directory
    cannot be created or written (e.g. a parent is a file, or permissions forbid it).
    """
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as err:
        raise ValueError(f"{name}: cannot write checkpoints to {str(path)!r}: {err}") from err
    return path


def model_state_dict(model: nnx.Module) -> dict:
    """The model's variables (all but RNG streams) as a pure nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, MODEL_STATE))


def restore_into(module: Any, pure: dict, filt=...) -> None:
    """Write a pure dict (from `model_state_dict` / orbax) into `module` in place."""
    state = nnx.state(module) if filt is ... else nnx.state(module, filt)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)


def abstract_tree(tree):
    """`jax.ShapeDtypeStruct` of every array leaf (the orbax restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def open_manager(directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = False) -> ocp.CheckpointManager:
    """An orbax `CheckpointManager` with items "state" (arrays) and "meta" (JSON).

    `async_save=True` enables orbax's asynchronous checkpointing (a save returns once the arrays
    are on the host; files are written in the background; `wait_until_finished` / `close` wait).
    Orbax writes to a temporary directory and renames it when complete either way, so an
    interrupted save never leaves a checkpoint that looks finished.
    Raises ValueError naming `checkpoint_dir` when `directory` is not writable.
    """
    path = ensure_writable_dir(directory, "checkpoint_dir")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))


def save_model(model: nnx.Module, directory: str | os.PathLike) -> Path:
    """Save the model's variables to `directory` (overwritten if it exists), atomically.

    Returns the absolute path.

    Raises:
      ValueError: naming `directory` if its parent cannot be written.
      OSError: the disk is full, over quota or read-only (`dfm.io.disk_fault`), naming `directory`;
        orbax's temporary directory is removed and an existing model at `directory` is kept.
    """
    path = Path(directory).absolute()
    ensure_writable_dir(path.parent, "directory")
    remove_temporaries(path.parent, of=path.name)        # left by a save that was killed
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, model_state_dict(model), force=True)
            ckptr.wait_until_finished()
    except BaseException as exc:
        remove_temporaries(path.parent, of=path.name)
        raise_naming(exc, path)
        raise
    return path


def saved_arrays(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a model saved by `save_model`, read as numpy arrays (no model needed), keyed by
    their "/"-joined paths ("layers/0/mlp/down_proj/kernel").

    Raises:
      ValueError: naming `directory` when it holds no saved model or its files do not restore.
    """
    path = Path(directory).absolute()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore raise many types; name the directory
        raise ValueError(f"directory: the saved model {str(path)!r} does not restore ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys): np.asarray(leaf)
            for keys, leaf in leaves}


def model_sha256(directory: str | os.PathLike) -> str:
    """sha256 (hex) of the parameters a `save_model` directory holds: `dfm.io.arrays_sha256` of
    `saved_arrays` (names, dtypes, shapes and values in name order). Equal parameters give equal
    digests across saves and runs (orbax's own files hold timestamps); any truncated or changed
    array file fails to restore or changes the digest.

    Raises:
      ValueError: naming `directory` when it does not restore.
    """
    return arrays_sha256(saved_arrays(directory))


def load_model(abstract_model_or_factory: nnx.Module | Callable[[], nnx.Module],
               directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None) -> nnx.Module:
    """Load a model saved by `save_model` (from any mesh, or unsharded).

    Args:
      abstract_model_or_factory: a module of the right structure (concrete, or abstract from
        `nnx.eval_shape`), or a zero-argument factory building one (it is only traced with
        `nnx.eval_shape`, so no parameters are initialized).
      directory: the directory given to `save_model`.
      mesh: None = default placement (uncommitted arrays, like a freshly initialized model). A mesh from `dfm.sharding.make_mesh`: every array is
        restored directly into its shards on this mesh (orbax target `ShapeDtypeStruct`s with
        the `NamedSharding` its logical axis names give), whatever mesh it was saved from.
      rules: logical-axis rules for `mesh` (default `dfm.sharding.DEFAULT_RULES`).
    Returns:
      A new module with the saved variables (a given module is not modified).
    Raises:
      ValueError: naming `directory` if it holds no saved model, or `abstract_model_or_factory`
        if it is neither a module nor a callable.
    """
    path = Path(directory).absolute()
    if not (path / "_CHECKPOINT_METADATA").exists() and not (path / "_METADATA").exists():
        raise ValueError(f"directory: no saved model at {str(path)!r}")
    if isinstance(abstract_model_or_factory, nnx.Module):
        template = abstract_model_or_factory
    elif callable(abstract_model_or_factory):
        template = nnx.eval_shape(abstract_model_or_factory)
    else:
        raise ValueError(
            f"abstract_model_or_factory: expected an nnx.Module or a factory, got {type(abstract_model_or_factory)}")
    graphdef, state, rest = nnx.split(template, MODEL_STATE, ...)
    if mesh is None:
        # restore onto this process's default device, not the device ids recorded in the
        # checkpoint's sharding metadata (saved on 8 CPU devices, loaded on one GPU, say)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              abstract_tree(nnx.to_pure_dict(state)))
    else:
        target = nnx.to_pure_dict(abstract_state(state, mesh, rules))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, target)
    if mesh is None:
        # orbax returns arrays committed to an explicit device; jitted functions key their cache
        # on that placement, so a committed model would make the first train step compile once for
        # the restored placement and again for the default one after the update. Default-placed
        # (uncommitted) copies behave like freshly initialized parameters.
        restored = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), restored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state, rest)
