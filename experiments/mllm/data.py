"""Data stage of the multimodal job: records -> tokenizer, token arrays, image arrays (idempotent).

Records come from the default dataset (`experiments.mllm.dataset.build_default_dataset`, written in
the LLaVA format under ``<run>/data/default``) or from LLaVA / InternVL files named in `[data]`; the
same loader (`experiments.mllm.formats`) reads both. The pipeline needs exactly one image per record
(a record with none or several is an error naming it).

Written to ``<run>/data`` (atomically): ``arrays.npz`` (train `tokens [N, max_length]` int32,
`loss_mask [N, max_length]` bool, `image [N]` index into `images_train`; `images_<split>
[n_images, S, S, 3]` uint8), ``questions.json`` (val / test questions: the first turn of each record with
its reference answer(s), question type, pair id and image index), ``summary.json``; and the HF
tokenizer in ``<run>/tokenizer``.

With ``init_from`` (`experiments.mllm.pretrained`) the tokenizer is the checkpoint's (its chat
template and image-token layout, `dfm.prompts`, no BPE is trained) and the images are
resized to the checkpoint's image size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfm.hf.clip_features import image_stats
from dfm.models.vision import CLIP_MEAN, CLIP_STD
from dfm.prompts import IMAGE_TOKEN, TemplateError, encode_conversation, image_token_id, pad_rows
from experiments.engine.rundir import (arrays_digest, atomic_save_npz, atomic_write_json, load_npz, read_json,
                                       software_versions)
from experiments.engine.task import DataError as EngineDataError
from experiments.engine.tokenizer import load_tokenizer, save_tokenizer
from experiments.mllm import formats
from experiments.mllm.bpe import build_tokenizer
from experiments.mllm.dataset import build_default_dataset
from experiments.mllm.images import UnreadableImageError, load_image
from experiments.mllm.pretrained import RunTokenizer, read_checkpoint

SPLITS = ("train", "val", "test")


class DataError(EngineDataError):
    """The records cannot be used by the pipeline; the message names the record and file."""


def record_files(config, run_root: Path, log=print) -> dict[str, list]:
    """`{split: [Record, ...]}` for the config's data source (building the default dataset if needed)."""
    d = config.data
    if d.source == "default":
        out = Path(run_root) / "data" / "default"
        info = build_default_dataset(out, seed=config.seed, image_size=d.image_size,
                                     max_digits=d.max_digits or None, num_shapes=d.num_shapes,
                                     num_photos=d.num_photos)
        log(f"[data] default dataset in {out}: records {info['records']}, questions {info['questions']}")
        return {s: formats.load_llava(out / f"{s}.jsonl", out) for s in SPLITS}
    paths = {"train": d.train, "val": d.val or d.test, "test": d.test}
    if d.source == "llava":
        return {s: formats.load_llava(Path(p), Path(d.image_root or Path(p).parent),
                                      allow_outside_root=d.allow_outside_root) for s, p in paths.items()}
    out = {}
    for s, p in paths.items():
        groups = formats.load_internvl_meta(Path(p), allow_outside_root=d.allow_outside_root)
        out[s] = [r for name in sorted(groups) for r in groups[name]]
    return out


def _one_image(record, path_hint: str) -> Path:
    if len(record.images) != 1:
        raise DataError(f"{path_hint}: record {record.id!r} has {len(record.images)} images; the multimodal "
                        f"job needs exactly one image per record")
    return Path(record.images[0])


def _load_images(paths: list[Path], size: int, used_by: dict[str, str] | None = None) -> np.ndarray:
    """uint8 `[len(paths), size, size, 3]`; an unreadable image's error names the first record that
    uses it (`used_by`: path -> that record's `source`, "<file>: line 3: record 'id'")."""
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        try:
            out[i] = np.round(load_image(p, size) * 255.0).astype(np.uint8)
        except UnreadableImageError as e:
            where = (used_by or {}).get(str(p))
            raise UnreadableImageError(f"{where}: {e}" if where else str(e)) from None
    return out


def _question_rows(records, split: str, image_index: dict) -> list[dict]:
    """One question per record: its first human turn (which holds the `<image>`) and the answer."""
    rows = []
    for r in records:
        img = image_index[str(_one_image(r, split))]
        answer = r.turns[1].text.strip()
        rows.append({
            "id": r.id, "image": img, "question": r.turns[0].text.strip(), "answer": answer,
            "answers": list(r.extra.get("answers") or [answer]),
            "question_type": str(r.extra.get("question_type", "all")),
            "pair_id": r.extra.get("pair_id"), "source": str(r.extra.get("source", "")),
            # per-record scorer selection and its inputs (experiments.mllm.scorers); width / height:
            # the original image's pixel size, for RefCOCO boxes
            **{k: r.extra[k] for k in ("task", "metric", "choices", "bbox", "bbox_format", "width", "height")
               if k in r.extra}})
    return rows


def prepare_data(config, run_root: Path, num_image_tokens: int, log=print) -> dict:
    """Build (once) the tokenizer and arrays of the run; returns the summary dict.

    Raises:
      DataError / formats.FormatError / TemplateError: unusable records (naming record and file).
    """
    run_root = Path(run_root)
    data_dir = run_root / "data"
    summary_path = data_dir / "summary.json"
    if summary_path.is_file():
        return read_json(summary_path)
    t0 = time.perf_counter()
    records = record_files(config, run_root, log)
    if not records["train"]:
        raise DataError("data: no train records")
    for split in ("val", "test"):
        if not records[split]:
            raise DataError(f"data: no {split} records (the {split} split must not be empty)")
    for split in SPLITS:
        for r in records[split]:
            if IMAGE_TOKEN not in r.turns[0].text:
                raise DataError(f"{split}: record {r.id!r}: the <image> placeholder must be in the first human turn")
    if config.init_from:
        ckpt = read_checkpoint(config.init_from)
        saved = RunTokenizer(ckpt)
        tokenizer, image_size = saved.tokenizer, ckpt.image_size
    else:
        tokenizer = saved = build_tokenizer([t.text for r in records["train"] for t in r.turns], config.data.vocab_size)
        image_size = config.data.image_size
    img_id = image_token_id(tokenizer)
    arrays, images = {}, {}
    for split in SPLITS:
        paths = sorted({str(_one_image(r, split)) for r in records[split]})
        images[split] = {p: i for i, p in enumerate(paths)}
        used_by = {}
        for r in records[split]:
            used_by.setdefault(str(_one_image(r, split)), r.source)
        arrays[f"images_{split}"] = _load_images([Path(p) for p in paths], image_size, used_by)
    ids, masks, img = [], [], []
    for r in records["train"]:
        try:
            seq, mask = encode_conversation(tokenizer, r.turns, config.data.max_length, num_image_tokens, r.id)
        except TemplateError as exc:
            raise DataError(f"train: {exc}") from None
        if int((seq == img_id).sum()) != num_image_tokens:   # the scatter would shift images across rows
            raise DataError(f"train: record {r.id!r}: {int((seq == img_id).sum())} image tokens after layout, "
                            f"expected {num_image_tokens} (exactly one <image>, in the first turn)")
        ids.append(seq)
        masks.append(mask)
        img.append(images["train"][str(_one_image(r, "train"))])
    L = config.data.max_length
    arrays["tokens"] = pad_rows(ids, L, tokenizer.pad_token_id)
    arrays["loss_mask"] = pad_rows(masks, L, False, bool)
    arrays["image"] = np.asarray(img, np.int64)
    atomic_save_npz(data_dir / "arrays.npz", **arrays)
    atomic_write_json(data_dir / "train_sources.json",
                      [str(r.extra.get("source") or r.extra.get("question_type") or "all") for r in records["train"]])
    questions = {s: _question_rows(records[s], s, images[s]) for s in ("val", "test")}
    atomic_write_json(data_dir / "questions.json", questions)
    save_tokenizer(saved, run_root / "tokenizer")   # last before the summary: a failed run leaves none
    types = sorted({q["question_type"] for q in questions["test"]})
    summary = {
        "vocab_size": len(tokenizer), "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id, "image_token_id": img_id,
        "num_image_tokens": num_image_tokens, **({"init_from": config.init_from} if config.init_from else {}),
        **dict(zip(("image_mean", "image_std"), map(list, pixel_stats(config)))),
        "records": {s: len(records[s]) for s in SPLITS},
        "images": {s: int(arrays[f"images_{s}"].shape[0]) for s in SPLITS},
        "train_sequences": len(ids), "train_answer_tokens": int(arrays["loss_mask"].sum()),
        "questions": {s: len(questions[s]) for s in ("val", "test")},
        "test_question_types": {t: sum(q["question_type"] == t for q in questions["test"]) for t in types},
        "arrays_sha256": arrays_digest(arrays), "versions": software_versions(),
        "wall_time_s": time.perf_counter() - t0,
    }
    atomic_write_json(summary_path, summary)
    log(f"[data] {summary['records']} records, {summary['train_sequences']} train sequences, "
        f"vocab {summary['vocab_size']}, {num_image_tokens} image tokens per image")
    return summary


def load_arrays(run_root: Path) -> dict[str, np.ndarray]:
    """The arrays written by `prepare_data`."""
    return load_npz(Path(run_root) / "data" / "arrays.npz")


def load_questions(run_root: Path) -> dict[str, list[dict]]:
    """`{"val": rows, "test": rows}` written by `prepare_data`."""
    return read_json(Path(run_root) / "data" / "questions.json")


def tokenizer_of(run_root: Path):
    """The run's tokenizer (`AutoTokenizer` from ``<run>/tokenizer``)."""
    return load_tokenizer(Path(run_root) / "tokenizer")


def pixel_stats(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`(image_mean, image_std)` of the run's pixels: the ``init_from`` checkpoint's image processor
    (`dfm.hf.clip_features.image_stats`: ``preprocessor_config.json``; InternVL's conversions use
    ImageNet's), else CLIP's (models trained from scratch here)."""
    if not config.init_from:
        return CLIP_MEAN, CLIP_STD
    return image_stats(config.init_from)


@dataclass(frozen=True)
class MultimodalData:
    """Everything the stages read of the data stage, loaded once (`load_data`).

    Attributes:
      summary: ``data/summary.json`` (vocab size, special and image token ids, sizes).
      arrays: `load_arrays` (train tokens, loss mask, image index; images of every split).
      questions: `load_questions` (val / test questions).
      tokenizer: the run's tokenizer.
      train_sources: the source (digits, shapes, photos, ...) of every train conversation.
    """

    summary: dict
    arrays: dict
    questions: dict
    tokenizer: object
    train_sources: list

    @property
    def vocab_size(self) -> int:
        return int(self.summary["vocab_size"])

    @property
    def num_train_examples(self) -> int:
        """Training examples (train conversations) of stage 1 and the dense model."""
        return len(self.arrays["tokens"])

    @property
    def num_train_units(self) -> int:
        """Train images (what the partition clusters)."""
        return len(self.arrays["images_train"])

    @property
    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`(image_mean, image_std)` the towers read their pixels with (`pixel_stats` at the data
        stage; CLIP's for a run directory written before they were recorded)."""
        return (tuple(self.summary.get("image_mean", CLIP_MEAN)), tuple(self.summary.get("image_std", CLIP_STD)))

    @property
    def image_token_id(self) -> int:
        return int(self.summary["image_token_id"])


def load_data(config, run_root: Path, num_image_tokens: int, log=print) -> MultimodalData:
    """The data stage (if not done; `prepare_data`), then its arrays, questions and tokenizer."""
    summary = prepare_data(config, run_root, num_image_tokens, log=log)
    sources = Path(run_root) / "data" / "train_sources.json"
    return MultimodalData(summary, load_arrays(run_root), load_questions(run_root), tokenizer_of(run_root),
                          read_json(sources) if sources.is_file() else [])
