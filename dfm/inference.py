"""One causal model on observed tokens: teacher-forced token log-probabilities and the prefill of
a prompt into a KV cache (THEORY S5: a causal model's row j is `p(x^{j+1} | x^{<j+1})`).

The one implementation of both for text experts (`dfm.models.Decoder`) and image-text experts
(`dfm.models.multimodal.MultimodalModel`, the image's features scattered at its image tokens):
`dfm.DecentralizedModel`, the text job's scoring (experiments/text) and the multimodal job's
evaluation and validation (experiments/mllm) all call these, and `dfm.decentral.mixture_generate`
continues what `prefill` leaves. Token convention (HF's causal LM with shifted labels): a row of
`tokens [n, S]` is the whole input, its first token (BOS, or the first prompt token) predicts
nothing, and the result is `[n, S-1]`: the log-probability of `tokens[:, j + 1]` given
`tokens[:, :j + 1]`. A text job sequence `x1 [n, L]` is scored as `[BOS] + x1`
(`dfm.autoregressive.shift_right`).

Each call splits the model once (`nnx.split`) and runs a `jax.jit` pure function of `(graphdef,
state, ...)`: the model's variables are inputs only, never written back, so a call that fails
(e.g. an out-of-memory error of a too-large batch) leaves the model as it was.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PixelsOf = Callable[[np.ndarray], Any]


def token_log_probs(model: Any, tokens: Any, *, pixels: Any = None, batch_size: int | None = None) -> np.ndarray:
    """Teacher-forced `log p(tokens[:, j + 1] | tokens[:, :j + 1])`, `[n, S-1]` float64 (nats).

    Args:
      model: a causal `Decoder` (`model(tokens [b, S]) -> logits [b, S, vocab]`) or a
        `MultimodalModel` (`model(tokens, pixels)`), an NNX module.
      tokens: `[n, S]` int token ids, S >= 2 (image tokens expanded for image-text models).
      pixels: None (text models), the normalized images `[n, H, W, C]` float32 (row i's image
        tokens take image i), or a function `rows [b] int64 -> [b, H, W, C]` that builds the
        pixels of those rows (so that only one batch of images is in memory at a time).
      batch_size: rows per forward pass (None: all n in one). The last batch is padded by
        repeating its last row, so every batch has one shape (one compilation); padded rows are
        dropped (rows do not interact).
    Returns:
      `[n, S-1]` float64; entry `[i, j]` is row i's log-prob of its token j + 1 (padding positions
      included: mask them).
    Raises:
      ValueError: `tokens` not `[n, S]` with n >= 1 and S >= 2, or `batch_size < 1`.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected int [n >= 1, S >= 2], got {tokens.dtype} {tokens.shape}")
    n = tokens.shape[0]
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size!r}")
    graphdef, state = nnx.split(model)
    out = np.zeros((n, tokens.shape[1] - 1))
    for start in range(0, n, size):
        idx = np.arange(start, min(n, start + size))
        rows = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
        if pixels is None:
            px = None
        elif callable(pixels):
            px = jnp.asarray(pixels(rows))
        else:
            px = jnp.asarray(np.asarray(pixels)[rows])
        lp = _target_log_probs(graphdef, state, jnp.asarray(tokens[rows], jnp.int32), px)
        out[idx] = np.asarray(lp, np.float64)[: len(idx)]
    return out


@functools.partial(jax.jit, static_argnums=0)
def _target_log_probs(graphdef, state, tokens, px):
    model = nnx.merge(graphdef, state)
    logits = model(tokens[:, :-1]) if px is None else model(tokens[:, :-1], px)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


def prefill(model: Any, tokens: Any, cache_length: int, *, pixels: Any = None,
            score_prompt: bool = False) -> tuple[Any, jax.Array, jax.Array | None]:
    """Run a prompt through a causal model into a fresh KV cache (the start of decoding).

    Args:
      model: a `Decoder` or `MultimodalModel` with `init_cache(batch, length)` and `prefill`.
      tokens: `[batch, P]` int prompt ids (image tokens expanded), P >= 1, the same length per row.
      cache_length: KV cache positions (static), >= P + the tokens to generate.
      pixels: the normalized images `[batch, H, W, C]` of an image-text model (None for text).
      score_prompt: also return the prompt's own token log-probs (the Bayes filter's evidence,
        THEORY S9); False compiles the program without them.
    Returns:
      `(cache, next_log_probs [batch, vocab] float32, prompt_log_probs [batch, P-1] float32 or None)`:
      the cache after the P tokens, the log-probs of the first new token (`log_softmax` of the
      last row's logits), and with `score_prompt` `log p(tokens[:, j + 1] | tokens[:, :j + 1])`
      (as `token_log_probs`).
    Raises:
      ValueError: `tokens` not `[batch, P]`, or `cache_length < P`.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens: expected [batch >= 1, P >= 1], got shape {tokens.shape}")
    if not isinstance(cache_length, (int, np.integer)) or cache_length < tokens.shape[1]:
        raise ValueError(f"cache_length: must be an int >= the prompt length {tokens.shape[1]}, got {cache_length!r}")
    graphdef, state = nnx.split(model)
    px = None if pixels is None else jnp.asarray(pixels)
    return _prefill(graphdef, state, tokens, px, int(cache_length), bool(score_prompt))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _prefill(graphdef, state, tokens, px, cache_length, score_prompt):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], cache_length)
    logits, cache = model.prefill(tokens, cache) if px is None else model.prefill(tokens, px, cache)
    first = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    if not score_prompt:
        return cache, first, None
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return cache, first, jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


def routing_features(model: Any, pixels_of: PixelsOf, num: int, batch_size: int) -> np.ndarray:
    """Routing / partition features `[num, vision_hidden]` float64 of an image-text model's images:
    `MultimodalModel.routing_features` (the patch mean of the tower's hidden state
    `vision_feature_layer`, class token dropped), `batch_size` images at a time.

    Args:
      model: a `MultimodalModel`.
      pixels_of: `rows [b] int64 -> [b, H, W, C]` normalized pixels of images `rows` (b <= batch_size).
      num: the number of images; batch_size: images per forward pass (the last batch is smaller).
    Returns:
      `[num, vision_hidden]` float64 (`[0, 0]` for num = 0).
    """
    if num == 0:
        return np.zeros((0, 0))
    graphdef, state = nnx.split(model)
    parts = [np.asarray(_routing_features(graphdef, state, jnp.asarray(pixels_of(np.arange(s, min(num, s + batch_size))))),
                        np.float64)
             for s in range(0, num, batch_size)]
    return np.concatenate(parts)


@functools.partial(jax.jit, static_argnums=0)
def _routing_features(graphdef, state, px):
    return nnx.merge(graphdef, state).routing_features(px)
