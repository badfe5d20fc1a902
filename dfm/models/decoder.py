"""LLaMA / Qwen2-style NNX decoder: causal LM or bidirectional denoiser, with a KV cache.

Module tree (HF `LlamaForCausalLM` / `Qwen2ForCausalLM` names, `model.` prefix dropped):
`embed_tokens`, `layers[i]` (see `dfm.models.layers.DecoderLayer`), `norm`, `lm_head`
(absent when `tie_word_embeddings`). Parameter mapping to HF: `embed_tokens.embedding` =
`model.embed_tokens.weight`; every `*.kernel` = HF `*.weight` transposed; `*.scale` = the norm
`*.weight`; biases identical.

Sharding: parameters carry logical axis names (see `dfm.models.layers`); the residual stream
`[batch, length, hidden]` and the logits are constrained with `dfm.sharding.constrain` to the
"activation_*" logical axes, which is the identity unless a step traces inside
`dfm.sharding.use_rules(mesh, rules)` (the sharded steps of `dfm.train.steps`).

With `causal=True` the model is the next-token distribution of an AR model: row j of the logits
is `p(x^{j+1} | x^{<j+1})` (THEORY S5; shift with `dfm.autoregressive.shift_right` to use it as a
denoiser). With `causal=False` every position sees the whole sequence: the posterior
`p_{1|t}(x^i | x_t)` of a masked DFM denoiser (THEORY S4).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from dfm.models.config import DecoderConfig
from dfm.models.layers import (
    RMSNorm,
    attention_weights_mask,
    dense,
    dense_init,
    make_layers,
    rope_cos_sin,
    segment_positions,
)
from dfm.models.numerics import precision_scope, remat_policy
from dfm.sharding.rules import constrain

Array = jax.Array
# {"k": per-layer tuple of [batch, kv_heads, max_length, head_dim], "v": same} (HF layout); with
# `scan_layers` one stacked array [num_layers, batch, kv_heads, max_length, head_dim] each.
Cache = dict
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")   # [batch, length, hidden]
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")     # [batch, length, output_size]


class Decoder(nnx.Module):
    """Decoder-only transformer (RMSNorm, RoPE `rotate_half`, SwiGLU, GQA), HF LLaMA/Qwen2 layout.

    Args:
      config: `DecoderConfig`.
      rngs: `nnx.Rngs` for parameter initialization (uses the "params" / default stream).

    Call: `model(tokens [batch, length] int, *, positions=None, attention_mask=None, segment_ids=None)`
    -> logits `[batch, length, output_size]` float32. `positions [batch, length]` default
    `arange(length)`; `attention_mask [batch, length]` (1 = real token) removes padded keys;
    `segment_ids [batch, length]` (packed sequences: 1.. = segment, 0 = padding) keeps attention
    within each segment (positions then default to restarting at 0 in each segment).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=config.compute_dtype,
            param_dtype=config.parameter_dtype, embedding_init=dense_init(config, ("vocab", "embed")), rngs=rngs)
        self.layers = make_layers(config, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.parameter_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.num_outputs, use_bias=False, dtype=config.compute_dtype,
                param_dtype=config.parameter_dtype, kernel_init=dense_init(config, ("embed", "vocab")), rngs=rngs)

    # ------------------------------------------------------------------ full forward
    def embed(self, tokens: Array) -> Array:
        """Token embeddings `[batch, length] -> [batch, length, hidden]` (compute dtype), as `nnx.Embed`.

        Under `dfm.sharding.use_rules` the table is first gathered over its "embed" (FSDP) shards,
        so the lookup's output can be split on batch without an all-to-all.
        """
        table = self.embed_tokens.embedding[...].astype(self.config.compute_dtype)
        return jnp.take(constrain(table, ("vocab", None)), tokens, axis=0)

    def logits(self, hidden: Array) -> Array:
        """Final norm + output projection: `[batch, length, hidden] -> [batch, length, output_size]` float32.

        The projection runs on `[batch * length, hidden]` (`dfm.models.layers.dense`; faster weight
        gradients on XLA:CPU), reshaped back before the sharding constraint.
        """
        with precision_scope(self.config.matmul_precision):
            return self._logits(hidden)

    def _logits(self, hidden: Array) -> Array:
        h = self.norm(hidden)
        if self.lm_head is None:
            table = self.embed_tokens.embedding[...][: self.config.num_outputs].astype(h.dtype)
            flat = jnp.einsum("nd,vd->nv", h.reshape(-1, h.shape[-1]), table, preferred_element_type=jnp.float32)
            out = flat.reshape(*h.shape[:-1], -1)
        else:
            out = dense(self.lm_head, h)
        return constrain(out.astype(jnp.float32), LOGITS_AXES)

    def output_projection(self, hidden: Array) -> tuple[Array, Array, str]:
        """`(h, weight, layout)`: the head as factors, for a loss that never forms the logits.

        `h` is the final norm of `hidden [batch, length, hidden]` (compute dtype); `weight` the
        output projection in the compute dtype: the tied embedding table's first `output_size`
        rows `[output_size, hidden]` (`layout = "vocab_hidden"`) or the `lm_head` kernel
        `[hidden, output_size]` (`"hidden_vocab"`). `einsum(h, weight)` accumulated in float32
        is `logits(hidden)` (the untied bfloat16 head rounds its logits to bfloat16 first). Used by
        `dfm.train.tiled_loss.causal_lm_loss`.
        """
        with precision_scope(self.config.matmul_precision):
            h = self.norm(hidden)
        if self.lm_head is None:
            table = self.embed_tokens.embedding[...][: self.config.num_outputs]
            return h, table.astype(h.dtype), "vocab_hidden"
        return h, self.lm_head.kernel[...].astype(h.dtype), "hidden_vocab"

    def hidden_states(self, tokens: Array | None, *, positions: Array | None = None,
                      attention_mask: Array | None = None, extra_embedding: Array | None = None,
                      inputs_embeds: Array | None = None, segment_ids: Array | None = None) -> Array:
        """Final-layer hidden states before the last norm, `[batch, length, hidden]`.

        segment_ids: optional `[batch, length]` int for packed rows (several sequences laid end to
        end, as InternVL's packed training does): 1.. = the sequence's segment,
        0 = padding; each segment one contiguous run. A query attends only to keys of its own
        segment (and causally, by position); `positions` default to
        `dfm.models.layers.segment_positions` (0 at the start of every segment), so each segment's
        outputs equal those of the sequence run alone.

        extra_embedding: optional `[batch, 1 or length, hidden]` added to the token embeddings
        (e.g. a time embedding in `SequenceClassifier`).
        inputs_embeds: optional `[batch, length, hidden]` used instead of `self.embed(tokens)`
        (HF `inputs_embeds`, e.g. token embeddings with image features scattered in by
        `dfm.models.MultimodalModel`); `tokens` may then be None (if given it is only checked).
        """
        x, b, n = self._input_embeddings(tokens, inputs_embeds)
        if segment_ids is not None:
            if jnp.shape(segment_ids) != (b, n):
                raise ValueError(f"segment_ids: expected shape {(b, n)}, got {jnp.shape(segment_ids)}")
            segment_ids = jnp.asarray(segment_ids)
            if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids: expected integer segment ids, got dtype {segment_ids.dtype}")
        default_positions = positions is None
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) if segment_ids is None
                         else segment_positions(segment_ids))
        elif jnp.shape(positions) != (b, n):
            raise ValueError(f"positions: expected shape {(b, n)}, got {jnp.shape(positions)}")
        if attention_mask is not None and jnp.shape(attention_mask) != (b, n):
            raise ValueError(f"attention_mask: expected shape {(b, n)}, got {jnp.shape(attention_mask)}")
        if extra_embedding is not None:
            x = x + extra_embedding.astype(x.dtype)
        with precision_scope(self.config.matmul_precision):
            x = constrain(x, RESIDUAL_AXES)
            cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta)
            if default_positions and attention_mask is None and segment_ids is None:
                # index order = position order: the kernel's own causal mask, no mask array (cuDNN-able)
                return self._run_layers(x, cos, sin, causal=self.config.causal, mask=None)
            mask = attention_weights_mask(positions, positions, causal=self.config.causal, key_mask=attention_mask,
                                          q_segments=segment_ids, k_segments=segment_ids)
            return self._run_layers(x, cos, sin, causal=False, mask=mask)

    def _run_layers(self, x: Array, cos: Array, sin: Array, *, causal: bool, mask: Array | None) -> Array:
        """The blocks over `x [batch, length, hidden]` (no cache): a loop or `nnx.scan`, each block
        under `nnx.remat` when `config.remat` asks."""
        config = self.config

        def block(graphdef, layer_state, x):
            x, _ = nnx.merge(graphdef, layer_state)(x, cos, sin, causal=causal, mask=mask)
            return constrain(x, RESIDUAL_AXES)

        if config.remat != "none":
            block = jax.checkpoint(block, policy=remat_policy(config.remat), static_argnums=0)
        if not config.scan_layers:
            for layer in self.layers:
                x = block(*nnx.split(layer), x)
            return x
        graphdef, stacked = nnx.split(self.layers)
        x, _ = jax.lax.scan(lambda x, layer_state: (block(graphdef, layer_state, x), None), x, stacked)
        return x

    def __call__(self, tokens: Array | None, *, positions: Array | None = None,
                 attention_mask: Array | None = None, inputs_embeds: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        """Logits `[batch, length, output_size]` float32 of `tokens [batch, length]` (see class doc).

        `inputs_embeds [batch, length, hidden]`, when given, replaces the token embeddings (then
        `tokens` may be None; see `hidden_states`). `segment_ids [batch, length]`: packed rows,
        attention within each segment (see `hidden_states`).
        Raises ValueError (concrete inputs) for tokens that are not a 2-D integer array with ids in
        `[0, vocab_size)`, `inputs_embeds` not `[batch, length, hidden]`, or `positions` /
        `attention_mask` / `segment_ids` not of shape `[batch, length]` (segment ids not integers).
        """
        return self.logits(self.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                              inputs_embeds=inputs_embeds, segment_ids=segment_ids))

    def _input_embeddings(self, tokens: Array | None, inputs_embeds: Array | None) -> tuple[Array, int, int]:
        """`(embeddings [batch, length, hidden] compute dtype, batch, length)` of `tokens` or `inputs_embeds`."""
        if inputs_embeds is None:
            if tokens is None:
                raise ValueError("tokens: required when inputs_embeds is not given")
            tokens = jnp.asarray(tokens)
            check_tokens(tokens, self.config.vocab_size, "tokens")
            return self.embed(tokens), tokens.shape[0], tokens.shape[1]
        x = jnp.asarray(inputs_embeds)
        if x.ndim != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds: expected shape [batch, length, {self.config.hidden_size}], "
                             f"got {tuple(x.shape)}")
        if tokens is not None and tuple(jnp.shape(tokens)) != tuple(x.shape[:2]):
            raise ValueError(f"tokens: shape {tuple(jnp.shape(tokens))} does not match inputs_embeds "
                             f"{tuple(x.shape)} (expected [batch, length] = {tuple(x.shape[:2])})")
        return x.astype(self.config.compute_dtype), x.shape[0], x.shape[1]

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int, max_length: int) -> Cache:
        """Empty KV cache for `batch` sequences of up to `max_length` tokens.

        Returns a plain pytree `{"k": (k_0, ..), "v": (v_0, ..)}`, one
        `[batch, kv_heads, max_length, head_dim]` array (compute dtype) per layer (HF's cache
        layout; axis 2 = position). With `config.scan_layers` `"k"` and `"v"` are single stacked
        arrays `[num_layers, batch, kv_heads, max_length, head_dim]`.
        Raises ValueError for a bidirectional model (a cache needs causal attention).
        """
        if not self.config.causal:
            raise ValueError("init_cache: the KV cache needs a causal model (config.causal=False)")
        if batch < 1 or max_length < 1:
            raise ValueError(f"init_cache: batch and max_length must be >= 1, got {batch}, {max_length}")
        c = self.config
        shape = (batch, c.kv_heads, max_length, c.head_size)
        if c.scan_layers:
            stacked = (c.num_layers, *shape)
            return {"k": jnp.zeros(stacked, c.compute_dtype), "v": jnp.zeros(stacked, c.compute_dtype)}
        zeros = tuple(jnp.zeros(shape, c.compute_dtype) for _ in range(c.num_layers))
        return {"k": zeros, "v": tuple(jnp.zeros(shape, c.compute_dtype) for _ in range(c.num_layers))}

    def extend(self, tokens: Array | None, start, cache: Cache, *,
               inputs_embeds: Array | None = None) -> tuple[Array, Cache]:
        """Run `tokens [batch, n]` at positions `start .. start + n - 1`, reading/writing the cache.

        Keys at cache index `<= position` are attended to, so the cache must hold positions
        `0 .. start - 1` already. `start` may be traced. `cache` as from `init_cache` (arrays
        `[batch, kv_heads, max_length, head_dim]`). `inputs_embeds [batch, n, hidden]`, when given,
        replaces the token embeddings (`tokens` may then be None). Returns `(logits [batch, n,
        output_size] float32, cache)`. Positions past `max_length` are a ValueError when `start`
        is concrete.
        """
        if not self.config.causal:
            raise ValueError("extend: the KV cache needs a causal model (config.causal=False)")
        if inputs_embeds is None:
            tokens = jnp.asarray(tokens)
            x, b, n = self.embed(tokens), tokens.shape[0], tokens.shape[1]
        else:
            x, b, n = self._input_embeddings(tokens, inputs_embeds)
        max_length = cache["k"][0].shape[-2]
        if not isinstance(start, jax.core.Tracer) and int(start) + n > max_length:
            raise ValueError(f"start: positions up to {int(start) + n - 1} exceed the cache max_length {max_length}")
        start = jnp.asarray(start, jnp.int32)
        positions = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (b, n))
        k_positions = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (b, max_length))
        with precision_scope(self.config.matmul_precision):
            cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta)
            mask = attention_weights_mask(positions, k_positions, causal=True)
            x, cache = self._run_cached(x, cos, sin, mask, cache, start)
        return self.logits(x), cache

    def _run_cached(self, x: Array, cos: Array, sin: Array, mask: Array, cache: Cache, start) -> tuple[Array, Cache]:
        """The blocks over `x [batch, n, hidden]`, each reading and writing its cache slice."""
        if self.config.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def block(x, per_layer):
                layer_state, k_cache, v_cache = per_layer
                x, (k, v) = nnx.merge(graphdef, layer_state)(x, cos, sin, mask=mask, kv=(k_cache, v_cache, start))
                return x, (k, v)

            x, (ks, vs) = jax.lax.scan(block, x, (stacked, cache["k"], cache["v"]))
            return x, {"k": ks, "v": vs}
        new_k, new_v = [], []
        for layer, k_cache, v_cache in zip(self.layers, cache["k"], cache["v"]):
            x, (k, v) = layer(x, cos, sin, mask=mask, kv=(k_cache, v_cache, start))
            new_k.append(k)
            new_v.append(v)
        return x, {"k": tuple(new_k), "v": tuple(new_v)}

    def prefill(self, tokens: Array | None, cache: Cache, *,
                inputs_embeds: Array | None = None) -> tuple[Array, Cache]:
        """Fill the cache with a prompt `tokens [batch, P]` at positions `0..P-1`.

        Returns `(logits [batch, P, output_size] float32, cache)`; equals `model(tokens)`
        (`model(tokens, inputs_embeds=inputs_embeds)` when `inputs_embeds [batch, P, hidden]` is given).
        """
        return self.extend(tokens, 0, cache, inputs_embeds=inputs_embeds)

    def decode_step(self, tokens: Array, position, cache: Cache) -> tuple[Array, Cache]:
        """One cached AR step: `tokens [batch]` at `position` (int scalar, may be traced).

        Returns `(logits [batch, output_size] float32, cache)`: the next-token logits
        `p(x^{position+1} | x^{<=position})`. Jittable inside `jax.lax.scan`.
        """
        logits, cache = self.extend(jnp.asarray(tokens)[:, None], position, cache)
        return logits[:, 0], cache


def check_tokens(tokens: Array, vocab_size: int, name: str) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, length], got {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: ids must lie in [0, {vocab_size}), found [{lo}, {hi}]")


@partial(jax.jit, static_argnums=(0, 3))
def _greedy_generate(graphdef, state, prompt: Array, num_tokens: int) -> Array:
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    cache = model.init_cache(b, p + num_tokens)
    logits, cache = model.prefill(prompt, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, position):
        token, cache = carry
        logits, cache = model.decode_step(token, position, cache)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (nxt, cache), token

    positions = jnp.arange(p, p + num_tokens, dtype=jnp.int32)
    _, tokens = jax.lax.scan(step, (first, cache), positions)   # [num_tokens, batch]
    return jnp.concatenate([prompt.astype(jnp.int32), tokens.T], axis=1)


def greedy_generate(model: Decoder, prompt: Array, num_tokens: int) -> Array:
    """Greedy (argmax) continuation of `prompt [batch, P]` by `num_tokens` tokens with the KV cache.

    One jitted program (prefill + `lax.scan` of `decode_step`). Returns `[batch, P + num_tokens]`
    int32: the prompt followed by the generated tokens. Raises ValueError for `num_tokens < 1`,
    an empty prompt, or a bidirectional model.
    """
    if not model.config.causal:
        raise ValueError("model: greedy_generate needs a causal model (config.causal=False)")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens: must be a positive int, got {num_tokens!r}")
    prompt = jnp.asarray(prompt)
    check_tokens(prompt, model.config.vocab_size, "prompt")
    if prompt.shape[1] < 1:
        raise ValueError("prompt: needs at least one token")
    graphdef, state = nnx.split(model)
    return _greedy_generate(graphdef, state, prompt, num_tokens)
