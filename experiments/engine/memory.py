"""A rough estimate of the memory one training step needs, to warn before a run that cannot fit.

float32 AdamW without activation rematerialization: 16 bytes per parameter (the parameter, its
gradient and AdamW's two moments) plus the activations of one batch kept for the backward pass,
per transformer layer ``34 s b h + 5 a s^2 b`` bytes in 16-bit (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", eq. 1), doubled for float32, plus
the logits, their softmax and gradient (``3 x 4 b s V`` bytes). It ignores XLA's buffer reuse and
fusion, so it overestimates; it is meant to catch a sequence length or batch that is off by an
order of magnitude (e.g. ``seq_len = 8192`` with the default model asks for ~90 GiB of attention
scores).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx


def count_parameters(factory: Callable[[], nnx.Module]) -> int:
    """Number of `nnx.Param` scalars of the model `factory()` builds (traced abstractly: nothing is
    allocated)."""
    model = nnx.eval_shape(factory)
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


def training_memory_bytes(parameters: int, *, batch: int, seq_len: int, hidden: int, layers: int, heads: int,
                          vocab: int) -> int:
    """Bytes of one float32 AdamW training step of a decoder (module docstring).

    Args:
      parameters: trainable parameter count; batch, seq_len: the step's sequences and their length;
      hidden, layers, heads: the decoder's width, depth and attention heads; vocab: output classes.
    """
    per_layer = 2 * (34 * seq_len * batch * hidden + 5 * heads * seq_len**2 * batch)
    logits = 3 * 4 * batch * seq_len * vocab
    return int(16 * parameters + layers * per_layer + logits)


def physical_memory_bytes() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None
