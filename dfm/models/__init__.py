"""Neural models: the LLaMA / Qwen2-style decoder and a small sequence classifier."""
from dfm.models.classifier import SequenceClassifier
from dfm.models.config import DecoderConfig
from dfm.models.decoder import Decoder, greedy_generate

__all__ = ["DecoderConfig", "Decoder", "SequenceClassifier", "greedy_generate"]
