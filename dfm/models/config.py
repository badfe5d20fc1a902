"""`DecoderConfig`: the hyper-parameters of the LLaMA / Qwen2-style decoder.

Field names follow the HF `LlamaConfig` / `Qwen2Config` meaning (shortened: `num_layers` is
`num_hidden_layers`, `num_heads` is `num_attention_heads`, `num_kv_heads` is
`num_key_value_heads`, `attention_bias` is Qwen2's always-on q/k/v bias), so that a later HF
import maps one config onto the other field by field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from dfm.models.numerics import ATTENTION_IMPLEMENTATIONS, MATMUL_PRECISIONS, REMAT_POLICIES, check_choice

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a causal (AR) or bidirectional (masked DFM denoiser) decoder.

    Attributes:
      vocab_size: number of token ids the embedding accepts (`[0, vocab_size)`). A masked DFM
        denoiser embeds the mask token `mask_id = vocab` too, so it uses `vocab + 1` here and
        may still predict `vocab` classes through `output_size`.
      hidden_size: model width (logical axis "embed").
      intermediate_size: SwiGLU width (logical axis "mlp").
      num_layers: number of decoder blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (GQA); must divide `num_heads`. Equal to `num_heads` = MHA.
      head_dim: per-head width; default `hidden_size // num_heads` (then `num_heads` must divide
        `hidden_size`).
      rope_theta: RoPE base frequency (HF `rope_theta`).
      rms_norm_eps: RMSNorm epsilon (HF `rms_norm_eps`).
      attention_bias: bias on q/k/v projections (True for Qwen2, False for LLaMA); o_proj never
        has one.
      tie_word_embeddings: output projection is the transposed input embedding (no `lm_head`).
      causal: True = autoregressive decoder; False = bidirectional attention (masked denoiser).
      output_size: number of logits; default `vocab_size`. Must be <= `vocab_size` when tied.
      dtype: computation dtype name ("float32", "bfloat16", ...). Logits are always float32.
      param_dtype: parameter storage dtype name.
      initializer_range: std of the normal initializer (HF `initializer_range`).
      attention: "auto" | "xla" | "cudnn": the `jax.nn.dot_product_attention` implementation
        (`dfm.models.attention`; "auto" = cuDNN flash attention on a GPU in bf16 / fp16).
      matmul_precision: "default" | "high" | "highest": matmul precision of the forward pass
        (`dfm.models.numerics`; "highest" = full float32 on GPU / TPU, for HF parity).
      remat: "none" | "full" | "dots": activation rematerialisation of each block in the
        backward pass (`jax.checkpoint`; "dots" keeps the matmul outputs).
      scan_layers: True = the blocks' parameters are stacked on a leading "layers" axis and run
        with `nnx.scan` (compile time independent of depth); `dfm.models.stack_layers` /
        `unstack_layers` convert a model between the two layouts (HF import / export use the
        per-layer one).

    Mixed precision (the usual policy for accelerators): `dtype="bfloat16"`, `param_dtype="float32"`
    computes in bfloat16 with float32 master weights; norms' statistics, RoPE, attention scores
    and softmax, the logits and the loss stay float32, and the optimizer moments follow the
    float32 parameters (`dfm.train.make_optimizer`).

    Raises:
      ValueError: naming the field, when a size is not positive, a divisibility requirement fails,
        or a dtype name is unknown.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    causal: bool = True
    output_size: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    attention: str = "auto"
    matmul_precision: str = "default"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        for name in ("num_kv_heads", "head_dim", "output_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: must be a positive int or None, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads: must divide hidden_size when head_dim is not given, "
                f"got num_heads={self.num_heads}, hidden_size={self.hidden_size}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads, got num_kv_heads={self.kv_heads}, "
                f"num_heads={self.num_heads}"
            )
        if self.head_size % 2:
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_size}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range: must be > 0, got {self.initializer_range!r}")
        if self.tie_word_embeddings and self.num_outputs > self.vocab_size:
            raise ValueError(
                f"output_size: must be <= vocab_size with tied embeddings, "
                f"got {self.num_outputs} > {self.vocab_size}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _FLOAT_DTYPES:
                raise ValueError(f"{name}: must be one of {_FLOAT_DTYPES}, got {getattr(self, name)!r}")

        check_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        check_choice("remat", self.remat, REMAT_POLICIES)
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers: must be a bool, got {self.scan_layers!r}")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (`num_kv_heads`, default `num_heads`)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head width (`head_dim`, default `hidden_size // num_heads`)."""
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def num_outputs(self) -> int:
        """Number of logits per position (`output_size`, default `vocab_size`)."""
        return self.vocab_size if self.output_size is None else self.output_size

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a numpy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        """`param_dtype` as a numpy dtype."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "DecoderConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)
