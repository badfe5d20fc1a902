"""Vocabulary-tiled cross-entropy: the LM loss and its exact gradient without the float32 logits.

The plain path of a causal LM builds the logits ``[batch, length, vocab]`` in float32 and keeps
them, their softmax and their gradient alive for the backward pass: ``3 x 4 b s V`` bytes,
55.6 GiB per device for 4 sequences of 8192 tokens over Qwen2.5's 151,674 ids. Here the positions
are cut into chunks of ``chunk`` tokens along the length axis (every row of the batch at once,
so a batch sharded over devices stays sharded) and a ``jax.lax.scan`` computes, per chunk,
``hidden_chunk @ W_out`` in float32, its log-sum-exp and the target's logit; only the per-token
log-probabilities ``[batch, length]`` and log-sum-exps leave the loop. A ``jax.custom_vjp``
recomputes each chunk's logits in the backward pass and forms the exact gradient
``d log p(t) / d z = onehot(t) - softmax(z)`` chunk by chunk: ``dh = dz W^T`` per chunk and
``dW = sum_chunks h^T dz`` accumulated in float32. Peak extra memory is one chunk's logits (and
its gradient) plus a float32 accumulator of ``W``'s shape, instead of the whole ``[b, s, V]``.

The same idea as Levanter's blockwise cross-entropy (``levanter.models.loss``, block over tokens
and vocabulary with a custom VJP) and MaxText's vocabulary tiling (``num_vocab_tiling``: token
chunks under ``jax.checkpoint`` in a scan); this module tiles tokens only, with a hand-written VJP.

Numerics: the matmuls take the hidden states and ``W`` in their dtype (bfloat16 under mixed
precision) and accumulate in float32 (``preferred_element_type``); softmax, log-sum-exp and the
loss are float32. In the backward pass ``dz`` is cast to the compute dtype before its two
matmuls (as autodiff of the plain path does for an untied bfloat16 head; for a tied head the plain
path's gradient may keep ``dz`` in float32, so bfloat16 gradients can differ slightly). With float32 inputs the values and gradients equal
the plain ``logits -> optax.softmax_cross_entropy_with_integer_labels`` path up to float rounding
(tests/dfm/train/test_tiled_loss.py: within 1e-5). One difference from `dfm.models.Decoder`'s
untied head in bfloat16: its logits are rounded to bfloat16 before the float32 cast, here they
are not (the tied head accumulates in float32 in both).

Entry points: `tiled_log_probs` (per-token ``log p``, for scoring), `tiled_nll` (summed / mean /
per-token NLL), and `causal_lm_loss` (a `dfm.models.Decoder` or `MultimodalModel` end to end,
tiled or plain; what the jobs' loss functions call).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from dfm.models.decoder import LOGITS_AXES, Decoder
from dfm.models.multimodal import MultimodalModel
from dfm.sharding.rules import constrain

Array = jax.Array

DEFAULT_CHUNK = 1024     # tokens per chunk and row: [batch, 1024, 151674] float32 = 0.58 GiB per sequence
LAYOUTS = ("hidden_vocab", "vocab_hidden")
REDUCTIONS = ("sum", "mean", "none")
_PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}


# --------------------------------------------------------------------------------------- the kernel
def _split(x: Array, chunk: int) -> Array:
    """``[b, L, ...] -> [n, b, chunk, ...]`` (zero padded to ``n * chunk`` positions)."""
    b, length = x.shape[:2]
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)


def _merge(x: Array, length: int) -> Array:
    """Inverse of `_split`: ``[n, b, chunk, ...] -> [b, L, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunk_logits(h: Array, w: Array, layout: str, precision) -> Array:
    """``[b, c, d] x W -> [b, c, V]`` float32 (float32 accumulation of compute-dtype inputs)."""
    spec = "bcd,dv->bcv" if layout == "hidden_vocab" else "bcd,vd->bcv"
    z = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32, precision=precision)
    return constrain(z, LOGITS_AXES)


def _onehot(targets: Array, shape) -> Array:
    """``iota == targets[..., None]`` over the vocabulary axis (a select mask, never a scatter)."""
    return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) == targets[..., None].astype(jnp.int32)


def _forward(h, w, targets, chunk, layout, precision):
    def body(_, xs):
        hc, tc = xs
        z = _chunk_logits(hc, w, layout, precision)
        lse = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.sum(jnp.where(_onehot(tc, z.shape), z, 0.0), axis=-1)
        return None, (picked - lse, lse)

    _, (logp, lse) = jax.lax.scan(body, None, (_split(h, chunk), _split(targets, chunk)))
    return _merge(logp, h.shape[1]), lse


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _log_probs(h, w, targets, chunk, layout, precision):
    return _forward(h, w, targets, chunk, layout, precision)[0]


def _log_probs_fwd(h, w, targets, chunk, layout, precision):
    logp, lse = _forward(h, w, targets, chunk, layout, precision)
    return logp, (h, w, targets, lse)


def _log_probs_bwd(chunk, layout, precision, residuals, g):
    h, w, targets, lse = residuals
    dh_spec = "bcv,dv->bcd" if layout == "hidden_vocab" else "bcv,vd->bcd"
    dw_spec = "bcd,bcv->dv" if layout == "hidden_vocab" else "bcd,bcv->vd"

    def body(dw, xs):
        hc, tc, lse_c, gc = xs
        z = _chunk_logits(hc, w, layout, precision)
        # d log softmax(z)[t] / dz = onehot(t) - softmax(z), scaled by the incoming cotangent
        dz = gc[..., None] * (_onehot(tc, z.shape).astype(jnp.float32) - jnp.exp(z - lse_c[..., None]))
        dz = constrain(dz.astype(w.dtype), LOGITS_AXES)
        dh = jnp.einsum(dh_spec, dz, w, preferred_element_type=jnp.float32, precision=precision)
        dw = dw + jnp.einsum(dw_spec, hc, dz, preferred_element_type=jnp.float32, precision=precision)
        return dw, dh.astype(h.dtype)

    xs = (_split(h, chunk), _split(targets, chunk), lse, _split(g.astype(jnp.float32), chunk))
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    return _merge(dh, h.shape[1]), dw.astype(w.dtype), None


_log_probs.defvjp(_log_probs_fwd, _log_probs_bwd)


# --------------------------------------------------------------------------------------- public API
def _check(hidden, weight, targets, chunk, layout, matmul_precision) -> int:
    """ValueError naming the argument; returns the vocabulary size."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk: must be a positive int, got {chunk!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
    if matmul_precision not in _PRECISIONS:
        raise ValueError(f"matmul_precision: must be one of {tuple(_PRECISIONS)}, got {matmul_precision!r}")
    if jnp.ndim(hidden) != 3:
        raise ValueError(f"hidden: expected shape [batch, length, hidden], got {jnp.shape(hidden)}")
    d = hidden.shape[-1]
    if jnp.ndim(weight) != 2 or weight.shape[0 if layout == "hidden_vocab" else 1] != d:
        want = f"[{d}, vocab]" if layout == "hidden_vocab" else f"[vocab, {d}]"
        raise ValueError(f"weight: expected shape {want} (layout {layout!r}), got {jnp.shape(weight)}")
    if jnp.shape(targets) != hidden.shape[:2]:
        raise ValueError(f"targets: expected shape {hidden.shape[:2]} ([batch, length]), got {jnp.shape(targets)}")
    if not jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
        raise ValueError(f"targets: expected integer ids, got dtype {jnp.asarray(targets).dtype}")
    return weight.shape[1 if layout == "hidden_vocab" else 0]


def tiled_log_probs(hidden: Array, weight: Array, targets: Array, *, chunk: int = DEFAULT_CHUNK,
                    layout: str = "hidden_vocab", matmul_precision: str = "default") -> Array:
    """Per-token ``log softmax(hidden @ W)[targets]`` without forming the ``[batch, length, vocab]`` logits.

    Differentiable in ``hidden`` and ``weight`` (exact gradient, recomputed chunk by chunk; module
    doc). Jittable; ``length`` need not be a multiple of ``chunk`` (the last chunk is zero padded).

    Args:
      hidden: ``[batch, length, hidden]`` final hidden states, after the final norm (float32 or
        bfloat16; ``Decoder.output_projection`` gives them).
      weight: the output projection, ``[hidden, vocab]`` (``layout="hidden_vocab"``, an
        ``lm_head`` kernel) or ``[vocab, hidden]`` (``"vocab_hidden"``, a tied embedding table),
        in the dtype of ``hidden`` (promoted otherwise).
      targets: ``[batch, length]`` int ids; an id outside ``[0, vocab)`` scores ``-logsumexp``
        (weight such positions 0).
      chunk: positions per chunk and row: the loop holds ``[batch, chunk, vocab]`` float32 logits.
      layout: see ``weight``.
      matmul_precision: "default" | "high" | "highest" (`dfm.models.numerics`), passed to every
        matmul of both passes.

    Returns:
      ``[batch, length]`` float32 log-probabilities in nats.

    Raises:
      ValueError: naming the argument, for shapes that do not fit, a non-integer ``targets``, a
        ``chunk`` that is not a positive int, or an unknown ``layout`` / ``matmul_precision``.
    """
    _check(hidden, weight, targets, chunk, layout, matmul_precision)
    chunk = min(chunk, hidden.shape[1])      # a chunk longer than the rows would only pad them with zeros
    dtype = jnp.result_type(hidden, weight)
    return _log_probs(hidden.astype(dtype), weight.astype(dtype), jnp.asarray(targets), chunk, layout,
                      _PRECISIONS[matmul_precision])


def _reduce(logp: Array, mask: Array | None, reduction: str) -> Array:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is None:
        mask = jnp.ones(logp.shape, jnp.float32)
    elif jnp.shape(mask) != logp.shape:
        raise ValueError(f"mask: expected shape {logp.shape} ([batch, length]), got {jnp.shape(mask)}")
    m = jnp.asarray(mask).astype(jnp.float32)
    nll = jnp.where(m != 0, -logp * m, 0.0)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return jnp.sum(nll)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(m), 1.0)


def tiled_nll(hidden: Array, weight: Array, targets: Array, mask: Array | None = None, *,
              chunk: int = DEFAULT_CHUNK, layout: str = "hidden_vocab", matmul_precision: str = "default",
              reduction: str = "mean") -> Array:
    """Weighted next-token NLL ``-sum_j m_j log p(targets_j)`` from hidden states (`tiled_log_probs`).

    Args:
      hidden, weight, targets, chunk, layout, matmul_precision: as `tiled_log_probs`.
      mask: optional ``[batch, length]`` bool or float weights ``m`` (default all 1). Positions
        with ``m = 0`` contribute exactly 0 to the value and the gradient.
      reduction: "mean" (``sum m nll / max(sum m, 1)``, the masked mean per target token; the
        default), "sum", or "none" (``[batch, length]`` float32 ``m * nll``).

    Returns:
      A float32 scalar in nats (``[batch, length]`` for "none").

    Raises:
      ValueError: as `tiled_log_probs`, a ``mask`` of another shape, or an unknown ``reduction``.
    """
    logp = tiled_log_probs(hidden, weight, targets, chunk=chunk, layout=layout, matmul_precision=matmul_precision)
    return _reduce(logp, mask, reduction)


def causal_lm_loss(model: Decoder | MultimodalModel, tokens: Array, targets: Array, mask: Array | None = None, *,
                   pixels: Array | None = None, tiled: bool = True, chunk: int = DEFAULT_CHUNK,
                   positions: Array | None = None, attention_mask: Array | None = None,
                   segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Masked mean next-token NLL of a causal LM on ``tokens``, tiled (no full logits) or plain.

    Row ``j`` of the model's output on ``tokens`` predicts ``targets[:, j]`` (for next-token
    training: ``tokens = x[:, :-1]``, ``targets = x[:, 1:]``, or ``tokens = shift_right(x)``,
    ``targets = x``).

    Args:
      model: a causal `dfm.models.Decoder` or a `dfm.models.MultimodalModel`.
      tokens: ``[batch, length]`` int input ids.
      targets: ``[batch, length]`` int target ids in ``[0, output_size)``.
      mask: optional ``[batch, length]`` bool / float weights (default: every target counts).
      pixels: ``[n_images, H, W, C]`` images of a `MultimodalModel` (None: no images); must be
        None for a `Decoder`.
      tiled: True: `tiled_nll` on ``model``'s final hidden states (``Decoder.output_projection``);
        False: the plain path, ``model(...)`` logits then
        ``optax.softmax_cross_entropy_with_integer_labels``.
      chunk: positions per chunk (tiled only).
      positions, attention_mask, segment_ids: as ``Decoder.__call__`` (packed rows etc.).

    Returns:
      ``(loss, count)``: the float32 scalar ``sum m nll / max(sum m, 1)`` in nats, and ``sum m``.

    Raises:
      ValueError: ``pixels`` given to a `Decoder`, a bidirectional decoder, or as `tiled_nll`
        and the model's forward pass.
      TypeError: ``model`` is neither a `Decoder` nor a `MultimodalModel`.
    """
    if isinstance(model, MultimodalModel):
        decoder, extra = model.language_model, (pixels,)
    elif isinstance(model, Decoder):
        if pixels is not None:
            raise ValueError("pixels: a Decoder takes no images (use a MultimodalModel)")
        decoder, extra = model, ()
    else:
        raise TypeError(f"model: expected a dfm.models.Decoder or MultimodalModel, got {type(model).__name__}")
    if not decoder.config.causal:
        raise ValueError("model: causal_lm_loss needs a causal model (config.causal=False)")
    kw = dict(positions=positions, attention_mask=attention_mask, segment_ids=segment_ids)
    m = jnp.ones(jnp.shape(targets), jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
    if tiled:
        h, weight, layout = decoder.output_projection(model.hidden_states(tokens, *extra, **kw))
        loss = tiled_nll(h, weight, targets, m, chunk=chunk, layout=layout,
                         matmul_precision=decoder.config.matmul_precision)
    else:
        logits = model(tokens, *extra, **kw)
        loss = _reduce(-optax.softmax_cross_entropy_with_integer_labels(logits, targets), m, "mean")
    return loss, jnp.sum(m)
