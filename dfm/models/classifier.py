"""`SequenceClassifier`: a small bidirectional encoder that maps token states to class logits.

Used by the learned router (THEORY S10: trained with cross-entropy on noised states `x_t` and
cluster labels, its softmax estimates the router `rho_t(k | x_t)` of THEORY S8). It reuses the
decoder blocks of `dfm.models.layers` with bidirectional attention, mean-pools the final
hidden states over real tokens and applies a linear head.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.config import DecoderConfig
from dfm.models.decoder import Decoder
from dfm.models.layers import dense_init

Array = jax.Array


def time_features(t: Array, size: int) -> Array:
    """Sinusoidal features of a scalar time per example: `t [batch] -> [batch, size]` float32.

    Angular frequencies `1000 * 10000 ** (-j / half)`, `j < half = size // 2` (transformer
    sinusoids with time scaled by 1000, so both `t in [0, 1]` and integer steps give distinct
    features). Output is `[sin, cos]`, zero-padded to `size` when `size` is odd.
    """
    half = size // 2
    freqs = 1000.0 * jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(feats, ((0, 0), (0, size - 2 * half)))


class SequenceClassifier(nnx.Module):
    """Bidirectional transformer classifier over token states.

    Args:
      config: `DecoderConfig` of the trunk; `causal` is forced to False and `output_size` is
        ignored. `vocab_size` must cover every input id (e.g. `vocab + 1` for masked states).
      num_classes: number of classes (e.g. the number of experts K).
      rngs: `nnx.Rngs` for initialization.

    Call: `clf(tokens [batch, length] int, t=None [batch] float or int, *, attention_mask=None
    [batch, length])` -> logits `[batch, num_classes]` float32. With `t`, a sinusoidal time
    embedding (through a learned linear map) is added to every token embedding.

    Raises:
      ValueError: `num_classes < 1`, or `t` not of shape `[batch]`.
    """

    def __init__(self, config: DecoderConfig, num_classes: int, *, rngs: nnx.Rngs):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: must be a positive int, got {num_classes!r}")
        # Tied embeddings: the trunk then has no lm_head (the classifier reads pooled states).
        config = config.replace(causal=False, tie_word_embeddings=True, output_size=None)
        self.config = config
        self.num_classes = num_classes
        self.trunk = Decoder(config, rngs=rngs)
        self.time_proj = nnx.Linear(
            config.hidden_size, config.hidden_size, dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
            kernel_init=dense_init(config, ("embed", None)), rngs=rngs)
        self.head = nnx.Linear(
            config.hidden_size, num_classes, dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
            kernel_init=dense_init(config, ("embed", None)), rngs=rngs)

    def __call__(self, tokens: Array, t: Array | None = None, *, attention_mask: Array | None = None) -> Array:
        tokens = jnp.asarray(tokens)
        extra = None
        if t is not None:
            t = jnp.asarray(t)
            if t.shape != (tokens.shape[0],):
                raise ValueError(f"t: expected shape [batch] = {(tokens.shape[0],)}, got {t.shape}")
            extra = self.time_proj(time_features(t, self.config.hidden_size).astype(self.config.compute_dtype))
            extra = extra[:, None, :]
        hidden = self.trunk.hidden_states(tokens, attention_mask=attention_mask, extra_embedding=extra)
        hidden = self.trunk.norm(hidden).astype(jnp.float32)
        if attention_mask is None:
            pooled = jnp.mean(hidden, axis=1)
        else:
            w = jnp.asarray(attention_mask, jnp.float32)[:, :, None]
            pooled = jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return self.head(pooled.astype(self.config.compute_dtype)).astype(jnp.float32)
