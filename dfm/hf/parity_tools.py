"""The pieces of the logits-parity checks against transformers (needs torch CPU): tiny random
transformers models, their logits and greedy tokens, the result row, and the text families' check.
`dfm.hf.parity` (the command) and `dfm.hf.vision_parity` compose them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

TEXT_FAMILIES = ("llama", "qwen2")
NUM_NEW_TOKENS = 16


@dataclasses.dataclass
class ParityResult:
    """One row of the table."""

    architecture: str
    import_max_abs: float
    roundtrip_max_abs: float
    greedy_equal: bool | None
    note: str = ""


def randomize_(hf_model, seed: int, std: float = 0.2) -> None:
    """Overwrite every parameter of a torch model with N(0, std) (norm weights: 1 + N(0, std)), seeded.

    The default init (std 0.02, norms 1) gives near-flat logits on which argmax ties could flip;
    larger weights make the parity and the greedy comparison meaningful.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            is_norm = p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_((noise + (1.0 if is_norm else 0.0)).to(p.dtype))


def tiny_text_model(family: str, *, tie: bool = False, seed: int = 0, vocab: int = 128):
    """A tiny random `LlamaForCausalLM` / `Qwen2ForCausalLM` (hidden 32, 2 layers, GQA 4/2 heads)."""
    import torch
    import transformers

    kwargs = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        config = transformers.LlamaConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"family: expected one of {TEXT_FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize_(model, seed)
    return model


def hf_logits(hf_model, tokens: np.ndarray, **inputs) -> np.ndarray:
    """transformers' logits `[batch, length, vocab]` float32 of `tokens [batch, length]`."""
    import torch

    with torch.no_grad():
        extra = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        return hf_model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), **extra).logits.float().numpy()


def hf_greedy(hf_model, tokens: np.ndarray, num_tokens: int = NUM_NEW_TOKENS, **inputs) -> np.ndarray:
    """transformers' `generate(do_sample=False)`: `[batch, P + num_tokens]` (prompt + new tokens)."""
    import torch

    with torch.no_grad():
        extra = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        out = hf_model.generate(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), do_sample=False,
                                max_new_tokens=num_tokens, min_new_tokens=num_tokens, **extra)
    return out.numpy()


def text_parity(family: str, directory: str | Path, *, tie: bool = False, sharded: bool = False,
                seed: int = 0) -> ParityResult:
    """Import / round-trip / greedy parity of one text family in `directory` (see module doc)."""
    import jax.numpy as jnp
    import transformers

    from dfm.hf import load_pretrained, save_pretrained
    from dfm.models import greedy_generate

    directory = Path(directory)
    hf = tiny_text_model(family, tie=tie, seed=seed)
    hf.save_pretrained(directory / "hf", **({"max_shard_size": "20KB"} if sharded else {}))
    ours = load_pretrained(directory / "hf", matmul_precision="highest")   # full float32 on any backend
    tokens = np.random.default_rng(seed).integers(0, hf.config.vocab_size, (2, 9))
    ref = hf_logits(hf, tokens)
    logits = np.asarray(ours(jnp.asarray(tokens, jnp.int32)))
    greedy = bool(np.array_equal(np.asarray(greedy_generate(ours, jnp.asarray(tokens[:, :5], jnp.int32),
                                                            NUM_NEW_TOKENS)), hf_greedy(hf, tokens[:, :5])))
    save_pretrained(ours, directory / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(directory / "ours").eval()
    round_trip = hf_logits(back, tokens)
    name = family + (" (tied)" if tie else "") + (" (sharded)" if sharded else "")
    return ParityResult(name, float(np.abs(logits - ref).max()), float(np.abs(logits - round_trip).max()), greedy)
