"""Configuration of the multimodal job (`task = "mllm"` configs): TOML -> frozen, validated dataclasses.

A multimodal config (e.g. ``experiments/configs/mllm-digits.toml``) has the top-level keys
``task = "mllm"`` (what routes ``dfm run --config NAME`` here), ``name`` and ``seed``, and the
sections below, parsed by the engine's machinery (`experiments.engine.config`): every key is
optional, an unknown key or section is a `ConfigError` naming it, and a bad value is a
`ConfigError` naming the field (``"stage1.steps: must be >= 1, got 0"``).

Sections:
  [data]       where the LLaVA-format records come from (`DataConfig`)
  [vision]     the ViT tower (`VisionSection`, mapped onto `dfm.models.vision.VisionConfig`)
  [text]       the LLaMA-style language model (`TextSection`, onto `dfm.models.DecoderConfig`)
  [projector]  LLaVA MLP or InternVL pixel-shuffle projector (`ProjectorSection`)
  [partition]  spherical balanced k-means on the frozen image features (`PartitionSection`)
  [stage1]     alignment on all data (`StageSection`)
  [stage2]     instruction tuning of the dense model and the experts, compute-matched (`StageSection`)
  [eval]       routing, generation and the report (`EvalSection`)
  [mesh]       device mesh for training (`experiments.engine.config.MeshSection`)
  [numerics]   dtype, attention kernel, remat, scan, microbatches (`experiments.engine.config.NumericsSection`)
"""
from __future__ import annotations

from dataclasses import dataclass

from experiments.engine.config import ConfigError, JobConfig, MeshSection, NumericsSection, StageConfig, constrained

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

    source: str = constrained("default", choices=SOURCES)
    train: str = ""
    val: str = ""
    test: str = ""
    image_root: str = ""
    image_size: int = constrained(32, lo=8, hi=1024)
    max_digits: int = constrained(0, lo=0)
    num_shapes: int = constrained(400, lo=0)
    num_photos: int = constrained(200, lo=0)
    vocab_size: int = constrained(384, lo=262, hi=262144)
    max_length: int = constrained(64, lo=8, hi=8192)
    max_test: int = constrained(0, lo=0)


@dataclass(frozen=True)
class VisionSection:
    """CLIP-style ViT (or InternViT) tower; see `dfm.models.vision.VisionConfig`."""

    arch: str = constrained("clip", choices=("clip", "internvit"))
    patch_size: int = constrained(8, lo=1)
    hidden_size: int = constrained(64, lo=2)
    intermediate_size: int = constrained(128, lo=1)
    num_layers: int = constrained(3, lo=2)
    num_heads: int = constrained(4, lo=1)


@dataclass(frozen=True)
class TextSection:
    """LLaMA / Qwen2-style causal language model; see `dfm.models.DecoderConfig` (same field names:
    `attention_bias` True = Qwen2's q/k/v biases, `tie_word_embeddings`, `rope_theta`)."""

    hidden_size: int = constrained(128, lo=2)
    intermediate_size: int = constrained(256, lo=1)
    num_layers: int = constrained(2, lo=1)
    num_heads: int = constrained(4, lo=1)
    num_kv_heads: int = constrained(0, lo=0)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = constrained(10000.0, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class ProjectorSection:
    """Vision -> text projector.

    Attributes:
      kind: "llava" (2-layer MLP, features of every patch) or "internvl" (pixel shuffle by
        `downsample_ratio`, then LayerNorm + 2-layer MLP).
      downsample_ratio: InternVL's pixel-shuffle ratio (0.5 = 4x fewer image tokens); 1.0 for LLaVA.
      vision_feature_layer: hidden state of the tower used (LLaVA: -2, the second-to-last layer).
    """

    kind: str = constrained("llava", choices=("llava", "internvl"))
    downsample_ratio: float = constrained(1.0, lo=0.0, hi=1.0, lo_open=True)
    vision_feature_layer: int = -2


@dataclass(frozen=True)
class PartitionSection:
    """K experts from spherical balanced k-means on pooled image features of the stage-1 tower.

    Attributes:
      num_clusters: K.
      random_control: also train K experts on a random partition of the same cluster sizes.
      seed: seed of k-means++ and of the random partition.
    """

    num_clusters: int = constrained(3, lo=1)
    random_control: bool = True
    seed: int = constrained(0, lo=0)


@dataclass(frozen=True)
class StageSection(StageConfig):
    """One training stage: `experiments.engine.config.StageConfig` (steps, batch size, AdamW, checkpoints)
    plus which parameters it updates.

    Attributes:
      train: "all", "projector" (LLaVA stage 1 with pretrained parts), "projector+tower", or
        "projector+llm" (LLaVA stage 2: the tower stays frozen). The multimodal job trains from
        scratch, so its stage 1 uses "all"; stage 2 must keep the tower frozen ("projector+llm")
        so the routing features are the same for every expert.
    """

    train: str = constrained("all", choices=TRAINABLE)


@dataclass(frozen=True)
class EvalSection:
    """Evaluation.

    Attributes:
      top_k: experts kept by the top-k centroid router (its temperature is fitted on val).
      max_new_tokens: greedy decoding length of an answer.
      batch_size: sequences per forward pass.
      grid_examples: test images in the PNG example grid of the report.
    """

    top_k: int = constrained(2, lo=1)
    max_new_tokens: int = constrained(6, lo=1)
    batch_size: int = constrained(64, lo=1)
    grid_examples: int = constrained(12, lo=0)


@dataclass(frozen=True)
class MultimodalExperimentConfig(JobConfig):
    """The whole multimodal job (one run directory)."""

    SECTIONS = {
        "data": DataConfig, "vision": VisionSection, "text": TextSection, "projector": ProjectorSection,
        "partition": PartitionSection, "stage1": StageSection, "stage2": StageSection, "eval": EvalSection,
        "mesh": MeshSection,
        "numerics": NumericsSection,
    }

    name: str = "mllm-digits"
    task: str = constrained(TASK, choices=(TASK,))
    seed: int = constrained(0, lo=0)
    data: DataConfig = DataConfig()
    vision: VisionSection = VisionSection()
    text: TextSection = TextSection()
    projector: ProjectorSection = ProjectorSection()
    partition: PartitionSection = PartitionSection()
    stage1: StageSection = StageSection()
    stage2: StageSection = StageSection(train="projector+llm")
    eval: EvalSection = EvalSection()
    mesh: MeshSection = MeshSection()
    numerics: NumericsSection = NumericsSection()

    def __post_init__(self):
        self.validate_fields()
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
