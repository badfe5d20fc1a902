"""Configuration of the multimodal job (`task = "mllm"` configs): TOML -> frozen, validated dataclasses.

A multimodal config (e.g. ``experiments/configs/mllm-digits.toml``) has the top-level keys
``task = "mllm"`` (what routes ``dfm run --config NAME`` here), ``name``, ``seed`` and ``init_from``,
and the sections below, parsed by the engine's machinery (`experiments.engine.config`): every key is
optional, an unknown key or section is a `ConfigError` naming it, and a bad value is a
`ConfigError` naming the field (``"stage1.steps: must be >= 1, got 0"``).

``init_from`` (top level, default "" = train from random init): a local Hugging Face LLaVA
(`LlavaForConditionalGeneration`: CLIP + Llama / Qwen2) or InternVL (`InternVLForConditionalGeneration`:
InternViT + Qwen2 / Llama) directory (`experiments.mllm.pretrained`). Stage 1 starts from its
weights (`dfm.hf.load_pretrained`); the architecture is the checkpoint's, so [vision], [text],
[projector], ``data.image_size`` and ``data.vocab_size`` are ignored (the run logs it); the
tokenizer, its chat template and the image-token layout are the checkpoint's (as transformers'
processor lays them out, `dfm.prompts`); images are resized to the checkpoint's
``vision_config.image_size``. A top-level key rather than a section: it names where the whole model
comes from, like ``seed`` names its random init.

Sections:
  [data]       where the LLaVA-format records come from (`DataConfig`)
  [vision]     the ViT tower (`VisionSection`, mapped onto `dfm.models.vision.VisionConfig`)
  [text]       the LLaMA-style language model (`TextSection`, onto `dfm.models.DecoderConfig`)
  [projector]  LLaVA MLP or InternVL pixel-shuffle projector (`ProjectorSection`)
  [partition]  spherical balanced k-means on image features: the frozen tower's or CLIP's (`PartitionSection`)
  [stage1]     alignment on all data (`StageSection`)
  [stage2]     instruction tuning of the dense model and the experts, compute-matched (`StageSection`)
  [eval]       routing, generation and the report (`EvalSection`)
  [mesh]       device mesh for training (`experiments.engine.config.MeshSection`)
  [numerics]   dtype, attention kernel, remat, scan, microbatches (`experiments.engine.config.NumericsSection`)
"""
from __future__ import annotations

from dataclasses import dataclass

from experiments.engine.config import (ConfigError, JobConfig, MeshSection, NumericsSection, PartitionBalance,
                                       StageConfig, UsageError, constrained)

TASK = "mllm"
#: the stage-1 training stage (alignment on all data) and its config section
STAGE1 = "stage1"
SOURCES = ("default", "llava", "internvl")
TRAINABLE = ("all", "projector", "projector+tower", "projector+llm")
CLIP_PREFIX = "clip:"


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
      allow_outside_root: accept image paths that leave the image root ("llava": `image_root`;
        "internvl": each dataset's `root`) through ``..``, an absolute path or a symbolic link.
        Off by default: a record file cannot make the job read files elsewhere
        (docs/reliability.md#security).
      image_size: images are resized to `image_size` x `image_size` pixels (RGB). With `init_from`
        the checkpoint's image size is used instead (the default dataset is still drawn at this size).
      max_digits: use at most this many of the 1797 digits (0 = all) ("default" only).
      num_shapes, num_photos: images drawn with `skimage.draw.random_shapes` / derived from
        `skimage.data` photos ("default" only).
      vocab_size: byte-level BPE vocabulary trained on the train texts (special tokens included;
        the `<image>` token is added on top). Ignored with `init_from` (the checkpoint's tokenizer).
      max_length: tokens per training sequence, image tokens included; longer conversations are
        cut at a turn boundary (a record whose first turn does not fit is an error naming it).
      max_test: evaluate at most this many test questions (0 = all), taken in turn from each
        question type.
      max_packed_tokens: 0 (default) pads every training conversation to `max_length`; else each
        step's conversations (the same ones) are packed first-fit-decreasing into rows of this
        many tokens, attending within their own conversation (`experiments.mllm.packing`; the
        InternVL recipe packs to 8192). Must be 0 or >= `max_length`.
    """

    source: str = constrained("default", choices=SOURCES)
    train: str = ""
    val: str = ""
    test: str = ""
    image_root: str = ""
    allow_outside_root: bool = False
    image_size: int = constrained(32, lo=8, hi=1024)
    max_digits: int = constrained(0, lo=0)
    num_shapes: int = constrained(600, lo=0)
    num_photos: int = constrained(550, lo=0)
    vocab_size: int = constrained(384, lo=262, hi=262144)
    max_length: int = constrained(64, lo=8, hi=8192)
    max_test: int = constrained(0, lo=0)
    max_packed_tokens: int = constrained(0, lo=0)


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
class PartitionSection(PartitionBalance):
    """K experts from spherical balanced k-means on image features.

    Attributes:
      num_clusters: K.
      random_control: also train K experts on a random partition of the same cluster sizes.
      balance, kmeans: `experiments.engine.config.PartitionBalance`.
      seed: seed of k-means++ and of the random partition.
      features: what the images are clustered and routed by. "tower" (default): the patch mean of
        the stage-1 tower's layer `projector.vision_feature_layer` (`MultimodalModel.routing_features`);
        "clip:<dir>": the L2-normalised image embedding of a local HF CLIP checkpoint (`CLIPModel`,
        `CLIPVisionModelWithProjection` or `CLIPVisionModel`; `dfm.hf.clip_image_embeddings`, the
        paper's CLIP ViT-B/16 `get_image_features`), independent of the trained models.
    """

    num_clusters: int = constrained(3, lo=1)
    random_control: bool = True
    seed: int = constrained(0, lo=0)
    features: str = "tower"

    @property
    def clip_dir(self) -> str:
        """The CLIP checkpoint directory of ``features = "clip:<dir>"`` ("" for "tower")."""
        return self.features[len(CLIP_PREFIX):] if self.features.startswith(CLIP_PREFIX) else ""

    @property
    def needs_stage1(self) -> bool:
        """Tower features need the stage-1 model; CLIP features (``features = "clip:..."``) do not."""
        return not self.clip_dir


@dataclass(frozen=True)
class StageSection(StageConfig):
    """One training stage: `experiments.engine.config.StageConfig` (steps, batch size, AdamW, checkpoints)
    plus which parameters it updates.

    Attributes:
      train: "all", "projector" (LLaVA stage 1 with pretrained parts, `init_from`),
        "projector+tower", or "projector+llm" (LLaVA stage 2: the tower stays frozen). Trained from
        scratch, stage 1 uses "all". Stage 2 must keep the tower frozen ("projector+llm" or
        "projector") while the routing features come from it (``partition.features = "tower"``),
        so they are the same for every expert; with ``partition.features = "clip:<dir>"`` the
        features do not depend on the trained tower and stage 2 may train it ("all",
        "projector+tower"), as InternVL's full fine-tuning does.
    """

    train: str = constrained("all", choices=TRAINABLE)

    @property
    def frozen(self) -> tuple[str, ...]:
        """The parameters its `train` setting leaves out (`frozen_prefixes`)."""
        return frozen_prefixes(self.train)


def frozen_prefixes(train: str) -> tuple[str, ...]:
    """`TrainConfig.frozen` for a stage's `train` setting ("all", "projector", ...)."""
    keep = {"all": {"vision_tower", "multi_modal_projector", "language_model"},
            "projector": {"multi_modal_projector"},
            "projector+tower": {"multi_modal_projector", "vision_tower"},
            "projector+llm": {"multi_modal_projector", "language_model"}}[train]
    return tuple(sorted({"vision_tower", "multi_modal_projector", "language_model"} - keep))


@dataclass(frozen=True)
class EvalSection:
    """Evaluation.

    Attributes:
      top_k: experts kept by the top-k centroid router (its temperature is fitted on val).
      max_new_tokens: greedy decoding length of an answer.
      batch_size: sequences per forward pass.
      grid_examples: test images in the PNG example grid of the report.
      parity_margin: exact match as a fraction (0.01 = 1 point); a system whose 95% interval of
        (system - dense) exact match lies inside [-parity_margin, parity_margin] is reported
        'within margin' of dense (`experiments.engine.intervals.verdict`, higher is better).
      bootstrap_resamples: resamples of the paired bootstrap over test images (`experiments.mllm.report`).
    """

    top_k: int = constrained(2, lo=1)
    max_new_tokens: int = constrained(6, lo=1)
    batch_size: int = constrained(64, lo=1)
    grid_examples: int = constrained(12, lo=0)
    parity_margin: float = constrained(0.01, lo=0.0, hi=1.0)
    bootstrap_resamples: int = constrained(2000, lo=1)


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
    init_from: str = ""
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
        if self.data.max_packed_tokens and self.data.max_packed_tokens < self.data.max_length:
            raise ConfigError(f"data.max_packed_tokens: must be 0 (no packing) or >= data.max_length "
                              f"({self.data.max_length}) so every conversation fits a row, "
                              f"got {self.data.max_packed_tokens}")
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
        f = self.partition.features
        if f != "tower" and not (f.startswith(CLIP_PREFIX) and f[len(CLIP_PREFIX):].strip()):
            raise ConfigError(f"partition.features: must be 'tower' or 'clip:<HF CLIP directory>', got {f!r}")
        if self.stage2.train in ("all", "projector+tower") and f == "tower":
            raise ConfigError("stage2.train: the tower must stay frozen in stage 2 (the routing features "
                              "come from it with partition.features = 'tower'); use 'projector+llm' or "
                              f"'projector', or partition.features = 'clip:<dir>', got {self.stage2.train!r}")
        if self.init_from != self.init_from.strip():
            raise ConfigError(f"init_from: no leading or trailing spaces, got {self.init_from!r}")
        for section, size, heads in (("vision", self.vision.hidden_size, self.vision.num_heads),
                                     ("text", self.text.hidden_size, self.text.num_heads)):
            if size % heads or (section == "text" and (size // heads) % 2):
                raise ConfigError(f"{section}.num_heads: must divide hidden_size {size} "
                                  f"{'into even head sizes ' if section == 'text' else ''}, got {heads}")
        if self.text.num_kv_heads and self.text.num_heads % self.text.num_kv_heads:
            raise ConfigError(f"text.num_kv_heads: must divide num_heads, got {self.text.num_kv_heads}")

    def with_schedule(self, schedule: str | None) -> MultimodalExperimentConfig:
        """``--schedule`` accepts only "ar" (the job is autoregressive; a no-op).

        Raises:
          UsageError: any other schedule.
        """
        if schedule not in (None, "ar"):
            raise UsageError("--schedule: the multimodal job is autoregressive (LLaVA); drop --schedule")
        return self
