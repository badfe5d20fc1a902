"""A decentralized model on disk: K expert HF directories + the partition + router settings.

Layout (docs/checkpoints.md):

    <root>/
      decentral.json        format, expert directories, partition / featurizer / tokenizer files,
                            router settings, priors w_k, mask id
      partition.npz         dfm.decentral.Partition.save (centroids, mean, sizes, config)
      featurizer.npz        optional: TextFeaturizer / PrecomputedFeaturizer.save (arrays + JSON meta,
                            no pickle; `dfm.decentral.features`). A legacy pickled featurizer is
                            refused (`CheckpointError`; it names the one-off conversion script)
      tokenizer/            optional: the tokenizer all experts share (AutoTokenizer directory); the
                            writer also copies it into every expert directory (so each expert loads
                            on its own in transformers)
      experts/expert_00/    config.json + model.safetensors, or model-0000i-of-0000n.safetensors +
                            model.safetensors.index.json over `max_shard_size` (an HF directory,
                            `dfm.hf.save_pretrained`) [+ tokenizer files]
      experts/expert_01/    ...

`decentral.json`:

    {"format": "dfm-decentralized", "version": 1,
     "experts": ["experts/expert_00", ...], "partition": "partition.npz",
     "featurizer": "featurizer.npz" | null, "tokenizer": "tokenizer" | null,
     "priors": [w_0, ...], "mask_id": null | int,
     "router": {"type": "centroid", "temperature": T, "top_k": k | null, "threshold": t | null}
             | {"type": "bayes"} | {"type": "uniform"}}

Router types: "centroid" = `CentroidRouter` (THEORY S12, S13; features -> weights), "bayes" =
`BayesFilterRouter.from_priors(priors)` (THEORY S9, the exact router of AR experts), "uniform" =
equal weights. The priors default to the partition's cluster sizes over their sum (the share of
the training data each expert saw).

`load_decentralized` validates `decentral.json` before loading anything (`CheckpointError` naming
the file and the field): format / version; `experts` a non-empty list of distinct relative paths
that stay inside `root` (no absolute path, no `..` escaping, no symbolic link leading out of
`root`; docs/reliability.md#security), as are `partition` and (when not
null) `featurizer` / `tokenizer`; `priors` (absent or null: the partition's sizes) K finite
non-negative numbers summing to 1 within 1e-6; `router.type` in `ROUTER_TYPES`, and for
"centroid": `temperature` (default 1) finite and > 0, `top_k` null or an int in [1, K],
`threshold` null or a number in [0, 1]; `mask_id` absent, null or an int >= 0.

A lost expert: `load_decentralized(root, missing_ok=True)` skips expert directories that do not
exist or hold no weights; `DecentralizedCheckpoint.experts` keeps None there, `.missing` / `.available`
say which, `.weights(...)` is renormalized over the available experts, and the library functions
take `available=model.available` (`dfm.decentral.ensemble_posterior_fn`,
`dfm.decentral.mixture_token_log_probs`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from dfm.decentral import (BayesFilterRouter, CentroidRouter, ExpertSpec, Partition, centroid_weights,
                           check_compatible_experts, uniform_weights)
from dfm.hf.export import DEFAULT_MAX_SHARD_SIZE, default_permissions, swap_into_place, save_pretrained
from dfm.hf.load import check_runtime_knobs, load_pretrained
from dfm.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError

MANIFEST = "decentral.json"
FORMAT = "dfm-decentralized"
VERSION = 1
ROUTER_TYPES = ("centroid", "bayes", "uniform")
FEATURIZER_FILE = "featurizer.npz"


@dataclasses.dataclass
class DecentralizedCheckpoint:
    """K experts ready for `dfm.decentral.ensemble_posterior_fn` / `mix_log_probs`.

    Attributes:
      experts: the K loaded models (`Decoder`s, or `MultimodalModel`s); None at the position of an
        expert that was missing (`load_decentralized(..., missing_ok=True)`).
      specs: one `ExpertSpec` each (vocabulary = logits width, mask id, tokenizer fingerprint); at a
        missing expert's position, the spec the available experts share.
      partition: the `Partition` the experts were trained on (K clusters).
      priors: `[K]` float64 w_k, summing to 1.
      router: `CentroidRouter`, `BayesFilterRouter`, or None for uniform weights.
      router_settings: the `router` object of `decentral.json`.
      featurizer: the fitted featurizer, or None.
      tokenizer_path: the shared tokenizer directory, or None.
      mask_id: the mask token id of masked experts, or None.
    """

    experts: list
    specs: list[ExpertSpec]
    partition: Partition
    priors: np.ndarray
    router: CentroidRouter | BayesFilterRouter | None
    router_settings: dict
    featurizer: Any = None
    tokenizer_path: Path | None = None
    mask_id: int | None = None

    @property
    def num_experts(self) -> int:
        """K, missing experts included."""
        return len(self.experts)

    @property
    def available(self) -> np.ndarray:
        """`[K]` bool: the experts that were loaded (pass as `available=` to the library functions)."""
        return np.array([m is not None for m in self.experts], dtype=bool)

    @property
    def missing(self) -> tuple[int, ...]:
        """The positions of the experts that were missing at load time (() when none)."""
        return tuple(i for i, m in enumerate(self.experts) if m is None)

    def weights(self, features: Any = None, *, batch: int | None = None):
        """Fixed router weights `[batch, K]`: centroid routing of `features [batch, D]`, or uniform.

        With missing experts the weights are 0 on them and renormalized over the available ones,
        before the router's top-k (centroid: `softmax(cosine / T)` over the available experts, then
        top-k and threshold; uniform: `1 / #available`). The Bayes filter is restricted by the
        library functions: pass `router` and `available=self.available` to them.

        Raises ValueError for the Bayes filter (its weights depend on the tokens: use `router` with
        `ensemble_posterior_fn`), or when neither `features` nor `batch` is given.
        """
        if self.router is not None and self.router.uses_evidence:
            raise ValueError("router: the Bayes filter has no fixed weights (pass it to ensemble_posterior_fn)")
        available = self.available
        if self.router is not None:
            if features is None:
                raise ValueError("features: the centroid router needs conditioning features [batch, D]")
            if available.all():
                return self.router.route(features)
            cosines = np.where(available, self.router.similarities(features), -np.inf)
            return centroid_weights(jnp.asarray(cosines, jnp.float32), self.router.temperature,
                                    self.router.top_k, self.router.threshold)
        if batch is None:
            batch = np.shape(features)[0] if features is not None else None
        if batch is None:
            raise ValueError("batch: give the batch size (or features) for uniform weights")
        if available.all():
            return uniform_weights(batch, self.num_experts)
        return jnp.broadcast_to(jnp.asarray(available / available.sum(), jnp.float32), (batch, self.num_experts))


def _output_vocab(model: Any) -> tuple[int, bool]:
    config = getattr(getattr(model, "language_model", model), "config")
    return config.num_outputs, config.causal


def _router_settings(router: Any) -> dict:
    if router is None or router == "uniform":
        return {"type": "uniform"}
    if router == "bayes":
        return {"type": "bayes"}
    if isinstance(router, dict) and router.get("type") in ROUTER_TYPES:
        return dict(router)
    if hasattr(router, "settings"):
        try:
            return router.settings()
        except ValueError as e:
            raise ValueError(f"router: {e}") from None
    raise ValueError(f"router: expected a CentroidRouter, BayesFilterRouter, 'bayes', 'uniform' or a "
                     f"settings dict with type in {ROUTER_TYPES}, got {router!r}")


def save_decentralized(root: str | os.PathLike, experts: Sequence[Any], partition: Partition, *,
                       router: Any = "uniform", priors: Any = None, featurizer: Any = None,
                       tokenizer: Any = None, mask_id: int | None = None, dtype: str | None = None,
                       overwrite: bool = False, max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write K experts, the partition and the router settings as the directory `root` (module doc).

    Args:
      experts: K models (`Decoder` / `MultimodalModel`), expert k trained on cluster k.
      partition: the fitted `Partition` (K clusters).
      router: `CentroidRouter` (its temperature / top_k / threshold are saved), `BayesFilterRouter`
        or "bayes" (the priors are saved), "uniform", or a settings dict.
      priors: `[K]` w_k; default the partition's sizes (for a `BayesFilterRouter`: its priors).
      featurizer: optional fitted featurizer with `save(path)` (`featurizer.npz`, arrays + JSON).
      tokenizer: optional shared tokenizer (object with `save_pretrained`, or a directory); saved
        as `tokenizer/` and into every expert directory.
      max_shard_size: the experts' largest weights file (`dfm.hf.save_pretrained`; None: one file).
      mask_id: mask token of masked experts; default `vocab` (= the logits width) for
        bidirectional experts, None for causal ones.
      dtype: store the experts' parameters in this dtype (None: as they are).
      overwrite: replace an existing non-empty `root`.

    Raises:
      ValueError: K differs from the partition's clusters, experts of different output sizes or
        kinds, bad priors or router. FileExistsError: `root` not empty and not `overwrite`.
    """
    root = Path(root)
    experts = list(experts)
    k = partition.num_clusters
    if len(experts) != k:
        raise ValueError(f"experts: {len(experts)} experts for a partition of {k} clusters")
    vocabs = {_output_vocab(m) for m in experts}
    if len(vocabs) != 1:
        raise ValueError(f"experts: differing (output vocabulary, causal) across experts: {sorted(vocabs)}")
    vocab, causal = vocabs.pop()
    if mask_id is None and not causal:
        mask_id = vocab
    settings = _router_settings(router)
    own = None if isinstance(router, (str, dict)) else getattr(router, "partition", None)   # a centroid router
    if own is not None and not (
            np.array_equal(np.asarray(own.centroids), np.asarray(partition.centroids))
            and (own.mean is None) == (partition.mean is None)
            and (partition.mean is None or np.array_equal(own.mean, partition.mean))):
        raise ValueError("router: its partition differs from `partition` (the saved router is rebuilt on "
                         "`partition`, so it would change)")
    if priors is None and settings["type"] == "bayes" and getattr(router, "log_priors", None) is not None:
        priors = np.exp(np.asarray(router.log_priors, np.float64))
    priors = _check_priors(partition.sizes if priors is None else priors, k, "priors")
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise FileExistsError(f"{root}: exists and is not empty (pass overwrite=True to replace it)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp"))
    try:
        names = [f"experts/expert_{i:02d}" for i in range(k)]
        if tokenizer is not None:
            (tmp / "tokenizer").mkdir()
            if isinstance(tokenizer, (str, os.PathLike)):
                shutil.copytree(tokenizer, tmp / "tokenizer", dirs_exist_ok=True)
            else:
                tokenizer.save_pretrained(os.fspath(tmp / "tokenizer"))
        for name, model in zip(names, experts):
            save_pretrained(model, tmp / name, dtype=dtype, max_shard_size=max_shard_size,
                            tokenizer=tmp / "tokenizer" if tokenizer is not None else None)
        partition.save(tmp / "partition.npz")
        if featurizer is not None:
            featurizer.save(tmp / FEATURIZER_FILE)
        manifest = {"format": FORMAT, "version": VERSION, "experts": names, "partition": "partition.npz",
                    "featurizer": FEATURIZER_FILE if featurizer is not None else None,
                    "tokenizer": "tokenizer" if tokenizer is not None else None,
                    "priors": [float(p) for p in priors], "mask_id": mask_id, "router": settings}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        default_permissions(tmp)
        swap_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _check_priors(priors: Any, k: int, name: str) -> np.ndarray:
    p = np.asarray(priors, dtype=np.float64)
    if p.shape != (k,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{name}: expected {k} non-negative finite weights with a positive sum, got {priors!r}")
    return p / p.sum()


def _fail(file: Path, field: str, message: str) -> CheckpointError:
    return CheckpointError(f"{file}: {field!r} {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _relative_path(value: Any, file: Path, field: str) -> str:
    """A path relative to the model directory that stays inside it; returns it normalized."""
    if not isinstance(value, str) or not value:
        raise _fail(file, field, f"must be a non-empty relative path string, got {value!r}")
    text = value.replace("\\", "/")
    if text.startswith("/") or posixpath.isabs(text) or os.path.isabs(value) or (len(text) > 1 and text[1] == ":"):
        raise _fail(file, field, f"must be a path relative to the model directory, got absolute {value!r}")
    norm = posixpath.normpath(text)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise _fail(file, field, f"must stay inside the model directory, got {value!r}")
    root = os.path.realpath(file.parent)
    if os.path.commonpath([root, os.path.realpath(file.parent / norm)]) != root:
        raise _fail(file, field, f"must stay inside the model directory, got {value!r}, a symbolic link to "
                                 f"{os.path.realpath(file.parent / norm)!r}")
    return norm


def _validate_paths(manifest: dict, file: Path) -> None:
    """CheckpointError naming `file` and the field: `experts` and the other paths (module docstring)."""
    experts = manifest["experts"]
    if not isinstance(experts, list) or not experts:
        raise _fail(file, "experts", "must be a non-empty list of directories")
    seen: dict[str, int] = {}
    for i, name in enumerate(experts):
        norm = _relative_path(name, file, f"experts[{i}]")
        if norm in seen:
            raise _fail(file, f"experts[{i}]", f"{name!r} repeats experts[{seen[norm]}] (each expert needs "
                                               f"its own directory)")
        seen[norm] = i
    _relative_path(manifest["partition"], file, "partition")
    for field in ("featurizer", "tokenizer"):
        if manifest.get(field) is not None:
            _relative_path(manifest[field], file, field)


def _validate_settings(manifest: dict, file: Path) -> None:
    """CheckpointError naming `file` and the field: priors, mask id and router (module docstring)."""
    k = len(manifest["experts"])
    priors = manifest.get("priors")
    if priors is not None:
        if not isinstance(priors, list) or len(priors) != k or not all(_is_number(p) for p in priors):
            raise _fail(file, "priors", f"must be a list of {k} numbers (one per expert), got {priors!r}")
        if not all(math.isfinite(p) and p >= 0 for p in priors):
            raise _fail(file, "priors", f"must be finite and non-negative, got {priors!r}")
        if abs(math.fsum(priors) - 1.0) > 1e-6:
            raise _fail(file, "priors", f"must sum to 1 (within 1e-6), got sum {math.fsum(priors)!r}")
    mask_id = manifest.get("mask_id")
    if mask_id is not None and not (_is_int(mask_id) and mask_id >= 0):
        raise _fail(file, "mask_id", f"must be null or an integer >= 0, got {mask_id!r}")
    router = manifest["router"]
    kind = router.get("type") if isinstance(router, dict) else None
    if kind not in ROUTER_TYPES:
        raise CheckpointError(f"{file}: router type {kind!r} is not one of {ROUTER_TYPES}")
    if kind == "centroid":
        temperature = router.get("temperature", 1.0)
        if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
            raise _fail(file, "router.temperature", f"must be a finite number > 0, got {temperature!r}")
        top_k = router.get("top_k")
        if top_k is not None and not (_is_int(top_k) and 1 <= top_k <= k):
            raise _fail(file, "router.top_k", f"must be null or an integer in [1, {k}], got {top_k!r}")
        threshold = router.get("threshold")
        if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
            raise _fail(file, "router.threshold", f"must be null or a number in [0, 1], got {threshold!r}")


def _has_weights(directory: Path) -> bool:
    return directory.is_dir() and ((directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file())


def _read_manifest(root: Path) -> tuple[dict, Path]:
    file = root / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file (not a decentralized model directory)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: 'format' must be {FORMAT!r}")
    version = manifest.get("version")
    if not _is_int(version) or version != VERSION:
        raise CheckpointError(f"{file}: 'version' {version!r} is not supported (this reader: {VERSION})")
    for field in ("experts", "partition", "router"):
        if field not in manifest:
            raise CheckpointError(f"{file}: missing field {field!r}")
    _validate_paths(manifest, file)
    return manifest, file


def load_decentralized(root: str | os.PathLike, *, dtype: str | None = None, missing_ok: bool = False,
                       matmul_precision: str = "highest", attention: str = "auto") -> DecentralizedCheckpoint:
    """Load a directory written by `save_decentralized` (or by hand, following the module doc).

    Args:
      root: the decentralized model directory.
      dtype: computation / parameter dtype of the experts (None: as stored; `load_pretrained`).
      missing_ok: skip expert directories that do not exist or hold no weights (no
        `model.safetensors` nor index): `experts` keeps None at their positions, `.missing` and
        `.available` say which (module docstring). False: such a directory is an error.
      matmul_precision, attention: the experts' runtime knobs (`load_pretrained`): "highest" by
        default, full float32 matmuls on GPU / TPU as on CPU (training code may pass "default"
        for speed; bf16 compute is unaffected); "auto" attention kernel.

    Returns:
      `DecentralizedCheckpoint` with experts, specs, partition, priors (all K, as stored), router,
      featurizer.

    Raises:
      CheckpointError: missing / invalid `decentral.json` (naming it and the field, module
        docstring), an expert count that differs from the partition's clusters, a missing
        partition or featurizer file, any expert's checkpoint error (naming that expert's
        directory or file and key; a missing directory without `missing_ok`), or, with
        `missing_ok`, no expert at all.
      ValueError: experts whose vocabularies, mask ids or tokenizers differ
        (`check_compatible_experts`); an unknown `matmul_precision` / `attention`.
    """
    from dfm.decentral.features import PrecomputedFeaturizer, TextFeaturizer
    from dfm.hf.tokenizers import load_tokenizer, tokenizer_fingerprint

    check_runtime_knobs(attention, matmul_precision)
    root = Path(root)
    manifest, file = _read_manifest(root)
    partition_file = root / str(manifest["partition"])
    if not partition_file.is_file():
        raise CheckpointError(f"{file}: partition file {partition_file} does not exist")
    partition = Partition.load(partition_file)
    k = len(manifest["experts"])
    if partition.num_clusters != k:
        raise CheckpointError(f"{file}: {k} experts but {partition_file.name} has {partition.num_clusters} clusters")
    _validate_settings(manifest, file)
    try:
        stored = manifest.get("priors")
        priors = _check_priors(partition.sizes if stored is None else stored, k, "priors")
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    tokenizer_path = root / manifest["tokenizer"] if manifest.get("tokenizer") else None
    shared = tokenizer_fingerprint(load_tokenizer(tokenizer_path)) if tokenizer_path else None
    expert_dirs = [root / str(name) for name in manifest["experts"]]
    present = [not missing_ok or _has_weights(d) for d in expert_dirs]
    if not any(present):
        raise CheckpointError(f"{file}: none of the {k} expert directories exists with weights "
                              f"(missing_ok=True needs at least one), e.g. {expert_dirs[0]}")
    experts = [load_pretrained(d, dtype=dtype, matmul_precision=matmul_precision, attention=attention) if ok
               else None for d, ok in zip(expert_dirs, present)]
    mask_id = manifest.get("mask_id")

    def fingerprint(directory: Path) -> str | None:   # an expert's own tokenizer files, else the shared one
        own = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return tokenizer_fingerprint(load_tokenizer(directory)) if own else shared

    loaded = {i: ExpertSpec(vocab_size=_output_vocab(m)[0], mask_id=mask_id, tokenizer_fingerprint=fingerprint(d))
              for i, (m, d) in enumerate(zip(experts, expert_dirs)) if m is not None}
    check_compatible_experts(list(loaded.values()))
    common = next(iter(loaded.values()))
    specs = [loaded.get(i, common) for i in range(k)]
    settings = manifest["router"]
    kind = settings["type"]
    if kind == "centroid":
        router = CentroidRouter(partition, temperature=float(settings.get("temperature", 1.0)),
                                top_k=settings.get("top_k"), threshold=settings.get("threshold"))
    elif kind == "bayes":
        router = BayesFilterRouter.from_priors(priors)
    else:
        router = None
    featurizer = None
    if manifest.get("featurizer"):
        path = root / manifest["featurizer"]
        if not path.is_file():
            raise CheckpointError(f"{file}: featurizer file {path} does not exist")
        errors = []
        for cls in (TextFeaturizer, PrecomputedFeaturizer):
            try:
                featurizer = cls.load(path)
                break
            except ValueError as e:
                errors.append(str(e))
                if "pickled featurizer" in str(e):
                    break
        if featurizer is None:
            raise CheckpointError(f"{path}: neither a TextFeaturizer nor a PrecomputedFeaturizer "
                                  f"({'; '.join(errors)})")
    return DecentralizedCheckpoint(experts=experts, specs=specs, partition=partition, priors=priors,
                              router=router, router_settings=dict(settings), featurizer=featurizer,
                              tokenizer_path=tokenizer_path, mask_id=mask_id)
