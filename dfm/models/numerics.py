"""Numerics knobs shared by the decoder and the vision towers: attention kernel, matmul precision, remat.

- `attention`: "auto" | "xla" | "cudnn" — which `jax.nn.dot_product_attention` implementation runs
  (`dfm.models.attention`). "auto" picks cuDNN flash attention on an NVIDIA GPU when the compute
  dtype is bfloat16 / float16 and the head size suits it, XLA otherwise.
- `matmul_precision`: "default" | "high" | "highest" — `jax.default_matmul_precision` for every
  matmul of the model's forward pass. On CPU all three are full float32. On GPU / TPU "default"
  multiplies float32 inputs at reduced precision (TF32 / bf16 passes), which moves logits by
  ~1e-3 relative; "highest" gives full float32 (what HF-parity and import checks need; slower).
  bfloat16 inputs are unaffected.
- `remat`: "none" | "full" | "dots" — activation rematerialisation of each decoder block
  (`jax.checkpoint`): "full" saves nothing inside a block (recomputes it in the backward pass),
  "dots" saves the matmul outputs without batch dimensions
  (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`), recomputing the elementwise ops.
"""
from __future__ import annotations

import contextlib

import jax

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
MATMUL_PRECISIONS = ("default", "high", "highest")
REMAT_POLICIES = ("none", "full", "dots")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """ValueError naming the field `name` when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}: must be one of {choices}, got {value!r}")


def precision_scope(matmul_precision: str):
    """Context for tracing a forward pass at `matmul_precision` (see module doc).

    "default" is a no-op context (JAX's backend default, bit-identical to no knob at all).
    Matmul precision is read when an op is traced, so the scope must wrap the tracing (it does
    inside the models' forward methods; a jitted step picks it up at compile time).
    """
    check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
    if matmul_precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(matmul_precision)


def remat_policy(remat: str):
    """The `jax.checkpoint` policy of a `remat` name (None for "full": save nothing).

    Raises ValueError for "none" (no remat: do not wrap) or an unknown name.
    """
    check_choice("remat", remat, REMAT_POLICIES)
    if remat == "none":
        raise ValueError("remat: 'none' has no checkpoint policy (do not wrap the block)")
    if remat == "full":
        return None
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
