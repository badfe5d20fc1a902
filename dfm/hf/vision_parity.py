"""Parity of the CLIP tower, LLaVA and InternVL with transformers on tiny random models (torch CPU).

Rows for `python -m dfm.hf.parity` (see `dfm.hf.parity`). Tiny sizes: 32 px images, patch 8
(a 4 x 4 grid), width 32, 2 layers; LLaVA 16 image tokens, InternVL 4 (pixel shuffle 0.5).
Images are NCHW for transformers and NHWC for ours (`transpose(0, 2, 3, 1)`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dfm.hf.parity_tools import NUM_NEW_TOKENS, ParityResult, hf_greedy, hf_logits, randomize_

IMAGE, PATCH, VOCAB, IMAGE_TOKEN = 32, 8, 128, 7


def _text_config(family: str, *, tie: bool):
    import transformers

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    return cls(**kwargs)


def tiny_clip_vision(seed: int = 0):
    """A tiny random `CLIPVisionModel` (quick-GELU, pre_layrnorm)."""
    import torch
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                                           projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(config).eval()
    randomize_(model, seed)
    return model


def tiny_llava(seed: int = 0, *, vision_feature_layer: int = -2, strategy: str = "default",
               text: str = "llama", tie: bool = False):
    """A tiny random `LlavaForConditionalGeneration` (CLIP tower + Llama / Qwen2)."""
    import torch
    import transformers

    vision = tiny_clip_vision(seed).config
    config = transformers.LlavaConfig(vision_config=vision, text_config=_text_config(text, tie=tie),
                                      image_token_id=IMAGE_TOKEN, vision_feature_layer=vision_feature_layer,
                                      vision_feature_select_strategy=strategy, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def tiny_internvl(seed: int = 0, *, variant: str = "base"):
    """A tiny random `InternVLForConditionalGeneration` (InternViT + Qwen2, tied, pixel shuffle 0.5).

    variant "base": InternVL-2.5-1B-like options (LayerNorm, mean pooling, no q/k norm);
    "qk_norm": RMSNorm blocks, q/k norms, q/k/v bias, final layernorm (no mean pooling),
    vision_feature_layer -1 (reads the final layernorm).
    """
    import torch
    import transformers

    extra = dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=True, use_mean_pooling=False) \
        if variant == "qk_norm" else {}
    vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=IMAGE, patch_size=PATCH, **extra)
    config = transformers.InternVLConfig(vision_config=vision, text_config=_text_config("qwen2", tie=True),
                                         image_token_id=IMAGE_TOKEN, downsample_ratio=0.5,
                                         vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def images(n: int, seed: int = 0) -> np.ndarray:
    """`[n, 3, 32, 32]` float32 N(0, 1) pixel values (NCHW, transformers' layout)."""
    return np.random.default_rng(seed).normal(size=(n, 3, IMAGE, IMAGE)).astype(np.float32)


def prompt_with_images(num_image_tokens: int, seed: int = 0) -> np.ndarray:
    """`[2, L]` token ids: text, one image's placeholders, text (one image per row)."""
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(IMAGE_TOKEN + 1, VOCAB, (2, n))  # noqa: E731  (never the image id)
    return np.concatenate([text(3), np.full((2, num_image_tokens), IMAGE_TOKEN), text(4)], axis=1)


def clip_parity(directory: str | Path, seed: int = 0) -> ParityResult:
    """CLIP tower: max |last_hidden_state| and |pooler_output| difference, import and round trip."""
    import jax.numpy as jnp
    import torch
    import transformers

    from dfm.hf import load_pretrained, save_pretrained

    directory = Path(directory)
    hf = tiny_clip_vision(seed)
    hf.save_pretrained(directory / "hf")
    ours = load_pretrained(directory / "hf", matmul_precision="highest")   # full float32 on any backend
    pixels = images(2, seed)
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))

    def reference(model):
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(pixels))
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()

    mine = (np.asarray(ours(nhwc)), np.asarray(ours.pooled(nhwc)))
    ref = reference(hf)
    save_pretrained(ours, directory / "ours")
    back = reference(transformers.CLIPVisionModel.from_pretrained(directory / "ours").eval())
    diff = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(a, b))  # noqa: E731
    return ParityResult("clip vision (hidden states, pooled)", diff(mine, ref), diff(mine, back), None)


def multimodal_parity(name: str, hf, directory: str | Path, seed: int = 0, *, full: bool = True) -> ParityResult:
    """LLaVA / InternVL `hf` model: logits with one image per row; with `full`, also greedy 16
    tokens and the round trip (else those are reported as None / NaN)."""
    import jax.numpy as jnp
    import transformers

    from dfm.hf import load_pretrained, save_pretrained
    from dfm.models.multimodal import greedy_generate

    directory = Path(directory)
    hf.save_pretrained(directory / "hf")
    ours = load_pretrained(directory / "hf", matmul_precision="highest")   # full float32 on any backend
    tokens = prompt_with_images(ours.config.num_image_tokens, seed)
    pixels = images(2, seed)
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    ref = hf_logits(hf, tokens, pixel_values=pixels)
    logits = np.asarray(ours(jnp.asarray(tokens, jnp.int32), nhwc))
    if not full:
        return ParityResult(name, float(np.abs(logits - ref).max()), float("nan"), None)
    mine = np.asarray(greedy_generate(ours, jnp.asarray(tokens, jnp.int32), nhwc, NUM_NEW_TOKENS))
    greedy = bool(np.array_equal(mine, hf_greedy(hf, tokens, pixel_values=pixels)))
    save_pretrained(ours, directory / "ours")
    back = type(hf).from_pretrained(directory / "ours").eval()
    assert isinstance(back, transformers.PreTrainedModel)
    round_trip = hf_logits(back, tokens, pixel_values=pixels)
    return ParityResult(name, float(np.abs(logits - ref).max()), float(np.abs(logits - round_trip).max()), greedy)


def all_results(directory: str | Path) -> list[ParityResult]:
    """CLIP; LLaVA (Llama, layer -2, "default"; Qwen2 tied, layer -1, "full"); InternVL (Qwen2, tied;
    base and q/k-norm variants) rows."""
    directory = Path(directory)
    return [clip_parity(directory / "clip"),
            multimodal_parity("llava (clip + llama, layer -2, default)", tiny_llava(), directory / "llava"),
            multimodal_parity("llava (clip + qwen2 tied, layer -1, full)",
                              tiny_llava(1, vision_feature_layer=-1, strategy="full", text="qwen2", tie=True),
                              directory / "llava_full", seed=1),
            multimodal_parity("internvl (internvit + qwen2 tied)", tiny_internvl(), directory / "internvl"),
            multimodal_parity("internvl (rms_norm, qk_norm, final layernorm)", tiny_internvl(variant="qk_norm"),
                              directory / "internvl_qk")]
