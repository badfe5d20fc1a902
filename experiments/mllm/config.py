"""Configuration of the multimodal job (`task = "mllm"` configs): TOML -> frozen, validated dataclasses.

A multimodal config (e.g. ``experiments/configs/mllm-digits.toml``) has the top-level keys
``task = "mllm"`` (what routes ``dfm run --config NAME`` here), ``name`` and ``seed``, and the
sections below. As in `experiments.config`, every key is optional, an unknown key or section is a
`ConfigError` naming it, and a bad value is a `ConfigError` naming the field
(``"stage1.steps: must be >= 1, got 0"``).

Sections:
  [data]       where the LLaVA-format records come from (`DataConfig`)
  [vision]     the ViT tower (`VisionSection`, mapped onto `dfm.models.vision.VisionConfig`)
  [text]       the LLaMA-style language model (`TextSection`, onto `dfm.models.DecoderConfig`)
  [projector]  LLaVA MLP or InternVL pixel-shuffle projector (`ProjectorSection`)
  [partition]  spherical balanced k-means on the frozen image features (`PartitionSection`)
  [stage1]     alignment on all data (`StageSection`)
  [stage2]     instruction tuning of the dense model and the experts, compute-matched (`StageSection`)
  [eval]       routing, generation and the report (`EvalSection`)
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from experiments.config import ConfigError, StageConfig, _f, _toml_value, _validate

TASK = "mllm"
SOURCES = ("default", "llava", "internvl")
TRAINABLE = ("all", "projector", "projector+tower", "projector+llm")


@dataclass(frozen=True)
class DataConfig:
    """Records and images.

    Attributes:
      source: "default" builds the digits / shapes / photos dataset of `experiments.mllm.dataset`
        (from images shipped by scikit-learn and scikit-image) and writes it in the LLaVA format;
        "llava" reads LLaVA JSON / JSONL files; "internvl" reads InternVL ``meta.json`` files.
      train, val, test: paths of the record files for "llava" / "internvl" (ignored for "default").
        Relative paths are relative to the working directory.
      image_root: directory the records' image paths are relative to ("llava" only).
      image_size: images are resized to `image_size` x `image_size` pixels (RGB).
      max_digits: use at most this many of the 1797 digits (0 = all) ("default" only).
      num_shapes, num_photos: images drawn with `skimage.draw.random_shapes` / derived from
        `skimage.data` photos ("default" only).
      vocab_size: byte-level BPE vocabulary trained on the train texts (special tokens included;
        the `<image>` token is added on top).
      max_length: tokens per training sequence, image tokens included; longer conversations are
        cut at a turn boundary (a record whose first turn does not fit is an error naming it).
      max_test: evaluate at most this many test questions (0 = all), taken in turn from each
        question type.
    """

    source: str = _f("default", choices=SOURCES)
    train: str = ""
    val: str = ""
    test: str = ""
    image_root: str = ""
    image_size: int = _f(32, lo=8, hi=1024)
    max_digits: int = _f(0, lo=0)
    num_shapes: int = _f(400, lo=0)
    num_photos: int = _f(200, lo=0)
    vocab_size: int = _f(384, lo=262, hi=65536)
    max_length: int = _f(64, lo=8, hi=8192)
    max_test: int = _f(0, lo=0)


@dataclass(frozen=True)
class VisionSection:
    """CLIP-style ViT (or InternViT) tower; see `dfm.models.vision.VisionConfig`."""

    arch: str = _f("clip", choices=("clip", "internvit"))
    patch_size: int = _f(8, lo=1)
    hidden_size: int = _f(64, lo=2)
    intermediate_size: int = _f(128, lo=1)
    num_layers: int = _f(3, lo=2)
    num_heads: int = _f(4, lo=1)


@dataclass(frozen=True)
class TextSection:
    """LLaMA-style causal language model; see `dfm.models.DecoderConfig`."""

    hidden_size: int = _f(128, lo=2)
    intermediate_size: int = _f(256, lo=1)
    num_layers: int = _f(2, lo=1)
    num_heads: int = _f(4, lo=1)
    num_kv_heads: int = _f(0, lo=0)


@dataclass(frozen=True)
class ProjectorSection:
    """Vision -> text projector.

    Attributes:
      kind: "llava" (2-layer MLP, features of every patch) or "internvl" (pixel shuffle by
        `downsample_ratio`, then LayerNorm + 2-layer MLP).
      downsample_ratio: InternVL's pixel-shuffle ratio (0.5 = 4x fewer image tokens); 1.0 for LLaVA.
      vision_feature_layer: hidden state of the tower used (LLaVA: -2, the second-to-last layer).
    """

    kind: str = _f("llava", choices=("llava", "internvl"))
    downsample_ratio: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    vision_feature_layer: int = -2


@dataclass(frozen=True)
class PartitionSection:
    """K experts from spherical balanced k-means on pooled image features of the stage-1 tower.

    Attributes:
      num_clusters: K.
      random_control: also train K experts on a random partition of the same cluster sizes.
      seed: seed of k-means++ and of the random partition.
    """

    num_clusters: int = _f(3, lo=1)
    random_control: bool = True
    seed: int = _f(0, lo=0)


@dataclass(frozen=True)
class StageSection(StageConfig):
    """One training stage: `experiments.config.StageConfig` (steps, batch size, AdamW, checkpoints)
    plus which parameters it updates.

    Attributes:
      train: "all", "projector" (LLaVA stage 1 with pretrained parts), "projector+tower", or
        "projector+llm" (LLaVA stage 2: the tower stays frozen). The multimodal job trains from
        scratch, so its stage 1 uses "all"; stage 2 must keep the tower frozen ("projector+llm")
        so the routing features are the same for every expert.
    """

    train: str = _f("all", choices=TRAINABLE)


@dataclass(frozen=True)
class EvalSection:
    """Evaluation.

    Attributes:
      top_k: experts kept by the top-k centroid router (its temperature is fitted on val).
      max_new_tokens: greedy decoding length of an answer.
      batch_size: sequences per forward pass.
      grid_examples: test images in the PNG example grid of the report.
    """

    top_k: int = _f(2, lo=1)
    max_new_tokens: int = _f(6, lo=1)
    batch_size: int = _f(64, lo=1)
    grid_examples: int = _f(12, lo=0)


_SECTIONS = {
    "data": DataConfig, "vision": VisionSection, "text": TextSection, "projector": ProjectorSection,
    "partition": PartitionSection, "stage1": StageSection, "stage2": StageSection, "eval": EvalSection,
}


@dataclass(frozen=True)
class MultimodalExperimentConfig:
    """The whole multimodal job (one run directory)."""

    name: str = "mllm-digits"
    task: str = _f(TASK, choices=(TASK,))
    seed: int = _f(0, lo=0)
    data: DataConfig = DataConfig()
    vision: VisionSection = VisionSection()
    text: TextSection = TextSection()
    projector: ProjectorSection = ProjectorSection()
    partition: PartitionSection = PartitionSection()
    stage1: StageSection = StageSection()
    stage2: StageSection = StageSection(train="projector+llm")
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        _validate(self, "")
        for section, cls in _SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise ConfigError(f"{section}: expected a [{section}] table")
            _validate(getattr(self, section), section)
        if self.data.source != "default" and not (self.data.train and self.data.val and self.data.test):
            raise ConfigError(f"data.val: source {self.data.source!r} needs data.train, data.val and data.test "
                              "paths (val fits the router temperature; it must not be the test set)")
        p, v = self.projector, self.vision
        if (p.kind, v.arch) not in (("llava", "clip"), ("internvl", "internvit")):
            raise ConfigError(f"projector.kind: {p.kind!r} goes with vision.arch "
                              f"{'clip' if p.kind == 'llava' else 'internvit'!r} (the HF classes pair them), "
                              f"got vision.arch={v.arch!r}")
        side = self.data.image_size // v.patch_size if self.data.image_size % v.patch_size == 0 else 0
        if p.kind == "llava" and p.downsample_ratio != 1.0:
            raise ConfigError(f"projector.downsample_ratio: LLaVA does not pixel-shuffle; must be 1.0, "
                              f"got {p.downsample_ratio}")
        if p.kind == "internvl" and side and (abs(1 / p.downsample_ratio - round(1 / p.downsample_ratio)) > 1e-9
                                              or side % round(1 / p.downsample_ratio)):
            raise ConfigError(f"projector.downsample_ratio: 1/ratio must be an integer dividing the patch grid "
                              f"side {side}, got {p.downsample_ratio}")
        if not -(v.num_layers + 1) <= p.vision_feature_layer <= v.num_layers:
            raise ConfigError(f"projector.vision_feature_layer: must index the tower's {v.num_layers + 1} hidden "
                              f"states, in [{-(v.num_layers + 1)}, {v.num_layers}], got {p.vision_feature_layer}")
        if self.stage2.steps < self.partition.num_clusters:
            raise ConfigError(f"stage2.steps: must be >= partition.num_clusters ({self.partition.num_clusters}) "
                              f"so every expert trains, got {self.stage2.steps}")
        if self.data.image_size % self.vision.patch_size:
            raise ConfigError(f"vision.patch_size: must divide data.image_size ({self.data.image_size}), "
                              f"got {self.vision.patch_size}")
        if self.eval.top_k > self.partition.num_clusters:
            raise ConfigError(f"eval.top_k: must be <= partition.num_clusters "
                              f"({self.partition.num_clusters}), got {self.eval.top_k}")
        if self.stage2.train in ("all", "projector+tower"):
            raise ConfigError("stage2.train: the tower must stay frozen in stage 2 (the routing features "
                              f"come from it); use 'projector+llm' or 'projector', got {self.stage2.train!r}")
        for section, size, heads in (("vision", self.vision.hidden_size, self.vision.num_heads),
                                     ("text", self.text.hidden_size, self.text.num_heads)):
            if size % heads or (section == "text" and (size // heads) % 2):
                raise ConfigError(f"{section}.num_heads: must divide hidden_size {size} "
                                  f"{'into even head sizes ' if section == 'text' else ''}, got {heads}")
        if self.text.num_kv_heads and self.text.num_heads % self.text.num_kv_heads:
            raise ConfigError(f"text.num_kv_heads: must divide num_heads, got {self.text.num_kv_heads}")

    def to_dict(self) -> dict:
        out = {"name": self.name, "task": self.task, "seed": self.seed}
        for section in _SECTIONS:
            out[section] = dataclasses.asdict(getattr(self, section))
        return out


def is_multimodal(raw: dict) -> bool:
    """True when a parsed TOML dict is a multimodal config (top-level ``task = "mllm"``)."""
    return raw.get("task") == TASK


def from_dict(raw: dict, name: str) -> MultimodalExperimentConfig:
    """Build the config from a parsed TOML dict (ConfigError naming unknown keys / bad values)."""
    top, sections = {}, {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{key}] table, got {value!r}")
            cls = _SECTIONS[key]
            known = {f.name for f in dataclasses.fields(cls)}
            for sub in value:
                if sub not in known:
                    raise ConfigError(f"unknown key {sub!r} in section [{key}] (known: {', '.join(sorted(known))})")
            base = dataclasses.asdict(getattr(MultimodalExperimentConfig, key)) if key == "stage2" else {}
            sections[key] = cls(**(base | value))
            _validate(sections[key], key)
        elif key in ("name", "seed", "task"):
            top[key] = value
        else:
            raise ConfigError(f"unknown key {key!r} at top level (known: name, task, seed, "
                              f"{', '.join(f'[{s}]' for s in _SECTIONS)})")
    top.setdefault("name", name)
    return MultimodalExperimentConfig(**top, **sections)


def load(path: Path) -> MultimodalExperimentConfig:
    """Parse a multimodal config file (ConfigError prefixed with the file name)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        return from_dict(raw, Path(path).stem)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_toml(config: MultimodalExperimentConfig) -> str:
    """TOML text that `from_dict(tomllib.loads(...))` maps back to `config`."""
    d = config.to_dict()
    lines = [f"{k} = {_toml_value(d[k])}" for k in ("name", "task", "seed")]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[section].items()]
    return "\n".join(lines) + "\n"
