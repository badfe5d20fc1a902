"""Configuration of the text job (`task = "text"`, the default when a config has no `task` key).

A config file (``experiments/configs/<name>.toml``) has top-level keys ``seed``, ``schedule`` and ``seeds``
and one table per section below, parsed by the engine's machinery (`experiments.engine.config`):
every key is optional (the dataclass default applies); an unknown key or section is a
`ConfigError` naming it and its section, and a value of the wrong type or out of range is a
`ConfigError` naming the field (``"base.steps: must be >= 1, got 0"``).

Sections:
  [data]       corpus source and split, tokenizer vocabulary and sequence length (`DataConfig`)
  [partition]  tf-idf + SVD features and balanced k-means (`PartitionConfig`)
  [model]      decoder sizes, mapped onto `dfm.models.DecoderConfig`, or a pretrained HF checkpoint
               to start from (`ModelConfig`)
  [masked]     kappa scheduler of the masked (DFM) schedule (`MaskedConfig`)
  [base]       stage 1, the shared base model (`StageConfig`)
  [stage2]     stage 2, dense baseline and experts, compute-matched (`StageConfig`)
  [router]     learned router, masked schedule only (`RouterConfig`)
  [eval]       evaluation, routing and sampling (`EvalConfig`)
  [mesh]       device mesh for training (`experiments.engine.config.MeshSection`)
  [numerics]   dtype, attention kernel, remat, scan, microbatches (`experiments.engine.config.NumericsSection`)
"""
from __future__ import annotations

from dataclasses import dataclass

from experiments.engine.config import (ConfigError, JobConfig, MeshSection, NumericsSection, PartitionBalance,
                                       StageConfig, constrained, parse_config, read_toml, resolve_path)

TASK = "text"
SCHEDULES = ("ar", "masked")
#: the stage-1 training stage (the shared base model) and its config section
STAGE1 = "base"
#: the learned router's training stage (masked schedule; `ExperimentConfig.extra_stages`)
ROUTER_STAGE = "router"


@dataclass(frozen=True)
class DataConfig:
    """Corpus, split, tokenizer and sequence chunking (see `experiments.text.sources`, `.corpus`, `.data`).

    Attributes:
      corpus: the documents (`experiments.text.sources`): "stdlib" (default: the Python standard
        library's documentation), "stdlib+python" (that plus the stdlib's Python source, one
        ``source:<module>`` document per file) or a path (relative to the working directory) to a
        folder of ``*.txt`` / ``*.md`` files or to a ``.jsonl`` file of ``{"text": ..., "id": ...}``
        lines. See docs/your_data.md.
      vocab_size: byte-level BPE vocabulary size including the 3 special tokens (BOS, EOS, PAD);
        ignored with ``model.init_from`` (the checkpoint's tokenizer is used).
      seq_len: tokens per training/evaluation sequence (the model additionally sees BOS in front).
      val_fraction, test_fraction: shares of documents in val/test, by a hash of the document id.
      max_eval_docs: evaluate on at most this many test documents (taken in turn from each true
        cluster, in id order); 0 = all.
      exclude_dirs: stdlib directories (any path component) whose modules are not in the corpus
        (built-in corpora only).
    """

    corpus: str = constrained("stdlib")
    vocab_size: int = constrained(1024, lo=260, hi=262144)
    seq_len: int = constrained(128, lo=8, hi=8192)
    val_fraction: float = constrained(0.1, lo=0.0, hi=0.5, lo_open=True)
    test_fraction: float = constrained(0.1, lo=0.0, hi=0.5, lo_open=True)
    max_eval_docs: int = constrained(0, lo=0)
    exclude_dirs: tuple[str, ...] = constrained(
        ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
         "__pycache__", "ensurepip", "pydoc_data", "encodings"))


@dataclass(frozen=True)
class PartitionConfig(PartitionBalance):
    """Document features and clustering (dfm.decentral.features / partition).

    Attributes:
      num_clusters: K, the number of experts.
      svd_dim: TruncatedSVD components of the tf-idf features.
      max_features: tf-idf vocabulary size (most frequent terms).
      random_control: also train K experts on a random partition of the same cluster sizes.
      balance, kmeans: `experiments.engine.config.PartitionBalance`.
      seed: seed of the featurizer, the k-means initialization and the random partition.
    """

    num_clusters: int = constrained(4, lo=1, hi=64)
    svd_dim: int = constrained(64, lo=2)
    max_features: int = constrained(20000, lo=16)
    random_control: bool = True
    seed: int = constrained(0, lo=0)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder sizes, or the pretrained checkpoint stage 1 starts from.

    Field names are those of `dfm.models.DecoderConfig` (HF LlamaConfig meaning); vocab size and
    causality come from [data] and the schedule.

    Attributes:
      init_from: "" (default: stage 1, "base", starts from random init with the sizes below and a
        BPE trained on the corpus) or a local HF directory of a Llama / Qwen2 causal LM
        (``config.json`` + safetensors, sharded or not; relative to the working directory). Then
        the architecture and the vocabulary come from the checkpoint (every size below and
        ``data.vocab_size`` are ignored), the tokenizer is the checkpoint's, stage 1 is a short
        continued pre-training of the checkpoint on the corpus (``base.steps`` >= 1; use a small
        ``base.learning_rate``) and the export writes the checkpoint's tokenizer and chat template.
        AR schedule only. See `experiments.text.modeling.new_model` and docs/your_data.md.
    """

    hidden_size: int = constrained(128, lo=8)
    intermediate_size: int = constrained(384, lo=8)
    num_layers: int = constrained(2, lo=1)
    num_heads: int = constrained(4, lo=1)
    num_kv_heads: int = constrained(0, lo=0)  # 0 = num_heads (MHA)
    rope_theta: float = constrained(10000.0, lo=0.0, lo_open=True)
    tie_word_embeddings: bool = True
    init_from: str = ""


@dataclass(frozen=True)
class MaskedConfig:
    """The masked (DFM) schedule used with ``schedule = "masked"`` (THEORY S4, S5(e)).

    Attributes:
      scheduler: kappa scheduler: "polynomial" (kappa = t**exponent), "linear" or "cosine".
      exponent: exponent of the polynomial scheduler.
      num_steps: T of the discretized schedule used for training, ELBO evaluation and sampling.
      elbo_samples: Monte-Carlo draws of (t, x_t) per test sequence for the DFM loss (ELBO).
    """

    scheduler: str = constrained("polynomial", choices=("polynomial", "linear", "cosine"))
    exponent: float = constrained(1.0, lo=0.0, lo_open=True)
    num_steps: int = constrained(32, lo=1)
    elbo_samples: int = constrained(4, lo=1)


@dataclass(frozen=True)
class RouterConfig:
    """The learned router (masked schedule; THEORY S10): a classifier of noised states x_t."""

    steps: int = constrained(200, lo=1)
    batch_size: int = constrained(32, lo=1)
    learning_rate: float = constrained(3e-3, lo=0.0, lo_open=True)
    hidden_size: int = constrained(64, lo=8)
    num_layers: int = constrained(1, lo=1)
    num_heads: int = constrained(2, lo=1)


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
      parity_margin: nats/token; a system whose 95% interval of (system - dense) lies inside
        [-parity_margin, parity_margin] is reported 'within margin' of dense
        (`experiments.engine.intervals.verdict`).
      bootstrap_resamples: resamples of the paired bootstrap over test documents.
    """

    batch_size: int = constrained(32, lo=1)
    max_scored_per_doc: int = constrained(0, lo=0)
    top_k: int = constrained(2, lo=1)
    num_samples: int = constrained(3, lo=0)
    sample_length: int = constrained(48, lo=1)
    temperature: float = constrained(1.0, lo=0.0)
    seed: int = constrained(0, lo=0)
    parity_margin: float = constrained(0.02, lo=0.0)
    bootstrap_resamples: int = constrained(2000, lo=1)


@dataclass(frozen=True)
class ExperimentConfig(JobConfig):
    """The text job: one run directory, all stages.

    Attributes:
      name: config name (the file stem); default output directory is ``runs/<name>``.
      task: "text" (may be omitted in the file).
      seed: seed of model initialization and batch order.
      schedule: "ar" (causal decoder, AR loss) or "masked" (bidirectional denoiser, DFM loss).
      seeds: ``dfm run`` repeats the whole job for each of these seeds (``seed`` and
        ``partition.seed`` set to it) into ``<out>/seed-<s>/`` and writes ``<out>/summary.json``
        (`experiments.engine.seeds`); empty (default): one run with ``seed``. ``--seeds N`` on the
        command line overrides it with ``[0, .., N-1]``.
    """

    SECTIONS = {
        "data": DataConfig, "partition": PartitionConfig, "model": ModelConfig, "masked": MaskedConfig,
        "base": StageConfig, "stage2": StageConfig, "router": RouterConfig, "eval": EvalConfig,
        "mesh": MeshSection,
        "numerics": NumericsSection,
    }

    name: str = "default"
    task: str = constrained(TASK, choices=(TASK,))
    seed: int = constrained(0, lo=0)
    schedule: str = constrained("ar", choices=SCHEDULES)
    seeds: tuple[int, ...] = constrained(())
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    masked: MaskedConfig = MaskedConfig()
    base: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig()
    router: RouterConfig = RouterConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshSection = MeshSection()
    numerics: NumericsSection = NumericsSection()

    def __post_init__(self):
        self.validate_fields()
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: must be distinct integers >= 0, got {list(self.seeds)}")
        if not self.data.corpus.strip():
            raise ConfigError('data.corpus: must be "stdlib", "stdlib+python" or a path to a folder or a .jsonl '
                              'file, got ""')
        if self.numerics.loss_chunk and self.schedule != "ar":
            raise ConfigError(f"numerics.loss_chunk: the vocabulary-tiled loss is the AR (causal LM) loss; the "
                              f"masked schedule's DFM loss takes whole logits, so set it to 0, got "
                              f"{self.numerics.loss_chunk} with schedule {self.schedule!r}")
        if self.model.init_from and self.schedule != "ar":
            raise ConfigError(f"model.init_from: a pretrained checkpoint is a causal LM, so only schedule = \"ar\" "
                              f"can start from it, got schedule {self.schedule!r}")
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
        if self.stage2.steps < self.partition.num_clusters:
            raise ConfigError(f"stage2.steps: must be >= partition.num_clusters ({self.partition.num_clusters}) "
                              f"so every expert trains, got {self.stage2.steps}")

    @property
    def extra_stages(self) -> tuple[str, ...]:
        """The learned router (``"router"``) under the masked schedule; none under AR."""
        return (ROUTER_STAGE,) if self.schedule == "masked" else ()

    def with_schedule(self, schedule: str | None) -> ExperimentConfig:
        """``--schedule ar|masked`` overrides the config's schedule; the run is then named
        ``<name>-<schedule>`` (its own run directory)."""
        if schedule is None or schedule == self.schedule:
            return self
        return self.replace(schedule=schedule, name=f"{self.name}-{schedule}")


def load_config(name_or_path: str = "default") -> ExperimentConfig:
    """Parse and validate a text config by NAME or PATH (`experiments.engine.config.resolve_path`).

    Raises:
      ConfigError: unknown file, TOML syntax error, unknown key, bad value (message names the file),
        or a config of another task.
    """
    path = resolve_path(name_or_path)
    raw = read_toml(path)
    if raw.get("task", TASK) != TASK:
        raise ConfigError(f"{path}: a config of the {raw.get('task')!r} task, not the text job")
    return parse_config(ExperimentConfig, raw, path)
