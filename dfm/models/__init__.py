"""Neural models: the LLaMA / Qwen2-style decoder, a small sequence classifier, and the
vision-language model (CLIP / InternViT towers, LLaVA / InternVL projectors)."""
from dfm.models.classifier import SequenceClassifier
from dfm.models.config import DecoderConfig
from dfm.models.decoder import Decoder, greedy_generate
from dfm.models.internvit import InternVisionTower
from dfm.models.layout import stack_layers, unstack_layers
from dfm.models.multimodal import MultimodalConfig, MultimodalModel
from dfm.models.multimodal import greedy_generate as multimodal_greedy_generate
from dfm.models.projector import InternVLProjector, LlavaProjector, pixel_shuffle
from dfm.models.vision import CLIPVisionTower, VisionConfig

__all__ = [
    "DecoderConfig", "Decoder", "SequenceClassifier", "greedy_generate",
    "VisionConfig", "CLIPVisionTower", "InternVisionTower", "LlavaProjector", "InternVLProjector",
    "pixel_shuffle", "MultimodalConfig", "MultimodalModel", "multimodal_greedy_generate",
    "stack_layers", "unstack_layers",
]
