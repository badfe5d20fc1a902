"""Short-answer VQA benchmarks in their official layouts: VQAv2, TextVQA (metric "vqa", VQA
accuracy over the 10 human answers) and GQA (metric "exact").

Each converter returns ``(records, skipped)``: the eval records (`common.record`) in file order
and ``{reason: count}`` of the questions left out (none here: every question of these files is
converted; a question without answers, e.g. a test split, is an error naming it).
"""
from __future__ import annotations

from pathlib import Path

from experiments.mllm.convert.common import (
    SHORT_ANSWER,
    Images,
    answer_list,
    field,
    most_common,
    read_json,
    record,
    text_field,
)


def _split_of(data: dict, split: str | None, path: Path) -> str:
    """The COCO split of a VQAv2 file ("val2014"): `split`, else the file's "data_subtype"."""
    split = split or data.get("data_subtype")
    if not isinstance(split, str) or not split:
        raise ValueError(f"{path}: no 'data_subtype' in the file; give the COCO split (--split val2014)")
    return split


def vqav2(images: Images, *, questions, annotations, split: str | None = None, task: str | None = None,
          suffix: str | None = None) -> tuple[list[dict], dict]:
    """VQAv2 (and VQAv1 / OK-VQA, same layout) -> records with the 10 human "answers".

    Files: ``v2_OpenEnded_mscoco_<split>_questions.json`` (``{"data_subtype": "val2014",
    "questions": [{"image_id", "question", "question_id"}]}``) and
    ``v2_mscoco_<split>_annotations.json`` (``{"annotations": [{"question_id", "image_id",
    "answers": [{"answer", "answer_confidence", "answer_id"}], "multiple_choice_answer",
    "answer_type", "question_type"}]}``); images ``COCO_<split>_<image_id:012d>.jpg`` in `images`.

    The reference answer (gpt turn) is "multiple_choice_answer" (the most frequent human answer);
    "answers" are the 10 human answers, "answer_type" (yes/no, number, other) is kept.
    Task ``vqav2_<split>``.

    Raises:
      ValueError: a file not in this layout, a question without an annotation, or an image and
        question disagreeing on the image id (file and question id named).
    """
    qpath, apath = Path(questions), Path(annotations)
    qdata, adata = read_json(qpath, "VQAv2 questions"), read_json(apath, "VQAv2 annotations")
    qlist, alist = field(qdata, "questions", list, str(qpath)), field(adata, "annotations", list, str(apath))
    split = _split_of(qdata, split, qpath)
    task = task or f"vqav2_{split}"
    anns = {}
    for i, ann in enumerate(alist):
        where = f"{apath}: annotations[{i}]"
        anns[field(ann, "question_id", int, where)] = (ann, where)
    out = []
    for i, q in enumerate(qlist):
        where = f"{qpath}: questions[{i}]"
        qid = field(q, "question_id", int, where)
        where = f"{qpath}: question {qid}"
        image_id = field(q, "image_id", int, where)
        if qid not in anns:
            raise ValueError(f"{where}: no annotation in {apath} (a test split has none: it is scored by the "
                             "evaluation server, not here)")
        ann, awhere = anns[qid]
        if field(ann, "image_id", int, awhere) != image_id:
            raise ValueError(f"{where}: image_id {image_id} but its annotation ({awhere}) says {ann['image_id']}")
        answers = [text_field(a, "answer", f"{awhere}: answers[{j}]")
                   for j, a in enumerate(field(ann, "answers", list, awhere))]
        if not answers:
            raise ValueError(f"{awhere}: 'answers' is empty")
        reference = ann.get("multiple_choice_answer")
        reference = reference.strip() if isinstance(reference, str) and reference.strip() else most_common(answers)
        image = images.path(f"COCO_{split}_{image_id:012d}.jpg", where)
        out.append(record(f"{task}:{qid}", image, text_field(q, "question", where), reference, task, "vqa",
                          SHORT_ANSWER if suffix is None else suffix, answers=answers,
                          answer_type=ann.get("answer_type"), question_id=qid))
    return out, {}


def textvqa(images: Images, *, questions, task: str | None = None,
            suffix: str | None = None) -> tuple[list[dict], dict]:
    """TextVQA -> records with the 10 human "answers" (metric "vqa").

    File: ``TextVQA_0.5.1_<split>.json`` (``{"dataset_type": "val", "data": [{"question_id",
    "question", "image_id", "answers": [10 strings], ...}]}``); images ``<image_id>.jpg`` in
    `images` (``train_images/``: val uses the train images). Reference answer: the most frequent
    of the 10 (ties: the first given). Task ``textvqa_<dataset_type>``.

    Raises:
      ValueError: not this layout, or a question without answers (the test split).
    """
    path = Path(questions)
    data = read_json(path, "TextVQA")
    items = field(data, "data", list, str(path))          # a file that is not {"data": [...]}: ValueError naming it
    task = task or f"textvqa_{data.get('dataset_type') or 'val'}"
    out = []
    for i, q in enumerate(items):
        where = f"{path}: data[{i}]"
        qid = field(q, "question_id", int, where)
        where = f"{path}: question {qid}"
        answers = answer_list(q, "answers", where)
        image = images.path(f"{text_field(q, 'image_id', where)}.jpg", where)
        out.append(record(f"{task}:{qid}", image, text_field(q, "question", where), most_common(answers), task,
                          "vqa", SHORT_ANSWER if suffix is None else suffix, answers=answers, question_id=qid))
    return out, {}


def gqa(images: Images, *, questions, task: str | None = None,
        suffix: str | None = None) -> tuple[list[dict], dict]:
    """GQA -> records scored by exact match (metric "exact") against "answer".

    File: ``<split>_balanced_questions.json`` (``{question id: {"imageId", "question", "answer",
    "fullAnswer", ...}}``); images ``<imageId>.jpg`` in `images`. "fullAnswer" is kept (not
    scored). Task ``gqa_<file stem without _questions>``, e.g. ``gqa_testdev_balanced``.

    Raises:
      ValueError: not this layout (file and question id named).
    """
    path = Path(questions)
    data = read_json(path, "GQA questions")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: GQA questions must be a JSON object {{question id: question}}, "
                         f"got {type(data).__name__}")
    task = task or f"gqa_{path.stem.removesuffix('_questions')}"
    out = []
    for qid, q in data.items():
        where = f"{path}: question {qid!r}"
        image = images.path(f"{text_field(q, 'imageId', where)}.jpg", where)
        out.append(record(f"{task}:{qid}", image, text_field(q, "question", where), text_field(q, "answer", where),
                          task, "exact", SHORT_ANSWER if suffix is None else suffix,
                          full_answer=q.get("fullAnswer"), question_id=qid))
    return out, {}
