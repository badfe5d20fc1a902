"""HF checkpoints: import / export of Llama, Qwen2, CLIP vision, LLaVA and InternVL, and expert directories.

- `load_pretrained(path, *, dtype=None, matmul_precision="highest", attention="auto", scan_layers=False)`:
  a local HF model directory -> our NNX model (no torch); full float32 matmuls by default, so the
  parity with transformers holds on GPU / TPU too (docs/accelerators.md).
- `save_pretrained(model, path)`: our model -> an HF directory that transformers loads.
- `SafetensorsCheckpoint`: lazy numpy reads of single-file or sharded safetensors checkpoints.
- `load_tokenizer`, `tokenizer_fingerprint`, image-placeholder expansion (`dfm.hf.tokenizers`).
- `save_decentralized` / `load_decentralized`: K expert directories + partition + router settings.
- `clip_image_embeddings`, `load_clip_image_encoder`: L2-normalised CLIP image embeddings
  (`CLIPModel.get_image_features`), the image features a partition can be built on (`dfm.hf.clip_features`).
- `python -m dfm.hf.parity`: the table of max |logits difference| against transformers.
See docs/checkpoints.md.
"""
from dfm.hf.clip_features import CLIPImageEncoder, clip_image_embeddings, load_clip_image_encoder
from dfm.hf.configs import SUPPORTED_MODEL_TYPES, UnsupportedModelError, read_config
from dfm.hf.experts import DecentralizedCheckpoint, load_decentralized, save_decentralized
from dfm.hf.export import save_pretrained
from dfm.hf.load import load_pretrained
from dfm.hf.weights import assign_weights
from dfm.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint
from dfm.hf.tokenizers import load_tokenizer, tokenizer_fingerprint

__all__ = [
    "CLIPImageEncoder", "CheckpointError", "DecentralizedCheckpoint", "SUPPORTED_MODEL_TYPES", "SafetensorsCheckpoint",
    "UnsupportedModelError", "assign_weights", "clip_image_embeddings", "load_clip_image_encoder",
    "load_decentralized", "load_pretrained", "load_tokenizer", "read_config", "save_decentralized",
    "save_pretrained", "tokenizer_fingerprint",
]
