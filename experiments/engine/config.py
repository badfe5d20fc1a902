"""Job configuration: TOML files parsed into typed, validated, frozen dataclasses (both tasks).

A config file (``experiments/configs/<name>.toml``) has top-level keys (``name``, ``task``,
``seed``, and task-specific ones such as the text job's ``schedule``) and one table per section.
Every key is optional (the dataclass default applies); an unknown key or section is a
`ConfigError` naming it and its section, and a value of the wrong type or out of range is a
`ConfigError` naming the field (``"stage2.steps: must be >= 1, got 0"``). Command-line overrides
(``stage2.steps=200``, `apply_overrides`) are applied to the parsed file before validation, so they
are checked exactly like the file.

The machinery lives here once: `constrained` declares a field's range or choices, `validate`
checks a section, `JobConfig` gives a task's config `from_dict` / `to_dict` / `to_toml` /
`replace`, and the sections every task shares are `StageConfig` (one training stage) and
`MeshSection` (the device mesh). Each task declares its own config class (`experiments.text.config`,
`experiments.mllm.config`) from these parts. What a config decides about the stage graph is read
from it by the engine: its extra training stages (`JobConfig.extra_stages`), the parameters a stage
freezes (`StageConfig.frozen`), whether the partition needs stage 1 (`PartitionBalance.needs_stage1`)
and what ``--schedule`` does to it (`JobConfig.with_schedule`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "default"


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key, its section and the problem."""


class UsageError(ValueError):
    """A command-line flag that does not apply to the chosen task (exit status 2)."""


def constrained(default, *, lo=None, hi=None, lo_open=False, choices=None):
    """A dataclass field with range / choice constraints checked by `validate`.

    Args:
      default: the default value (lists become tuples).
      lo, hi: inclusive bounds (``lo_open=True``: lo exclusive); choices: allowed values.
    """
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def validate(obj, section: str) -> None:
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


def toml_value(v) -> str:
    """One TOML value (bool, number, string, list) as text.

    Raises:
      TypeError: a value TOML cannot hold.
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


@dataclass(frozen=True)
class StageConfig:
    """Optimization of one training stage (optax AdamW, linear warmup then cosine decay).

    For [stage2], `steps` is the dense model's step count; the K experts split the same number
    of steps in proportion to their clusters' training examples (compute-matched: same batch
    size and sequence length, so the same number of training sequences in total), each with the
    same peak learning rate and the warmup scaled by ``steps_k / steps``.

    Model selection (one rule for every model of the stage): the validation loss is computed
    before the first step and at `validations` evenly spaced steps (the last one included) on the
    model's own validation units (stage 1, dense and the random control: all of them; expert k:
    the validation units of cluster k), and with ``keep = "best"`` the stage's model is the
    parameters with the lowest validation loss (step 0 = the model it started from); ``"last"``
    keeps the final parameters. ``validations = 0`` turns validation off (then the last is kept).
    The test split is never read by training.

    `continue_schedule` (stage 2 only): the peak learning rate is where stage 1's schedule ended
    (stage 1's ``learning_rate`` x the cosine floor `dfm.train.TrainConfig.min_lr_ratio`) instead
    of this section's `learning_rate`: stage 2 continues the decay instead of re-warming above it.
    """

    steps: int = constrained(200, lo=1)
    batch_size: int = constrained(16, lo=1)
    learning_rate: float = constrained(3e-3, lo=0.0, lo_open=True)
    warmup_steps: int = constrained(20, lo=0)
    weight_decay: float = constrained(0.01, lo=0.0)
    checkpoint_every: int = constrained(100, lo=1)
    validations: int = constrained(10, lo=0)
    keep: str = constrained("best", choices=("best", "last"))
    continue_schedule: bool = False

    @property
    def frozen(self) -> tuple[str, ...]:
        """Dotted parameter prefixes the stage does not update (`dfm.train.TrainConfig.frozen`;
        none here, a task's section may say otherwise)."""
        return ()


@dataclass(frozen=True)
class PartitionBalance:
    """How the engine's balanced k-means balances the clusters; the base of every task's partition
    section (`experiments.engine.clustering`).

    Attributes:
      balance: "examples" (default): balanced k-means equalises the clusters' training examples
        (sequences / conversations per unit as weights, units kept whole;
        `dfm.decentral.weighted_balanced_assignment`), so the compute-matched experts get equal
        budgets; "units": equal numbers of units (documents / images) per cluster.
      kmeans: "exact" (default): balanced k-means on every unit (`dfm.decentral.balanced_kmeans`);
        "two_stage": the authors' fine -> coarse clustering for many units (MiniBatchKMeans into
        20 K fine clusters, then balanced k-means of their centroids weighted by their sizes;
        `dfm.decentral.two_stage_balanced_kmeans`); balances units, so it needs balance = "units".
    """

    balance: str = constrained("examples", choices=("examples", "units"))
    kmeans: str = constrained("exact", choices=("exact", "two_stage"))

    @property
    def needs_stage1(self) -> bool:
        """The partition's features come from the stage-1 model, so stage 1 runs before the
        partition (False here: features of the data alone)."""
        return False

    def __post_init__(self):
        if self.kmeans == "two_stage" and self.balance != "units":
            raise ConfigError("partition.kmeans: \"two_stage\" balances units (documents / images), not "
                              "training examples; set partition.balance = \"units\" with it")


@dataclass(frozen=True)
class MeshSection:
    """Device mesh for training (see docs/scale_out.md and `dfm.sharding`).

    Sizes of the `data`, `fsdp` and `tensor` axes; -1 fills with the remaining devices. The default
    1 x 1 x 1 trains unsharded on one device; `data = -1` spreads the batch over every device.
    Each expert job builds its own mesh: experts never communicate.
    """

    data: int = constrained(1, lo=-1)
    fsdp: int = constrained(1, lo=-1)
    tensor: int = constrained(1, lo=-1)

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if isinstance(value, int) and value == 0:
                raise ConfigError(f"mesh.{name}: must be -1 (fill) or >= 1, got 0")

    @property
    def sharded(self) -> bool:
        """False for the default single-device layout (then no mesh is built)."""
        return (self.data, self.fsdp, self.tensor) != (1, 1, 1)


@dataclass(frozen=True)
class NumericsSection:
    """Accelerator knobs of every model the job trains (`dfm.models.DecoderConfig` /
    `VisionConfig`, `dfm.train.TrainConfig`; docs/accelerators.md). The defaults are the exact
    float32 CPU setting the shipped results were made with.

    Attributes:
      dtype: compute dtype ("float32" | "bfloat16"); with `param_dtype = "float32"`, "bfloat16"
        is the usual mixed-precision policy on GPU / TPU (logits, loss, optimizer state float32).
      param_dtype: parameter storage dtype.
      attention: "auto" | "xla" | "cudnn" (`dfm.models.attention`).
      matmul_precision: "default" | "high" | "highest".
      remat: "none" | "full" | "dots" (activation rematerialisation per block).
      scan_layers: stack the decoder's blocks and run them with `jax.lax.scan`.
      microbatches: gradient accumulation slices per step (must divide every stage's batch size).
      async_checkpoint: orbax writes checkpoints in the background.
      loss_chunk: 0 (default): the training loss takes the full float32 `[batch, length, vocab]` logits;
        N > 0: the vocabulary-tiled cross-entropy (`dfm.train.tiled_loss.causal_lm_loss`), N positions
        per row at a time, logits recomputed in the backward pass, so no `[batch, length, vocab]`
        buffer exists (equal loss and gradients within 1e-5 in float32; what a 151k vocabulary at
        8192 tokens needs, docs/plan.md). AR causal LMs only (the text job's masked schedule keeps the
        plain loss).
    """

    dtype: str = constrained("float32", choices=("float32", "bfloat16"))
    param_dtype: str = constrained("float32", choices=("float32", "bfloat16"))
    attention: str = constrained("auto", choices=("auto", "xla", "cudnn"))
    matmul_precision: str = constrained("default", choices=("default", "high", "highest"))
    remat: str = constrained("none", choices=("none", "full", "dots"))
    scan_layers: bool = False
    microbatches: int = constrained(1, lo=1)
    async_checkpoint: bool = False
    loss_chunk: int = constrained(0, lo=0)

    def model_fields(self) -> dict:
        """The `DecoderConfig` keyword arguments of this section."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "attention": self.attention,
                "matmul_precision": self.matmul_precision, "remat": self.remat, "scan_layers": self.scan_layers}

    def vision_fields(self) -> dict:
        """The `VisionConfig` keyword arguments of this section."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "attention": self.attention,
                "matmul_precision": self.matmul_precision}


class JobConfig:
    """Base of a task's frozen config dataclass: parsing, validation and TOML round trip.

    A subclass is a ``@dataclass(frozen=True)`` with top-level fields (``name``, ``task``, ``seed``,
    ...) and one field per section, and declares ``SECTIONS = {"stage2": StageConfig, ...}``.
    Its ``__post_init__`` should call ``self.validate_fields()`` before its cross-field checks.
    """

    SECTIONS: ClassVar[dict[str, type]] = {}

    def validate_fields(self) -> None:
        """Types and ranges of the top-level fields and of every section (ConfigError)."""
        for section, cls in self.SECTIONS.items():
            value = getattr(self, section)
            if not isinstance(value, cls):
                raise ConfigError(f"{section}: expected a [{section}] table, got {value!r}")
            validate(value, section)
        validate(self, "")
        numerics = getattr(self, "numerics", None)
        if isinstance(numerics, NumericsSection) and numerics.microbatches > 1:
            for section in self.SECTIONS:
                stage = getattr(self, section)
                if isinstance(stage, StageConfig) and stage.batch_size % numerics.microbatches:
                    raise ConfigError(f"numerics.microbatches: must divide {section}.batch_size "
                                      f"({stage.batch_size}), got {numerics.microbatches}")

    @property
    def extra_stages(self) -> tuple[str, ...]:
        """Training stages after the experts (e.g. the text job's learned router; none here)."""
        return ()

    def with_schedule(self, schedule: str | None):
        """The config with the command line's ``--schedule`` applied (default: none accepted).

        Raises:
          UsageError: the task has no schedule choice.
        """
        if schedule is not None:
            raise UsageError(f"--schedule: the {getattr(self, 'task', '?')} task has no schedule choice; "
                             f"drop --schedule")
        return self

    @classmethod
    def top_keys(cls) -> list[str]:
        """The top-level (non-section) keys, in declaration order."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls.SECTIONS]

    @classmethod
    def from_dict(cls, raw: dict, name: str = DEFAULT_CONFIG):
        """Build the config from a parsed TOML dict; a partial section is merged onto the
        class's default for that section.

        Raises:
          ConfigError: an unknown section or key (naming it and its section), a value of the wrong
            type, or a value out of range (naming the field).
        """
        top, sections = {}, {}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key in cls.SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a [{key}] table, got {value!r}")
                section_cls = cls.SECTIONS[key]
                known = {f.name for f in dataclasses.fields(section_cls)}
                for sub in value:
                    if sub not in known:
                        raise ConfigError(
                            f"unknown key {sub!r} in section [{key}] (known: {', '.join(sorted(known))})")
                converted = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                sections[key] = dataclasses.replace(defaults[key], **converted)
                validate(sections[key], key)
            elif key in cls.top_keys():
                top[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ConfigError(
                    f"unknown key {key!r} at top level (known: {', '.join(cls.top_keys())}, "
                    f"{', '.join(f'[{s}]' for s in cls.SECTIONS)})")
        top.setdefault("name", name)
        return cls(**top, **sections)

    def to_dict(self) -> dict:
        """Plain nested dict (TOML-ready: tuples become lists)."""
        def conv(v):
            return list(v) if isinstance(v, tuple) else v
        out = {k: conv(getattr(self, k)) for k in self.top_keys()}
        for section in self.SECTIONS:
            out[section] = {k: conv(v) for k, v in dataclasses.asdict(getattr(self, section)).items()}
        return out

    def to_toml(self) -> str:
        """TOML text that `from_dict(tomllib.loads(...))` maps back to this config."""
        d = self.to_dict()
        lines = [f"{k} = {toml_value(d[k])}" for k in self.top_keys()]
        for section in self.SECTIONS:
            lines += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in d[section].items()]
        return "\n".join(lines) + "\n"

    def replace(self, **changes):
        """A validated copy with top-level fields or whole sections changed."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: JobConfig) -> list[str]:
        """Dotted names of the fields in which `other` differs (``["stage2.steps", "seed"]``)."""
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k in a:
            if isinstance(a[k], dict):
                out += [f"{k}.{s}" for s in a[k] if a[k][s] != b.get(k, {}).get(s)]
            elif a[k] != b.get(k):
                out.append(k)
        return out


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


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file.

    Raises:
      ConfigError: a syntax error (naming the file).
    """
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def parse_config(config_class: type, raw: dict, path: Path, overrides: Sequence[str] = ()):
    """`config_class.from_dict(raw, name=path.stem)` with the file's name (and the command-line
    overrides, when there are any) in any ConfigError."""
    try:
        return config_class.from_dict(raw, name=Path(path).stem)
    except ConfigError as exc:
        where = f"{path} with overrides {' '.join(overrides)}" if overrides else f"{path}"
        raise ConfigError(f"{where}: {exc}") from None


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)?")


def is_override(arg: str) -> bool:
    """True if a command-line argument has the form of an override, ``key=value`` or
    ``section.key=value`` (it need not name a real key: `apply_overrides` checks that)."""
    key, eq, _ = arg.partition("=")
    return bool(eq) and _KEY.fullmatch(key.strip()) is not None


def parse_override(arg: str) -> tuple[tuple[str, ...], Any]:
    """``"stage2.steps=200"`` -> ``(("stage2", "steps"), 200)``.

    The value is read as a TOML value (``200``, ``3e-4``, ``false``, ``"text"``, ``[1, 2]``); when it
    is not valid TOML it is taken as a bare string (``numerics.attention=xla`` -> ``"xla"``).

    Raises:
      ConfigError: no ``=``, or a key that is not ``name`` or ``section.name``.
    """
    key, eq, text = arg.partition("=")
    key = key.strip()
    if not eq or _KEY.fullmatch(key) is None:
        raise ConfigError(f"override {arg!r}: expected KEY=VALUE with KEY a top-level key or SECTION.KEY "
                          f"(e.g. stage2.steps=200)")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return tuple(key.split(".")), value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of the parsed TOML dict `raw` with command-line overrides (`parse_override`) applied,
    in order (a later override of the same key wins). Nothing is validated here: the result goes
    through `JobConfig.from_dict` like a file, so an unknown key or a bad value is the same
    `ConfigError` naming it.

    Raises:
      ConfigError: a malformed override, or ``section.key`` where ``section`` is a plain value.
    """
    out = copy.deepcopy(raw)
    for arg in overrides:
        parts, value = parse_override(arg)
        if len(parts) == 1:
            out[parts[0]] = value
            continue
        section, key = parts
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {arg!r}: {section!r} is a top-level value, not a [{section}] table")
        table[key] = value
    return out


def override_changes(before: dict, after: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value before, value after)`` of every field that differs between two
    `JobConfig.to_dict` dicts (values missing on one side are None)."""
    out = []
    for k in dict.fromkeys([*before, *after]):
        a, b = before.get(k), after.get(k)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            out += [(f"{k}.{s}", a.get(s), b.get(s)) for s in dict.fromkeys([*a, *b]) if a.get(s) != b.get(s)]
        elif a != b:
            out.append((k, a, b))
    return out
