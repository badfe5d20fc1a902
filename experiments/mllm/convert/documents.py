"""Chart and document benchmarks in their official layouts: ChartQA (metric "relaxed": numbers
within 5% of the label, text exactly, case-insensitive) and DocVQA (metric "anls": ANLS, tau 0.5).

Each converter returns ``(records, skipped)`` as `experiments.mllm.convert.vqa` does.
"""
from __future__ import annotations

from pathlib import Path

from experiments.mllm.convert.common import (
    SHORT_ANSWER,
    Images,
    answer_list,
    field,
    read_json,
    record,
    text_field,
)


def chartqa(images: Images, *, questions, task: str | None = None,
            suffix: str | None = None) -> tuple[list[dict], dict]:
    """ChartQA -> records with the "label" as the only reference.

    File: ``test_human.json`` / ``test_augmented.json`` (``[{"imgname", "query", "label"}]``);
    images ``<imgname>`` in `images` (``ChartQA Dataset/test/png``). Task ``chartqa_<file stem>``
    (``chartqa_test_human``); ids ``<task>:<index in the file>`` (the file has no question ids).

    Raises:
      ValueError: not this layout (file and index named).
    """
    path = Path(questions)
    data = read_json(path, "ChartQA")
    if not isinstance(data, list):
        raise ValueError(f"{path}: ChartQA must be a JSON list of {{imgname, query, label}}, got {type(data).__name__}")
    task = task or f"chartqa_{path.stem}"
    out = []
    for i, q in enumerate(data):
        where = f"{path}: index {i}"
        label = field(q, "label", (str, int, float), where)
        label = str(label).strip()
        if not label:
            raise ValueError(f"{where}: 'label' is empty")
        image = images.path(text_field(q, "imgname", where), where)
        out.append(record(f"{task}:{i}", image, text_field(q, "query", where), label, task, "relaxed",
                          SHORT_ANSWER if suffix is None else suffix, answers=[label]))
    return out, {}


def docvqa(images: Images, *, questions, task: str | None = None,
           suffix: str | None = None) -> tuple[list[dict], dict]:
    """DocVQA (single page) -> records with every accepted answer in "answers".

    File: ``val_v1.0.json`` (``{"dataset_split": "val", "data": [{"questionId", "question",
    "image": "documents/<name>.png", "answers": [...], ...}]}``); images named by "image" relative
    to `images` (the folder holding ``documents/``). Reference answer: the first answer. Task
    ``docvqa_<dataset_split>``. The test split has no answers (scored by the RRC server): an error.

    Raises:
      ValueError: not this layout, or a question without answers (file and question id named).
    """
    path = Path(questions)
    data = read_json(path, "DocVQA")
    items = field(data, "data", list, str(path))
    task = task or f"docvqa_{data.get('dataset_split') or 'val'}"
    out = []
    for i, q in enumerate(items):
        where = f"{path}: data[{i}]"
        qid = field(q, "questionId", (int, str), where)
        where = f"{path}: question {qid}"
        answers = answer_list(q, "answers", where)
        image = images.path(text_field(q, "image", where), where)
        out.append(record(f"{task}:{qid}", image, text_field(q, "question", where), answers[0], task, "anls",
                          SHORT_ANSWER if suffix is None else suffix, answers=answers, question_id=qid))
    return out, {}
