"""Experiment configuration: TOML files parsed into typed, validated, frozen dataclasses.

A config file (``experiments/configs/<name>.toml``) has top-level keys ``seed`` and ``schedule``
and one table per section below. Every key is optional (the dataclass default applies); an
unknown key or section is a `ConfigError` naming it and its section, and a value of the wrong
type or out of range is a `ConfigError` naming the field (``"base.steps: must be >= 1, got 0"``).

Sections:
  [data]       corpus split, tokenizer vocabulary and sequence length (`DataConfig`)
  [partition]  tf-idf + SVD features and balanced k-means (`PartitionConfig`)
  [model]      decoder sizes, mapped onto `dfm.models.DecoderConfig` (`ModelConfig`)
  [masked]     kappa scheduler of the masked (DFM) schedule (`MaskedConfig`)
  [base]       stage 1, the shared base model (`StageConfig`)
  [stage2]     stage 2, dense baseline and experts, compute-matched (`StageConfig`)
  [router]     learned router, masked schedule only (`RouterConfig`)
  [eval]       evaluation, routing and sampling (`EvalConfig`)
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "default"
SCHEDULES = ("ar", "masked")


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key, its section and the problem."""


def _f(default, *, lo=None, hi=None, lo_open=False, choices=None):
    """A dataclass field with range/choice constraints checked by `_validate`."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def _validate(obj, section: str) -> None:
    """Check every field of dataclass `obj` against its declared type and constraints.

    Raises:
      ConfigError: ``"<section>.<field>: <problem>, got <value>"``.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = f"{section}.{f.name}" if section else f.name
        expected = hints[f.name]
        if not _type_ok(value, expected):
            raise ConfigError(f"{where}: expected {_type_name(expected)}, got {value!r}")
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ConfigError(f"{where}: must be one of {list(meta['choices'])}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}: must be finite, got {value!r}")
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
                raise ConfigError(f"{where}: must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
            if hi is not None and value > hi:
                raise ConfigError(f"{where}: must be <= {hi}, got {value!r}")


def _type_ok(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(expected)
        return isinstance(value, tuple) and all(_type_ok(v, item) for v in value)
    return isinstance(value, expected)


def _type_name(expected) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(expected)[0])}"
    return "null" if expected is type(None) else expected.__name__


@dataclass(frozen=True)
class DataConfig:
    """Corpus split, tokenizer and sequence chunking (see experiments/corpus.py, tokenizer.py).

    Attributes:
      vocab_size: byte-level BPE vocabulary size including the 3 special tokens (BOS, EOS, PAD).
      seq_len: tokens per training/evaluation sequence (the model additionally sees BOS in front).
      val_fraction, test_fraction: shares of documents in val/test, by a hash of the document id.
      max_eval_docs: evaluate on at most this many test documents (taken in turn from each true
        cluster, in id order); 0 = all.
      exclude_dirs: stdlib directories (any path component) whose modules are not in the corpus.
    """

    vocab_size: int = _f(1024, lo=260, hi=65536)
    seq_len: int = _f(128, lo=8, hi=8192)
    val_fraction: float = _f(0.1, lo=0.0, hi=0.5, lo_open=True)
    test_fraction: float = _f(0.1, lo=0.0, hi=0.5, lo_open=True)
    max_eval_docs: int = _f(0, lo=0)
    exclude_dirs: tuple[str, ...] = _f(
        ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
         "__pycache__", "ensurepip", "pydoc_data", "encodings"))


@dataclass(frozen=True)
class PartitionConfig:
    """Document features and clustering (dfm.decentral.features / partition).

    Attributes:
      num_clusters: K, the number of experts.
      svd_dim: TruncatedSVD components of the tf-idf features.
      max_features: tf-idf vocabulary size (most frequent terms).
      random_control: also train K experts on a random partition of the same cluster sizes.
      seed: seed of the featurizer, the k-means initialization and the random partition.
    """

    num_clusters: int = _f(4, lo=2, hi=64)
    svd_dim: int = _f(64, lo=2)
    max_features: int = _f(20000, lo=16)
    random_control: bool = True
    seed: int = _f(0, lo=0)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder sizes; vocab size and causality come from [data] and the schedule.

    Field names are those of `dfm.models.DecoderConfig` (HF LlamaConfig meaning).
    """

    hidden_size: int = _f(128, lo=8)
    intermediate_size: int = _f(384, lo=8)
    num_layers: int = _f(2, lo=1)
    num_heads: int = _f(4, lo=1)
    num_kv_heads: int = _f(0, lo=0)  # 0 = num_heads (MHA)
    rope_theta: float = _f(10000.0, lo=0.0, lo_open=True)
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class MaskedConfig:
    """The masked (DFM) schedule used with ``schedule = "masked"`` (THEORY S4, S5(e)).

    Attributes:
      scheduler: kappa scheduler: "polynomial" (kappa = t**exponent), "linear" or "cosine".
      exponent: exponent of the polynomial scheduler.
      num_steps: T of the discretized schedule used for training, ELBO evaluation and sampling.
      elbo_samples: Monte-Carlo draws of (t, x_t) per test sequence for the DFM loss (ELBO).
    """

    scheduler: str = _f("polynomial", choices=("polynomial", "linear", "cosine"))
    exponent: float = _f(1.0, lo=0.0, lo_open=True)
    num_steps: int = _f(32, lo=1)
    elbo_samples: int = _f(4, lo=1)


@dataclass(frozen=True)
class StageConfig:
    """Optimization of one training stage (optax AdamW, linear warmup then cosine decay).

    For [stage2], `steps` is the dense model's step count; the K experts split the same number
    of steps in proportion to their clusters' sequence counts (compute-matched: same batch size,
    same sequence length, so the same number of training tokens in total), each with the same
    peak learning rate and the warmup scaled by ``steps_k / steps``.
    """

    steps: int = _f(200, lo=1)
    batch_size: int = _f(16, lo=1)
    learning_rate: float = _f(3e-3, lo=0.0, lo_open=True)
    warmup_steps: int = _f(20, lo=0)
    weight_decay: float = _f(0.01, lo=0.0)
    checkpoint_every: int = _f(100, lo=1)


@dataclass(frozen=True)
class RouterConfig:
    """The learned router (masked schedule; THEORY S10): a classifier of noised states x_t."""

    steps: int = _f(200, lo=1)
    batch_size: int = _f(32, lo=1)
    learning_rate: float = _f(3e-3, lo=0.0, lo_open=True)
    hidden_size: int = _f(64, lo=8)
    num_layers: int = _f(1, lo=1)
    num_heads: int = _f(2, lo=1)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation, routing and sampling.

    Attributes:
      batch_size: sequences per forward pass.
      max_scored_per_doc: score at most the first N chunks after the context chunk of each
        document (0 = all).
      top_k: k of the centroid top-k router (THEORY S13).
      num_samples: generated samples per system (fixed keys).
      sample_length: tokens per sample.
      temperature: sampling temperature.
      seed: seed of the sampling keys and of the ELBO estimate.
    """

    batch_size: int = _f(32, lo=1)
    max_scored_per_doc: int = _f(0, lo=0)
    top_k: int = _f(2, lo=1)
    num_samples: int = _f(3, lo=0)
    sample_length: int = _f(48, lo=1)
    temperature: float = _f(1.0, lo=0.0)
    seed: int = _f(0, lo=0)


@dataclass(frozen=True)
class MeshSection:
    """Device mesh for training (THEORY-free; see docs/scale_out.md and `dfm.sharding`).

    Sizes of the `data`, `fsdp` and `tensor` axes; -1 fills with the remaining devices. The default
    1 x 1 x 1 trains unsharded on one device; `data = -1` spreads the batch over every device.
    Each expert job builds its own mesh: experts never communicate.
    """

    data: int = _f(1, lo=-1)
    fsdp: int = _f(1, lo=-1)
    tensor: int = _f(1, lo=-1)

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if isinstance(value, int) and value == 0:
                raise ConfigError(f"mesh.{name}: must be -1 (fill) or >= 1, got 0")

    @property
    def sharded(self) -> bool:
        """False for the default single-device layout (then no mesh is built)."""
        return (self.data, self.fsdp, self.tensor) != (1, 1, 1)


_SECTIONS = {
    "data": DataConfig, "partition": PartitionConfig, "model": ModelConfig, "masked": MaskedConfig,
    "base": StageConfig, "stage2": StageConfig, "router": RouterConfig, "eval": EvalConfig,
    "mesh": MeshSection,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one run directory, all stages.

    Attributes:
      name: config name (the file stem); default output directory is ``runs/<name>``.
      seed: seed of model initialization and batch order.
      schedule: "ar" (causal decoder, AR loss) or "masked" (bidirectional denoiser, DFM loss).
    """

    name: str = DEFAULT_CONFIG
    seed: int = _f(0, lo=0)
    schedule: str = _f("ar", choices=SCHEDULES)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    masked: MaskedConfig = MaskedConfig()
    base: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig()
    router: RouterConfig = RouterConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshSection = MeshSection()

    def __post_init__(self):
        _validate(self, "")
        for section, cls in _SECTIONS.items():
            value = getattr(self, section)
            if not isinstance(value, cls):
                raise ConfigError(f"{section}: expected a [{section}] table, got {value!r}")
            _validate(value, section)
        if self.data.val_fraction + self.data.test_fraction >= 0.9:
            raise ConfigError("data.test_fraction: val_fraction + test_fraction must be < 0.9")
        if self.eval.top_k > self.partition.num_clusters:
            raise ConfigError(
                f"eval.top_k: must be <= partition.num_clusters ({self.partition.num_clusters}), "
                f"got {self.eval.top_k}")
        heads = self.model.num_kv_heads or self.model.num_heads
        if self.model.num_heads % heads:
            raise ConfigError(f"model.num_kv_heads: must divide num_heads, got {heads}")
        if self.model.hidden_size % self.model.num_heads or (self.model.hidden_size // self.model.num_heads) % 2:
            raise ConfigError(
                f"model.num_heads: hidden_size / num_heads must be an even integer, got "
                f"{self.model.hidden_size} / {self.model.num_heads}")
        if self.router.hidden_size % self.router.num_heads or (self.router.hidden_size // self.router.num_heads) % 2:
            raise ConfigError(
                f"router.num_heads: hidden_size / num_heads must be an even integer, got "
                f"{self.router.hidden_size} / {self.router.num_heads}")
        if self.eval.sample_length > self.data.seq_len:
            raise ConfigError(f"eval.sample_length: must be <= data.seq_len ({self.data.seq_len})")

    def replace(self, **changes) -> "ExperimentConfig":
        """A validated copy with top-level fields changed (e.g. ``schedule="masked"``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain nested dict (TOML-ready: tuples become lists)."""
        def conv(v):
            return list(v) if isinstance(v, tuple) else v
        out = {"name": self.name, "seed": self.seed, "schedule": self.schedule}
        for section in _SECTIONS:
            out[section] = {k: conv(v) for k, v in dataclasses.asdict(getattr(self, section)).items()}
        return out


def from_dict(raw: dict, name: str = DEFAULT_CONFIG) -> ExperimentConfig:
    """Build an `ExperimentConfig` from a parsed TOML dict.

    Raises:
      ConfigError: for an unknown section or key (naming it and its section), a value of the
        wrong type, or a value out of range (naming the field).
    """
    top = {}
    sections = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{key}] table, got {value!r}")
            cls = _SECTIONS[key]
            known = {f.name for f in dataclasses.fields(cls)}
            for sub in value:
                if sub not in known:
                    raise ConfigError(
                        f"unknown key {sub!r} in section [{key}] (known: {', '.join(sorted(known))})")
            converted = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            try:
                sections[key] = cls(**converted)
            except TypeError as exc:  # pragma: no cover - unknown keys are caught above
                raise ConfigError(f"[{key}]: {exc}") from None
            _validate(sections[key], key)
        elif key in ("name", "seed", "schedule"):
            top[key] = value
        else:
            raise ConfigError(
                f"unknown key {key!r} at top level (known: name, seed, schedule, "
                f"{', '.join(f'[{s}]' for s in _SECTIONS)})")
    top.setdefault("name", name)
    return ExperimentConfig(**top, **sections)


def resolve_path(name_or_path: str) -> Path:
    """A config NAME (file stem in experiments/configs/) or a PATH to a .toml file.

    Raises:
      ConfigError: if neither exists (naming the available configs).
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file() or "/" in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}; available: {', '.join(available_configs())}")
    return candidate


def available_configs() -> list[str]:
    """Names of the shipped configs (experiments/configs/*.toml), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config(name_or_path: str = DEFAULT_CONFIG) -> ExperimentConfig:
    """Parse and validate a config by NAME or PATH (see `resolve_path`, `from_dict`).

    Raises:
      ConfigError: unknown file, TOML syntax error, unknown key, bad value (message names the file).
    """
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if raw.get("task") == "mllm":
        raise ConfigError(f"{path}: a multimodal config (task = \"mllm\"); load it with "
                          f"experiments.mllm.config.load (the `dfm` CLI does this)")
    try:
        return from_dict(raw, name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_toml(config: ExperimentConfig) -> str:
    """Serialize to TOML text that `from_dict(tomllib.loads(...))` maps back to `config`."""
    d = config.to_dict()
    lines = []
    for key in ("name", "seed", "schedule"):
        lines.append(f"{key} = {_toml_value(d[key])}")
    for section in _SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in d[section].items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")
