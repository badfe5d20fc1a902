"""`dfm.models.flops`: parameter counts against the real NNX model, FLOPs per token against hand
arithmetic and against XLA's own count of the compiled forward pass."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.models import Decoder, DecoderConfig
from dfm.models.flops import decoder_params, experts_evaluated, flops_per_token, training_flops

TINY = DecoderConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


def _real_counts(config: DecoderConfig) -> tuple[int, int, int]:
    """(total, embedding, output) parameters of the abstractly built `Decoder(config)`."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    sizes = {".".join(map(str, path)): int(np.prod(var.shape))
             for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    embedding = sum(v for k, v in sizes.items() if k.startswith("embed_tokens"))
    output = sum(v for k, v in sizes.items() if k.startswith("lm_head"))
    return sum(sizes.values()), embedding, output


VARIANTS = [TINY,
            dataclasses.replace(TINY, tie_word_embeddings=True),
            dataclasses.replace(TINY, num_heads=4, num_kv_heads=2, attention_bias=True, num_layers=3),
            dataclasses.replace(TINY, head_dim=24, num_layers=2, scan_layers=True),
            DecoderConfig(vocab_size=1025, output_size=1024, hidden_size=96, intermediate_size=256, num_layers=2,
                          num_heads=4, causal=False)]


@pytest.mark.parametrize("config", VARIANTS, ids=["tiny", "tied", "gqa-bias", "head-dim-scan", "masked"])
def test_parameter_counts_match_the_real_model(config):
    total, embedding, output = _real_counts(config)
    p = decoder_params(config)
    assert (p.total, p.embedding, p.output) == (total, embedding, output)
    assert p.non_embedding == total - embedding - output


def test_tiny_config_by_hand():
    # vocab 512, h 32, I 64, 1 layer, 2 heads (head_dim 16), untied; context 32
    layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32             # q,k,v,o + gate,up,down + two norms = 10,304
    n = layer + 32                                          # + final norm = 10,336
    f = flops_per_token(TINY, 32)
    assert f.params.non_embedding == n == 10_336
    assert f.params.total == n + 2 * 512 * 32 == 43_104
    assert f.logits == 2 * 32 * 512
    assert f.attention == 2 * 2 * 1 * 32 * (2 * 16)        # scores + values, 1 layer, 32 keys, 2 heads x 16
    assert f.forward == 2 * 10_336 + 32_768 + 4_096 == 57_536
    assert f.training == 3 * 57_536
    assert training_flops(TINY, 1000, 32) == 1000 * 172_608


@pytest.mark.parametrize("config,context", [
    (DecoderConfig(vocab_size=1024, hidden_size=96, intermediate_size=256, num_layers=2, num_heads=4), 64),
    (DecoderConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                   tie_word_embeddings=True), 128),
    (DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                   num_kv_heads=2, attention_bias=True), 48)], ids=["sweep", "default", "gqa"])
def test_forward_flops_match_xla_cost_analysis(config, context):
    """XLA's flop count of the compiled forward (every dot, plus the elementwise work the formula
    leaves out) is within 5% above the formula's, and never below it."""
    model = nnx.eval_shape(lambda: Decoder(dataclasses.replace(config, attention="xla"), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    batch = 2
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    cost = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = cost["flops"] / (batch * context)
    ours = flops_per_token(config, context).forward
    assert ours <= xla <= 1.05 * ours, (ours, xla)


def test_experts_evaluated_per_system():
    k, top = 8, 2
    expected = {"dense": 1, "base": 1, "ensemble/centroid-top1": 1, "ensemble/oracle": 1,
                "ensemble/centroid-top2": 2, "ensemble/centroid-top3": 3, "ensemble/bayes": 8,
                "ensemble/learned": 8, "random-ensemble/bayes": 8, "random-ensemble/uniform": 8}
    assert {s: experts_evaluated(s, k, top) for s in expected} == expected
    assert experts_evaluated("ensemble/centroid-top4", 2, 4) == 2     # capped at the experts available
    with pytest.raises(ValueError):
        experts_evaluated("dense", 0, 1)
    with pytest.raises(ValueError, match="context"):
        flops_per_token(TINY, 0)


def test_image_flops_match_xla_cost_analysis():
    """The multimodal job's image side (vision tower up to the feature layer + projector) against
    XLA's count of the compiled `image_features`, and the parameter counts against the model's."""
    from dfm.models.flops import image_flops
    from dfm.models.multimodal import MultimodalModel
    from experiments.mllm import modeling
    from experiments.registry import load_job

    c = load_job("mllm-digits")[1]
    mc = modeling.model_config(c, c.data.vocab_size + 1, c.data.vocab_size)
    f = image_flops(mc)
    model = nnx.eval_shape(lambda: MultimodalModel(mc, rngs=nnx.Rngs(0)))
    sizes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        sizes[path[0]] = sizes.get(path[0], 0) + int(np.prod(var.shape))
    assert (f.tower_params, f.projector_params) == (sizes["vision_tower"], sizes["multi_modal_projector"])
    assert f.layers == mc.vision.num_layers - 1 and f.positions == mc.vision.num_patches + 1  # feature layer -2
    graphdef, state = nnx.split(model)
    pixels = jax.ShapeDtypeStruct((2, mc.vision.image_size, mc.vision.image_size, 3), jnp.float32)
    cost = jax.jit(lambda s, p: nnx.merge(graphdef, s).image_features(p)).lower(state, pixels).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert f.tower + f.projector <= cost["flops"] / 2 <= 1.08 * (f.tower + f.projector)
