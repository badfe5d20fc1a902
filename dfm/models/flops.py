"""Parameter and FLOP counts of the decoder, from its `DecoderConfig` (no model is built).

Convention (what is counted). One multiply-accumulate is 2 FLOPs. The forward pass of one token
costs

    F = 2 * N + 2 * h * V_out + 4 * n_layers * ctx * d_attn        FLOPs per token

where ``N`` is the non-embedding parameter count (every parameter of the decoder blocks and the
final norm: q/k/v/o projections and their biases, the SwiGLU gate/up/down projections, the
RMSNorm scales; the token embedding and the output projection are not in ``N``), ``2 h V_out``
is the output (logit) projection ``[hidden] -> [output_size]``, counted whether or not its
weights are tied to the embedding (the matmul runs either way; at this project's vocabulary and
widths it is a large share of the total: 57% of the `tiny` model's forward), and the last term is
attention: the query-key scores and the weighted sum of the values, ``2 * ctx * d_attn`` FLOPs
each per token and layer, ``d_attn = num_heads * head_dim``, over ``ctx`` keys (the full
sequence, as the dense attention kernel computes it: a causal mask does not skip the masked
half). The embedding lookup is a gather (0 FLOPs). Not counted: norms' and RoPE's arithmetic
beyond their parameters' 2 FLOPs, the SwiGLU / softmax nonlinearities, biases beyond their 2
FLOPs per parameter (each well under 1% of F at these sizes; the test compares F with XLA's
own count of the compiled forward).

Training costs ``3 F`` per token (forward + a backward of twice the forward): the ``6 N``
of Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Sec. 2.1 and Table 1:
C_forward ~ 2N + 2 n_layer n_ctx d_attn, C ~ 6N per training token) and Hoffmann et al. 2022
(Chinchilla, App. F, which also counts the logits and both attention products as here).
Inference costs ``F`` per token and per model evaluated: a router-weighted mixture that
evaluates ``m`` experts costs ``m F`` (`experts_evaluated`).

Tokens per parameter (Chinchilla's ~20 compute-optimal) divide training tokens by the TOTAL
parameter count (`DecoderParams.total`, embeddings included, as Hoffmann et al. count them);
`DecoderParams.non_embedding` is Kaplan's N.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dfm.models.config import DecoderConfig

SOURCE = ("Kaplan et al. 2020, Scaling Laws for Neural Language Models, Table 1 (2N + attention per "
          "forward token, 6N per training token); Hoffmann et al. 2022 (Chinchilla), App. F (logits and "
          "both attention products counted)")
COUNTED = ("inference FLOPs per token = models evaluated x (2 x non-embedding parameters + 2 x hidden x "
           "output_size for the logits (counted even when tied) + 4 x layers x context x heads x head_dim for "
           "attention scores and values over the full context); training = 3 x forward per token (6N); "
           "router cost not counted (centroid routers: one tf-idf/SVD projection and K cosines per document; "
           "the Bayes filter: O(K) per token)")


@dataclass(frozen=True)
class DecoderParams:
    """Parameter counts of a `dfm.models.Decoder` (numbers of scalars).

    Attributes:
      embedding: the token embedding table, ``vocab_size * hidden_size``.
      output: the separate output projection (``hidden_size * output_size``; 0 when tied).
      non_embedding: Kaplan's N: decoder blocks (attention projections with their biases, SwiGLU,
        both RMSNorm scales) and the final norm.
      total: embedding + output + non_embedding (what the model stores).
    """

    embedding: int
    output: int
    non_embedding: int
    total: int


@dataclass(frozen=True)
class DecoderFlops:
    """FLOPs per token of a decoder (see the module docstring for what is counted).

    Attributes:
      context: keys each query attends to in the attention term (tokens).
      params: the `DecoderParams`.
      non_embedding: ``2 * params.non_embedding``.
      logits: ``2 * hidden_size * output_size``.
      attention: ``4 * num_layers * context * num_heads * head_dim``.
      forward: their sum: FLOPs per token of one forward pass (inference, one model).
      training: ``3 * forward``: FLOPs per training token (forward and backward).
    """

    context: int
    params: DecoderParams
    non_embedding: int
    logits: int
    attention: int
    forward: int
    training: int

    def to_dict(self) -> dict:
        """Plain JSON-able dict (``params`` nested)."""
        return asdict(self)


def decoder_params(config: DecoderConfig) -> DecoderParams:
    """Parameter counts of `dfm.models.Decoder(config)` by arithmetic on the config.

    Per layer: q ``h x heads*d``, k and v ``h x kv_heads*d`` (plus biases of those widths when
    `attention_bias`), o ``heads*d x h``, SwiGLU gate and up ``h x I``, down ``I x h``, two
    RMSNorm scales ``h``; then the final norm ``h``, the embedding ``vocab x h`` and, untied, the
    output projection ``h x output_size``.
    """
    h, d, i = config.hidden_size, config.head_size, config.intermediate_size
    q, kv = config.num_heads * d, config.kv_heads * d
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if config.attention_bias else 0)
    layer = attention + 3 * h * i + 2 * h
    non_embedding = config.num_layers * layer + h
    embedding = config.vocab_size * h
    output = 0 if config.tie_word_embeddings else h * config.num_outputs
    return DecoderParams(embedding=embedding, output=output, non_embedding=non_embedding,
                         total=embedding + output + non_embedding)


def flops_per_token(config: DecoderConfig, context: int) -> DecoderFlops:
    """Forward (inference) and training FLOPs per token of one `dfm.models.Decoder(config)`.

    Args:
      config: the decoder's `DecoderConfig`.
      context: tokens each query attends to (the sequence length the model is run on, e.g.
        ``data.seq_len`` in the text job).

    Returns:
      `DecoderFlops` (FLOPs per token; what is counted: the module docstring; source: `SOURCE`).

    Raises:
      ValueError: `context` is not a positive int.
    """
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ValueError(f"context: must be a positive int, got {context!r}")
    params = decoder_params(config)
    non_embedding = 2 * params.non_embedding
    logits = 2 * config.hidden_size * config.num_outputs
    attention = 4 * config.num_layers * context * config.num_heads * config.head_size
    forward = non_embedding + logits + attention
    return DecoderFlops(context=context, params=params, non_embedding=non_embedding, logits=logits,
                        attention=attention, forward=forward, training=3 * forward)


def training_flops(config: DecoderConfig, tokens: int, context: int) -> int:
    """FLOPs of training on `tokens` tokens: ``tokens * 3 * forward`` (the 6N convention plus the
    logits and attention terms; `flops_per_token`). Raises ValueError for negative `tokens`."""
    if tokens < 0:
        raise ValueError(f"tokens: must be >= 0, got {tokens!r}")
    return int(tokens) * flops_per_token(config, context).training


def experts_evaluated(system: str, num_experts: int, top_k: int) -> int:
    """Models a system evaluates per token at inference, from its report name.

    ``dense``, ``base``: 1. ``ensemble/centroid-top1`` and ``ensemble/oracle``: 1 (one-hot
    weights: only the chosen expert runs). ``ensemble/centroid-top<k>``: ``min(k, num_experts)``
    (the router's weights vanish outside its top k). Every other ensemble (``ensemble/bayes``: the
    Bayes filter updates every expert's posterior from its likelihood of each token; the learned
    router and ``random-ensemble/*``: dense weights): `num_experts`.

    Args:
      system: the report's system name.
      num_experts: experts available to the ensemble (K, less any skipped).
      top_k: the top-k router's k (``eval.top_k``), used when the name has no k.

    Raises:
      ValueError: `num_experts` or `top_k` < 1.
    """
    if num_experts < 1 or top_k < 1:
        raise ValueError(f"num_experts and top_k must be >= 1, got {num_experts}, {top_k}")
    if system in ("dense", "base") or not system.startswith(("ensemble/", "random-ensemble/")):
        return 1
    router = system.split("/", 1)[1]
    if router in ("oracle", "centroid-top1"):
        return 1
    if router.startswith("centroid-top"):
        suffix = router[len("centroid-top"):]
        return min(int(suffix) if suffix.isdigit() else top_k, num_experts)
    return num_experts


#: position / class-token parameters of the vision towers: added, not multiplied (0 FLOPs)
_ADDED_PARAMS = ("position_embedding", "position_embeddings", "class_embedding", "cls_token")


@dataclass(frozen=True)
class ImageFlops:
    """Image-side FLOPs of a `dfm.models.MultimodalModel` (per image; see `image_flops`).

    Attributes:
      tower_params, projector_params: parameters of the vision tower and of the projector.
      positions: tower sequence length, ``num_patches + 1`` (the class token).
      layers: tower layers the image features go through (up to `vision_feature_layer`; the
        layers after it do not run under `jax.jit`: dead code).
      tower: ``2 * (tower parameters used - position / class parameters) * positions + 4 * layers *
        positions**2 * hidden``: every tower position through every weight it meets (the patch
        convolution is counted at the class position too: an overcount of ``1 / positions`` of
        it) and the attention scores and values over all positions.
      projector: ``2 * projector_params * num_image_tokens``.
    """

    tower_params: int
    projector_params: int
    positions: int
    layers: int
    tower: int
    projector: int

    def to_dict(self) -> dict:
        return asdict(self)


def image_flops(config) -> ImageFlops:
    """FLOPs per image of the vision tower and of the projector of `MultimodalModel(config)` (a
    `dfm.models.MultimodalConfig`), convention of the module docstring; the parameters are counted
    on the abstractly built model (`flax.nnx.eval_shape`: nothing is allocated), so every tower
    architecture (CLIP, InternViT) is covered."""
    import numpy as np
    from flax import nnx

    from dfm.models.multimodal import MultimodalModel

    v = config.vision
    lf = config.vision_feature_layer
    used = v.num_layers if (config.projector == "internvl" and lf == -1) else (v.num_layers + 1 + lf if lf < 0 else lf)
    model = nnx.eval_shape(lambda: MultimodalModel(config, rngs=nnx.Rngs(0)))
    tower = projector = multiplied = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(var.shape))
        if path[0] == "vision_tower":
            tower += n
            unused = len(path) > 3 and path[1] == "encoder" and isinstance(path[3], int) and path[3] >= used
            multiplied += 0 if unused or any(str(p) in _ADDED_PARAMS for p in path) else n
        elif path[0] == "multi_modal_projector":
            projector += n
    positions = v.num_patches + 1
    return ImageFlops(tower_params=tower, projector_params=projector, positions=positions, layers=used,
                      tower=2 * multiplied * positions + 4 * used * positions ** 2 * v.hidden_size,
                      projector=2 * projector * config.num_image_tokens)
