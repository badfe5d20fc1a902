"""Benchmarks in their official layouts -> the multimodal job's eval JSONL (``dfm data convert``).

`CONVERTERS` maps a benchmark name to its `Converter`; `convert` runs one and writes the records
atomically. Every record is a single-turn LLaVA record that `experiments.mllm.formats.load_llava`
reads, carrying the fields its scorer (`experiments.mllm.scorers.score_record`) consumes: "task"
and "metric" always, and "answers", "choices", "bbox" / "bbox_format" / "width" / "height" or
"pair_id" as the metric needs (docs/benchmarks.md shows one record per metric).

Modules: `common` (reading, image paths, the record), `vqa` (VQAv2, TextVQA, GQA), `choice`
(ScienceQA), `yesno` (POPE, MME), `grounding` (RefCOCO family), `documents` (ChartQA, DocVQA),
`cli` (the ``data convert`` command).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from experiments.mllm.convert import choice, documents, grounding, vqa, yesno
from experiments.mllm.convert.common import Images, write_jsonl


@dataclass(frozen=True)
class Converter:
    """One benchmark's converter.

    Attributes:
      function: ``function(images: Images, **inputs, task=, suffix=) -> (records, skipped)``.
      required: the input files it needs (keyword names = CLI flags: "questions" -> ``--questions``).
      optional: the inputs it also takes.
      metric: the scorer of its records (`experiments.mllm.scorers.METRICS`).
      files: the official files, for help texts.
    """

    function: Callable
    required: tuple[str, ...]
    optional: tuple[str, ...]
    metric: str
    files: str


CONVERTERS: dict[str, Converter] = {
    "vqav2": Converter(vqa.vqav2, ("questions", "annotations"), ("split",), "vqa",
                       "--questions v2_OpenEnded_mscoco_val2014_questions.json --annotations "
                       "v2_mscoco_val2014_annotations.json --images val2014/"),
    "gqa": Converter(vqa.gqa, ("questions",), (), "exact",
                     "--questions testdev_balanced_questions.json --images images/"),
    "textvqa": Converter(vqa.textvqa, ("questions",), (), "vqa",
                         "--questions TextVQA_0.5.1_val.json --images train_images/"),
    "scienceqa": Converter(choice.scienceqa, ("questions",), ("splits", "split"), "mc",
                           "--questions problems.json [--splits pid_splits.json] [--split test] --images images/"),
    "pope": Converter(yesno.pope, ("questions",), (), "pope",
                      "--questions coco_pope_random.json --images val2014/"),
    "mme": Converter(yesno.mme, (), ("category",), "mme",
                     "--images MME_Benchmark_release_version/ [--category artwork,OCR,...]"),
    "refcoco": Converter(grounding.refcoco, ("questions", "annotations"), ("split",), "refcoco",
                         "--questions refs_unc.jsonl (exported from refs(unc).p) --annotations instances.json "
                         "--split val --images train2014/"),
    "chartqa": Converter(documents.chartqa, ("questions",), (), "relaxed",
                         "--questions test/test_human.json --images test/png/"),
    "docvqa": Converter(documents.docvqa, ("questions",), (), "anls",
                        "--questions val/val_v1.0.json --images val/"),
}

#: every input keyword any converter takes (the CLI's per-benchmark flags)
INPUTS = ("questions", "annotations", "splits", "split", "category")


def convert(name: str, output: str | os.PathLike, *, images: str | os.PathLike,
            image_root: str | os.PathLike | None = None, check_images: bool = True, task: str | None = None,
            suffix: str | None = None, **inputs) -> dict:
    """Convert benchmark `name`'s official files into the eval JSONL `output` (written atomically:
    a temporary file beside it, then ``os.replace``; nothing is written on an error).

    Args:
      name: a key of `CONVERTERS`.
      output: the JSONL file to write.
      images: the benchmark's image folder (for MME: the ``MME_Benchmark_release_version`` folder).
      image_root: the folder the records' image paths are relative to, the job's ``[data]
        image_root`` (default `images`); `images` must be inside it.
      check_images: require every image a record names to exist.
      task: the records' "task" (default: per converter, e.g. ``vqav2_val2014``; for MME a prefix).
      suffix: text appended to every question (default: the instruction LLaVA-1.5 / InternVL use for
        that benchmark; "" for none).
      inputs: the converter's files and options (`Converter.required` / `optional`): questions,
        annotations, splits, split, category. None values count as not given.

    Returns:
      {"benchmark", "output", "records", "skipped": {reason: count}, "metric", "tasks": [...],
      "image_root"}.

    Raises:
      ValueError: an unknown benchmark, a missing or unexpected input, or an input file not in the
        official layout (the message names the file and the record).
    """
    if name not in CONVERTERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(CONVERTERS)}")
    conv = CONVERTERS[name]
    given = {k: v for k, v in inputs.items() if v is not None}
    extra = sorted(set(given) - set(conv.required) - set(conv.optional))
    if extra:
        takes = ", ".join(f"--{k}" for k in conv.required + conv.optional) or "only --images"
        raise ValueError(f"{name}: does not take {', '.join('--' + k for k in extra)} (it takes {takes})")
    missing = [k for k in conv.required if k not in given]
    if missing:
        raise ValueError(f"{name}: needs {', '.join('--' + k for k in missing)} ({conv.files})")
    where = Images(images, image_root, check_images)
    records, skipped = conv.function(where, task=task, suffix=suffix, **given)
    if not records:
        raise ValueError(f"{name}: the input holds no question to convert")
    n = write_jsonl(records, output)
    return {"benchmark": name, "output": str(output), "records": n, "skipped": dict(skipped),
            "metric": conv.metric, "tasks": sorted({r["task"] for r in records}), "image_root": str(where.root)}
