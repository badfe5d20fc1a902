"""Start the multimodal job from a local Hugging Face LLaVA or InternVL checkpoint (``init_from``).

- Architecture: the checkpoint's ``config.json`` (`dfm.hf.vision_configs.multimodal_config_from_hf`:
  `LlavaConfig` = CLIP + Llama / Qwen2, `InternVLConfig` = InternViT + Qwen2 / Llama), with the run's
  ``[numerics]`` (dtype, parameter dtype, attention kernel, matmul precision, remat, scanned layers);
  the config's [vision], [text], [projector], ``data.image_size`` and ``data.vocab_size`` are ignored
  (`ignored_settings` names the ones that differ, for the log).
- Weights: `dfm.hf.load_pretrained` (safetensors, no torch), moved into a model built with those
  numerics (`new_model`).
- Tokenizer: the checkpoint's (`dfm.hf.load_tokenizer`), with its chat template (the tokenizer's,
  else the processor's ``chat_template.json``, else `dfm.prompts.default_template`), a
  PAD token (EOS when it has none; padding is never a target) and the image token the model's
  ``image_token_id`` names (``<image>`` for LLaVA, ``<IMG_CONTEXT>`` for InternVL). The token
  layout is `dfm.prompts`' (the processor's).
- Images: resized to the checkpoint's ``vision_config.image_size`` and normalised with CLIP's mean /
  std (`experiments.mllm.modeling.pixels`; LLaVA's `CLIPImageProcessor`. InternVL's processor uses
  ImageNet's statistics: fine-tuning adapts, the job keeps one normalisation for both towers).

Every problem with the directory is a `ConfigError` naming ``init_from``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dfm import prompts
from dfm.hf import load_pretrained
from dfm.hf import load_tokenizer as hf_tokenizer
from dfm.hf.configs import read_config
from dfm.hf.safetensors_io import CheckpointError
from dfm.hf.vision_configs import multimodal_config_from_hf
from dfm.models import stack_layers
from dfm.models.multimodal import MultimodalModel
from experiments.engine.config import ConfigError

KINDS = ("llava", "internvl")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """A pretrained LLaVA / InternVL directory as the job uses it.

    Attributes:
      path: the directory.
      kind: "llava" or "internvl" (the config's ``model_type``).
      hf_config: its ``config.json``.
    """

    path: Path
    kind: str
    hf_config: dict

    def model_config(self, numerics=None):
        """`dfm.models.multimodal.MultimodalConfig` of the checkpoint with `numerics` (a
        `NumericsSection`; None: float32, the library's defaults) applied."""
        knobs = {} if numerics is None else {"dtype": numerics.dtype, "param_dtype": numerics.param_dtype,
                                              "attention": numerics.attention,
                                              "matmul_precision": numerics.matmul_precision}
        try:
            mc = multimodal_config_from_hf(self.hf_config, self.path / "config.json", **knobs)
        except (CheckpointError, ValueError) as e:
            raise ConfigError(f"init_from: {e}") from None
        if numerics is not None:
            mc = mc.replace(text=mc.text.replace(remat=numerics.remat, scan_layers=numerics.scan_layers))
        return mc

    @property
    def image_size(self) -> int:
        """Side in pixels of the tower's images."""
        return self.model_config().vision.image_size

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image in the text (HF ``image_seq_length``)."""
        return self.model_config().num_image_tokens


def read_checkpoint(path: str) -> Checkpoint:
    """The `Checkpoint` at `path` (``init_from``).

    Raises:
      ConfigError: naming ``init_from``: not a directory, no readable ``config.json``, or a
        ``model_type`` other than "llava" / "internvl".
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"init_from: {path!r} is not a directory (a local Hugging Face LLaVA / InternVL "
                          "checkpoint: config.json, safetensors weights, tokenizer)")
    try:
        hf_config, file = read_config(directory)
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
    kind = hf_config.get("model_type")
    if kind not in KINDS:
        raise ConfigError(f"init_from: {file} has model_type {kind!r}; the multimodal job starts from a LLaVA "
                          f"(LlavaForConditionalGeneration) or InternVL checkpoint ({', '.join(KINDS)})")
    return Checkpoint(directory, kind, hf_config)


def ignored_settings(config) -> list[str]:
    """``"section.key: config value -> checkpoint value"`` for every architecture setting of
    `config` that the checkpoint of ``config.init_from`` overrides with another value."""
    mc = read_checkpoint(config.init_from).model_config()
    v, t = mc.vision, mc.text
    pairs = {"data.image_size": (config.data.image_size, v.image_size),
             "vision.arch": (config.vision.arch, v.arch), "vision.patch_size": (config.vision.patch_size, v.patch_size),
             "vision.hidden_size": (config.vision.hidden_size, v.hidden_size),
             "vision.intermediate_size": (config.vision.intermediate_size, v.intermediate_size),
             "vision.num_layers": (config.vision.num_layers, v.num_layers),
             "vision.num_heads": (config.vision.num_heads, v.num_heads),
             "text.hidden_size": (config.text.hidden_size, t.hidden_size),
             "text.intermediate_size": (config.text.intermediate_size, t.intermediate_size),
             "text.num_layers": (config.text.num_layers, t.num_layers),
             "text.num_heads": (config.text.num_heads, t.num_heads),
             "text.num_kv_heads": (config.text.num_kv_heads or config.text.num_heads, t.num_kv_heads or t.num_heads),
             "text.attention_bias": (config.text.attention_bias, t.attention_bias),
             "text.tie_word_embeddings": (config.text.tie_word_embeddings, t.tie_word_embeddings),
             "text.rope_theta": (config.text.rope_theta, t.rope_theta),
             "projector.kind": (config.projector.kind, mc.projector),
             "projector.downsample_ratio": (config.projector.downsample_ratio, mc.downsample_ratio),
             "projector.vision_feature_layer": (config.projector.vision_feature_layer, mc.vision_feature_layer),
             "data.vocab_size": (config.data.vocab_size, t.vocab_size)}
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in pairs.items() if a != b]


def _traced() -> bool:
    """True while traced for shapes only (`nnx.eval_shape`, as `dfm.train.load_model` calls a model
    factory): every new array is then a tracer."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def new_model(ckpt: Checkpoint, mconfig, seed: int):
    """The `MultimodalModel(mconfig)` holding the checkpoint's weights.

    `mconfig` is `ckpt.model_config(numerics)`. Traced for shapes only (the engine's
    `load_stage_model` builds its restore target so), the weights are not read: a seeded random
    init of the same structure is returned, which the caller only uses for its shapes.

    Raises:
      ConfigError: naming ``init_from``: missing or mis-shaped tensors (`dfm.hf.load_pretrained`).
    """
    if _traced():
        return MultimodalModel(mconfig, rngs=nnx.Rngs(seed))
    t = mconfig.text
    try:
        loaded = load_pretrained(ckpt.path, dtype=t.dtype, param_dtype=t.param_dtype,
                                 matmul_precision=t.matmul_precision, attention=t.attention)
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MultimodalModel(mconfig, rngs=nnx.Rngs(seed))))
    pure = nnx.to_pure_dict(nnx.state(loaded))
    if t.scan_layers:
        pure["language_model"] = nnx.to_pure_dict(nnx.state(stack_layers(loaded.language_model)))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _template_file(path: Path) -> str | None:
    """The processor's chat template in ``chat_template.json`` (``{"chat_template": ...}``) or
    ``chat_template.jinja``, when the tokenizer did not load one."""
    jinja, js = path / "chat_template.jinja", path / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if js.is_file():
        try:
            value = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ConfigError(f"init_from: {js}: not a JSON object with 'chat_template' ({e})") from None
        return value if isinstance(value, str) and value else None
    return None


def load_tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer, ready for the job (module doc: chat template, PAD, image token).

    Raises:
      ConfigError: naming ``init_from``: no tokenizer, no EOS token, an image token whose id is not
        the config's ``image_token_id``, or more token ids than the model's vocabulary.
    """
    try:
        tok = hf_tokenizer(ckpt.path)
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
    if not prompts.is_templated(tok):
        tok.chat_template = _template_file(ckpt.path) or prompts.default_template(ckpt.kind)
    if tok.eos_token is None:
        raise ConfigError(f"init_from: the tokenizer of {ckpt.path} has no eos_token (answers end with it)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    mc = ckpt.model_config()
    if ckpt.kind == "internvl" and not prompts.is_internvl(tok):
        raise ConfigError(f"init_from: the tokenizer of {ckpt.path} names no context_image_token "
                          "(InternVL's <IMG_CONTEXT>, with start_image_token / end_image_token)")
    try:
        tid = prompts.image_token_id(tok)
    except ValueError as e:
        raise ConfigError(f"init_from: {ckpt.path}: {e}") from None
    if tid != mc.image_token_id:
        raise ConfigError(f"init_from: the tokenizer's {prompts.image_token(tok)!r} has id {tid}, but config.json's "
                          f"image_token_id is {mc.image_token_id}")
    if len(tok) > mc.text.vocab_size:
        raise ConfigError(f"init_from: the tokenizer has {len(tok)} tokens > the model's vocab_size "
                          f"{mc.text.vocab_size}")
    return tok


class RunTokenizer:
    """What the data stage saves as ``<run>/tokenizer``: the checkpoint's tokenizer (`load_tokenizer`)
    plus its processor's config files, so the exported HF directories load with `AutoProcessor` too."""

    def __init__(self, ckpt: Checkpoint):
        self.tokenizer = load_tokenizer(ckpt)
        self.path = ckpt.path

    def save_pretrained(self, directory: str) -> None:
        """``tokenizer.save_pretrained(directory)`` and a copy of `PROCESSOR_FILES` found beside it."""
        self.tokenizer.save_pretrained(directory)
        for name in PROCESSOR_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, Path(directory) / name)
