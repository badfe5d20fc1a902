"""Shared primitives of HF import and export: fill a model's parameters from HF-named tensors, the
HF state dict of a model, the abstract (shape-only) model, checkpoint dtypes and strictness.

Used by `dfm.hf.load` (text decoders), `dfm.hf.vision_io` (CLIP, LLaVA, InternVL) and
`dfm.hf.export`; depends only on `configs`, `mapping` and `safetensors_io`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.hf import configs
from dfm.hf.mapping import Rule, hf_candidates, hf_key, to_hf, to_ours
from dfm.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint

Adapt = Callable[[tuple, np.ndarray], np.ndarray]


def _get(weights: Any, key: str) -> np.ndarray:
    return weights.get(key) if isinstance(weights, SafetensorsCheckpoint) else np.asarray(weights[key])


def _check_finite(value: np.ndarray, weights: Any, key: str, source: Any, error: type) -> None:
    """`error` naming the file holding `key` (a checkpoint) or `source` (a dict) and `key` when a
    floating tensor (bfloat16 included) holds NaN or inf. One `np.isfinite(...).all()` per tensor."""
    if not jnp.issubdtype(value.dtype, jnp.floating) or np.isfinite(value).all():
        return
    where = weights.file_of(key) if isinstance(weights, SafetensorsCheckpoint) else source
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    raise error(f"{where}: tensor {key!r} holds {bad} non-finite values (NaN or inf) of {value.size}")


def assign_weights(model: nnx.Module, weights: Mapping[str, Any] | SafetensorsCheckpoint,
                   rules: Sequence[Rule], *, source: Any = "weights", adapt: Adapt | None = None) -> set[str]:
    """Fill every `nnx.Param` of `model` (concrete or from `nnx.eval_shape`) from HF-named tensors.

    Args:
      model: the module; its parameters' shapes and dtypes are the targets (values are cast).
      weights: HF key -> array (a dict of numpy / torch-`.numpy()` arrays, or a checkpoint).
      rules: the architecture's `dfm.hf.mapping` rules (first matching HF key is used).
      source: the file (or name) quoted in error messages.
      adapt: optional `(path, value in torch layout) -> value` hook applied before the layout change.

    Returns:
      The set of HF keys that were read.

    Raises:
      ValueError (CheckpointError for a checkpoint): a parameter with no tensor (naming `source`,
        the canonical key and the parameter), a tensor of the wrong shape (naming the key and
        both shapes), or a floating tensor holding NaN or inf (naming the file that holds it, for a
        checkpoint, else `source`, and the key).
    """
    error = CheckpointError if isinstance(weights, SafetensorsCheckpoint) else ValueError
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        candidates = hf_candidates(rules, path)
        key = next((k for k in candidates if k in weights), None)
        name = ".".join(map(str, path))
        if key is None:
            also = f"; also tried {candidates[1:]}" if len(candidates) > 1 else ""
            raise error(f"{source}: missing tensor {candidates[0]!r} for parameter {name}{also}")
        value = _get(weights, key)
        _check_finite(value, weights, key, source, error)
        stored = value.shape
        if adapt is not None:
            value = adapt(path, value)
        target = var.get_value()
        try:
            value = to_ours(path, value, target.shape)
        except ValueError:
            raise error(f"{source}: {key!r} has shape {stored} (as stored), which does not fit "
                        f"parameter {name} of shape {tuple(target.shape)}") from None
        var.set_value(jnp.asarray(value, dtype=target.dtype))
        used.add(key)
    return used


def abstract_model(factory: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """The model with shape-only parameters (`nnx.eval_shape`), or a concrete one when it holds
    variables other than parameters (those need real initial values)."""
    model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    others = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree_util.tree_leaves(others):
        model = factory(nnx.Rngs(0))
    return model


def checkpoint_dtypes(ckpt: SafetensorsCheckpoint, hf_config: dict, dtype: str | None,
            param_dtype: str | None) -> tuple[str, str]:
    """`(compute dtype, parameter dtype)` names: the requested ones, else the checkpoint's stored one."""
    stored = ckpt.floating_dtype() or configs.torch_dtype_name(hf_config) or "float32"
    compute = dtype or stored
    return compute, param_dtype or dtype or stored


def check_unused(ckpt: SafetensorsCheckpoint, used: set[str], strict: bool, ignore: Sequence[str] = ()) -> None:
    """CheckpointError (strict only) when the checkpoint holds tensors the model did not read."""
    if not strict:
        return
    unused = [k for k in ckpt.keys() if k not in used and k not in ignore and not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise CheckpointError(f"{ckpt.source}: {len(unused)} tensors not used by the model (strict=True), "
                              f"e.g. {unused[:5]}")




def hf_state_dict(model: nnx.Module, rules: Sequence[Rule], *, dtype: str | None = None,
                  hf_shapes: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF key -> numpy array (torch layout) of every parameter of `model`.

    dtype: cast to this dtype name (e.g. "bfloat16"); None keeps each parameter's dtype.
    hf_shapes: HF shapes for keys whose torch layout has extra size-1 axes (e.g. `cls_token [1, 1, D]`).
    """
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = hf_key(rules, path)
        value = to_hf(path, np.asarray(var.get_value()), (hf_shapes or {}).get(key))
        out[key] = value.astype(dtype) if dtype is not None else value
    return out
