"""The inference-FLOPs column of the text and multimodal reports: models run per system, FLOPs per
token against hand arithmetic (tiny) and against the real model's parameter count (multimodal)."""
import numpy as np
import pytest
from flax import nnx

from experiments.registry import load_job

TEXT_SYSTEMS = ["dense", "base", "ensemble/bayes", "ensemble/centroid-top1", "ensemble/centroid-top2",
                "ensemble/oracle", "random-ensemble/bayes"]


def test_text_report_flops_of_the_tiny_config():
    from experiments.text import report

    config = load_job("tiny")[1]               # vocab 512, h 32, I 64, 1 layer, 2 heads, tied, seq_len 32
    systems = [{"name": n} for n in TEXT_SYSTEMS]
    entry = report.flops_entry(config, 512, systems, 2, 2, {"dense_stage2": 4096})
    forward = 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32) + 2 * 32 * 512 + 4 * 1 * 32 * 2 * 16   # = 57,536
    models = {"dense": 1, "base": 1, "ensemble/bayes": 2, "ensemble/centroid-top1": 1, "ensemble/centroid-top2": 2,
              "ensemble/oracle": 1, "random-ensemble/bayes": 2}
    assert {s["name"]: s["experts_evaluated"] for s in systems} == models
    assert {s["name"]: s["inference_flops_per_token"] for s in systems} == {n: m * forward for n, m in models.items()}
    assert entry["per_model"]["params"]["total"] == 512 * 32 + 10_336
    assert entry["training_flops"] == {"dense_stage2": 4096 * 3 * forward}
    line = report.flops_text(systems[2])
    assert line == "0.115 (2)"
    md = "\n".join(report.flops_lines(entry))
    assert "26,720 parameters (10,336 non-embedding)" in md and "dense_stage2 7.070e+08" in md


def test_text_report_masked_learned_router_adds_its_trunk():
    from experiments.text import report
    from experiments.text.modeling import decoder_config, router_config

    config = load_job("tiny", "masked")[1]
    systems = [{"name": "dense"}, {"name": "ensemble/learned"}]
    report.flops_entry(config, 512, systems, 2, 0, {})
    dense = systems[0]["inference_flops_per_token"]
    rc = router_config(config, 512)                                   # bidirectional trunk, no vocab logits
    trunk = 2 * rc.num_layers * (4 * rc.hidden_size ** 2 + 3 * rc.hidden_size * rc.intermediate_size
                                 + 2 * rc.hidden_size) + 2 * rc.hidden_size \
        + 4 * rc.num_layers * config.data.seq_len * rc.num_heads * rc.head_size
    assert decoder_config(config, 512).vocab_size == 513 and systems[1]["experts_evaluated"] == 2
    assert systems[1]["inference_flops_per_token"] == 2 * dense + trunk


def test_mllm_report_flops_of_the_digits_config():
    from dfm.models.multimodal import MultimodalModel
    from experiments.mllm import modeling, report

    config = load_job("mllm-digits")[1]        # K = 3, top-2, stage 2 trains projector + LLM (tower frozen)
    vocab, image_id = config.data.vocab_size + 1, config.data.vocab_size
    names = ["stage1", "dense", "ensemble/centroid-top1", "ensemble/centroid-top2", "ensemble/oracle",
             "ensemble/bayes", "random-ensemble/bayes"]
    results = {"systems": [{"name": n} for n in names],
               "data": {"vocab_size": vocab, "image_token_id": image_id}, "skipped_experts": []}
    entry = report.flops_entry(config, results)
    mc = modeling.model_config(config, vocab, image_id)
    model = nnx.eval_shape(lambda: MultimodalModel(mc, rngs=nnx.Rngs(0)))
    sizes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = path[0] if path[0] != "language_model" or path[1] not in ("embed_tokens", "lm_head") else "embedding"
        sizes[key] = sizes.get(key, 0) + int(np.prod(var.shape))
    t = mc.text
    forward = (2 * sizes["language_model"] + 2 * t.hidden_size * t.vocab_size
               + 4 * t.num_layers * config.data.max_length * t.num_heads * t.head_size)
    models = {"stage1": 1, "dense": 1, "ensemble/centroid-top1": 1, "ensemble/centroid-top2": 2,
              "ensemble/oracle": 1, "ensemble/bayes": 3, "random-ensemble/bayes": 3}
    by = {s["name"]: s for s in results["systems"]}
    img = entry["per_image"]
    assert entry["shared_tower"] is True and img["projector"] == 2 * sizes["multi_modal_projector"] * 16
    for name, m in models.items():
        assert by[name]["experts_evaluated"] == m, name
        assert by[name]["inference_flops_per_token"] == m * forward, name
        assert by[name]["inference_flops_per_image"] == img["tower"] + m * img["projector"], name
    assert report.flops_text(by["ensemble/bayes"]) == f"{3 * forward / 1e6:.3g} (3); " \
                                                      f"{(img['tower'] + 3 * img['projector']) / 1e6:.3g}"
    with pytest.raises(KeyError):
        report.flops_entry(config, {"systems": [], "data": {}})
