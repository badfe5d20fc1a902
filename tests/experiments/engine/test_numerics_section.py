"""The jobs' `[numerics]` section reaches the models and the train configs, and is validated."""
import pytest

from experiments.engine.config import ConfigError
from experiments.mllm import modeling as mllm_modeling
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.text import modeling as text_modeling
from experiments.text.config import ExperimentConfig

NUMERICS = {"dtype": "bfloat16", "param_dtype": "float32", "attention": "xla", "matmul_precision": "highest",
            "remat": "dots", "scan_layers": True, "microbatches": 2, "async_checkpoint": True}


def test_text_models_carry_the_numerics():
    config = ExperimentConfig.from_dict({"numerics": NUMERICS})
    decoder = text_modeling.decoder_config(config, 300)
    router = text_modeling.router_config(config, 300)
    for c in (decoder, router):
        assert (c.dtype, c.param_dtype, c.attention, c.matmul_precision, c.remat, c.scan_layers) == \
            ("bfloat16", "float32", "xla", "highest", "dots", True)
    default = text_modeling.decoder_config(ExperimentConfig.from_dict({}), 300)
    assert (default.dtype, default.attention, default.remat, default.scan_layers) == ("float32", "auto", "none", False)


def test_multimodal_models_carry_the_numerics():
    config = MultimodalExperimentConfig.from_dict({"numerics": NUMERICS})
    mc = mllm_modeling.model_config(config, 384, 383)
    assert (mc.text.dtype, mc.text.remat, mc.text.scan_layers) == ("bfloat16", "dots", True)
    assert (mc.vision.dtype, mc.vision.attention, mc.vision.matmul_precision) == ("bfloat16", "xla", "highest")


@pytest.mark.parametrize("raw, field", [
    ({"attention": "flash"}, "numerics.attention"),
    ({"remat": "some"}, "numerics.remat"),
    ({"microbatches": 0}, "numerics.microbatches"),
    ({"microbatches": 3}, "numerics.microbatches"),          # does not divide the stages' batch of 16 / 32
    ({"dtype": "float16"}, "numerics.dtype"),
])
def test_bad_numerics_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field):
        ExperimentConfig.from_dict({"numerics": raw})


def test_multimodal_text_section_takes_qwen2_options():
    """`[text] attention_bias / tie_word_embeddings / rope_theta` reach the decoder (Qwen2-style LMs)."""
    config = MultimodalExperimentConfig.from_dict(
        {"text": {"attention_bias": True, "tie_word_embeddings": True, "rope_theta": 1e6}})
    mc = mllm_modeling.model_config(config, 384, 383)
    assert (mc.text.attention_bias, mc.text.tie_word_embeddings, mc.text.rope_theta) == (True, True, 1e6)
    default = mllm_modeling.model_config(MultimodalExperimentConfig.from_dict({}), 384, 383)
    assert (default.text.attention_bias, default.text.tie_word_embeddings) == (False, False)
