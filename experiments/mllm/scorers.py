"""Benchmark scorers beyond VQA / MME, each a port of the benchmark's official scoring rule, and a
dispatcher that picks the scorer per record from its ``metric`` (or ``task``) field.

Metric names (`METRICS`):

- ``vqa``: VQA accuracy (`metrics.vqa_accuracy`, VQAv2 / TextVQA / OK-VQA / VizWiz).
- ``exact``: exact match after VQA normalisation (`metrics.exact_match`), max over the references.
- ``mc``: multiple-choice accuracy (ScienceQA, AI2D): option letter extracted by `extract_choice`.
- ``anls``: ANLS (DocVQA, InfographicVQA), `anls`.
- ``relaxed``: relaxed accuracy (ChartQA), `relaxed_accuracy`.
- ``refcoco``: precision at IoU >= 0.5 of the first ``[[x1, y1, x2, y2]]`` box (RefCOCO/+/g), `refcoco_correct`.
- ``pope``: POPE yes/no accuracy, precision / recall / F1 with "yes" positive and the yes-ratio, `pope_scores`.
- ``mme``: MME acc / acc+ (`metrics.mme_scores`).

All scores are fractions in [0, 1] (except ``mme_score``, MME's acc + acc+ in percent).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from experiments.mllm.metrics import exact_match, mme_scores, vqa_accuracy, yes_no

METRICS = ("vqa", "exact", "mc", "anls", "relaxed", "refcoco", "pope", "mme")

# task (benchmark) name -> metric, for records with a `task` but no `metric` field. Keys are
# matched case-insensitively after stripping a split suffix ("chartqa_test_human" -> "chartqa").
TASK_METRICS = {
    "vqav2": "vqa", "okvqa": "vqa", "textvqa": "vqa", "vizwiz": "vqa",
    "gqa": "exact", "ocrvqa": "exact",
    "scienceqa": "mc", "sqa": "mc", "ai2d": "mc", "ai2diagram": "mc",
    "docvqa": "anls", "infovqa": "anls", "infographicsvqa": "anls",
    "chartqa": "relaxed",
    "refcoco": "refcoco", "refcoco+": "refcoco", "refcocog": "refcoco",
    "pope": "pope", "mme": "mme",
}

LETTERS = "ABCDE"


# --------------------------------------------------------------------------- multiple choice

_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")   # LLaVA eval_science_qa.py, verbatim (the "." is any char)


def extract_choice(prediction: str, choices: Sequence[str], letters: str = LETTERS) -> str | None:
    """The option letter a free-form multiple-choice answer names, or None.

    Rules, in order (InternVL ``eval/scienceqa/evaluate_scienceqa.py::post_process``, with LLaVA's
    ``eval_science_qa.py`` "The answer is X." pattern inserted before the option-text match):

    1. strip; a one-character answer is returned as is (InternVL: ``len(pred) == 1``; no
       upper-casing, so "a" does not match gold "A");
    2. an answer whose first character is one of the offered letters (``letters[:len(choices)]``)
       returns it ("B. dog", "C) 3", but also "A cat" -> "A": InternVL's rule, quirk kept);
    3. LLaVA: exactly one match of ``The answer is ([A-Z]).`` returns that letter;
    4. InternVL: the first option (in letter order) whose text is a substring of the answer;
    5. otherwise None (InternVL picks a random letter here; we score it wrong, deterministically).
    """
    pred = prediction.strip()
    offered = letters[:len(choices)]
    if len(pred) == 1:
        return pred
    if pred and pred[0] in offered:
        return pred[0]
    found = _THE_ANSWER_IS.findall(pred)
    if len(found) == 1:
        return found[0]
    for letter, text in zip(offered, choices):
        if text and text in pred:
            return letter
    return None


def gold_letter(answer, letters: str = LETTERS) -> str:
    """The gold option letter: an int index (ScienceQA's ``answer`` field) or a letter string."""
    if isinstance(answer, int):
        return letters[answer]
    return str(answer).strip()


def multiple_choice_accuracy(prediction: str, answer, choices: Sequence[str]) -> float:
    """1.0 if `extract_choice` gives the gold letter (`gold_letter`), else 0.0 (InternVL:
    ``item['answer'] == item['gt_answers']``)."""
    return float(extract_choice(prediction, choices) == gold_letter(answer))


# --------------------------------------------------------------------------- ANLS

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1); two-row DP."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Per-question ANLS (Biten et al. 2019, ST-VQA; DocVQA / InfographicVQA).

    Port of the RRC ``infographicsvqa_eval.py`` (used by InternVL ``eval/vqa``): both strings are
    lower-cased, stripped and whitespace-collapsed (``' '.join(s.strip().lower().split())``) for the
    distance, but the normaliser is ``max(len(gold), len(pred))`` of the *raw* strings (official
    quirk); NL = distance / length (0 when both are empty); score = 1 - min NL over the gold
    answers, set to 0 when it is below `threshold` (tau = 0.5). So NL exactly 0.5 scores 0.5 (the
    script's ``<``), where the paper's "NL < tau" would give 0. The dataset ANLS is the mean.

    Raises:
      ValueError: if `answers` is empty.
    """
    if len(answers) == 0:
        raise ValueError("answers: need at least one reference answer, got none")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for gold in answers:
        gt = " ".join(gold.strip().lower().split())
        length = max(len(gold.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# --------------------------------------------------------------------------- relaxed accuracy

def _to_float(text: str) -> float | None:
    """pix2struct ``_to_float``: "12%" -> 0.12 (a trailing "%" divides by 100), else ``float``;
    None if unparsable (so "1,000" is not a number: no thousands-separator handling)."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness (Methani et al. 2020; pix2struct ``metrics.relaxed_correctness``,
    copied by InternVL ``eval/vqa/evaluate_vqa.py``).

    If both parse as numbers (`_to_float`) and the target is non-zero: correct iff
    ``|pred - target| / |target| <= max_relative_change`` (5%). Otherwise (a non-number, or target
    0): ``prediction.lower() == target.lower()`` (no stripping here, as the original).
    """
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """InternVL ``evaluate_relaxed_accuracy`` per question: max over the gold answers of
    `relaxed_correctness` with the prediction stripped (the gold is not).

    Raises:
      ValueError: if `answers` is empty.
    """
    if len(answers) == 0:
        raise ValueError("answers: need at least one reference answer, got none")
    pred = prediction.strip()
    return float(max(relaxed_correctness(pred, a) for a in answers))


# --------------------------------------------------------------------------- RefCOCO

_BOX = re.compile(r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*")   # InternVL eval/refcoco/evaluate_grounding.py PATTERN


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[[x1, y1, x2, y2]]`` (or ``[x1, y1, x2, y2]``) box in the answer text, as floats
    in the model's coordinates, or None when there is none or a coordinate is not a number
    (InternVL's regex and ``float`` of the first match)."""
    m = _BOX.search(text)
    if m is None:
        return None
    try:
        return tuple(float(v) for v in m.groups())
    except ValueError:
        return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two x1y1x2y2 boxes (torchvision ``box_iou``: area (x2-x1)(y2-y1), no +1 pixel);
    0.0 when the union is not positive."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def refcoco_iou(prediction: str, gold_box: Sequence[float], width: float, height: float,
                gold_format: str = "xyxy") -> float:
    """IoU of the predicted box (`parse_box`) with the gold box, 0.0 if unparsable.

    InternVL ``evaluate_grounding.py``: the predicted coordinates are normalised to 0-1000 and
    divided by 1000 -- unless they sum to less than 4, in which case they are taken as 0-1
    fractions already (official quirk kept) -- then x *= width, y *= height (pixels).

    Args:
      gold_box: pixels, x1y1x2y2 (``gold_format="xyxy"``, InternVL's refcoco jsonl) or COCO's
        x, y, w, h (``gold_format="xywh"``).

    Raises:
      ValueError: unknown `gold_format`.
    """
    if gold_format == "xywh":
        x, y, w, h = gold_box
        gold = (x, y, x + w, y + h)
    elif gold_format == "xyxy":
        gold = tuple(gold_box)
    else:
        raise ValueError(f"gold_format: must be 'xyxy' or 'xywh', got {gold_format!r}")
    box = parse_box(prediction)
    if box is None:
        return 0.0
    scale = 1000.0 if sum(box) >= 4 else 1.0
    pred = (box[0] / scale * width, box[1] / scale * height, box[2] / scale * width, box[3] / scale * height)
    return box_iou(pred, gold)


def refcoco_correct(prediction: str, gold_box: Sequence[float], width: float, height: float,
                    gold_format: str = "xyxy", threshold: float = 0.5) -> float:
    """RefCOCO Precision@1 at IoU 0.5 for one expression: 1.0 if `refcoco_iou` >= `threshold`."""
    return float(refcoco_iou(prediction, gold_box, width, height, gold_format) >= threshold)


# --------------------------------------------------------------------------- POPE

def pope_yes_no(prediction: str) -> str:
    """POPE's answer parser (Li et al. 2023, ``evaluate.py``; LLaVA / InternVL ``eval_pope.py``):
    keep the text before the first "."; delete ","; split on single spaces; "no" if one of the
    words is exactly "No", "not" or "no", else "yes" (so "NO", "No!" and "Nope" count as yes)."""
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE metrics with "yes" as the positive class (official ``eval_pope.py``).

    Returns:
      {"accuracy": (TP + TN) / n, "precision": TP / (TP + FP), "recall": TP / (TP + FN),
      "f1": 2 P R / (P + R), "yes_ratio": predicted yes / n, "tp", "fp", "tn", "fn", "n"}; a ratio
      with a zero denominator is 0.0 (the official script would divide by zero).

    Raises:
      ValueError: different lengths, no predictions, or a label that is not yes/no.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"predictions ({len(predictions)}) and labels ({len(labels)}) differ in length")
    if not predictions:
        raise ValueError("predictions: empty, nothing to score")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        gold = label.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"label must be yes or no, got {label!r}")
        yes = pope_yes_no(pred) == "yes"
        if gold == "yes":
            tp, fn = tp + yes, fn + (not yes)
        else:
            fp, tn = fp + yes, tn + (not yes)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


# --------------------------------------------------------------------------- dispatch

def _fields(record) -> dict:
    """A dict of a record's fields: a Mapping as is, or a `formats.Record`'s ``extra`` plus
    "id" and "answer" (its last gpt turn)."""
    if isinstance(record, Mapping):
        return dict(record)
    out = dict(record.extra)
    out.setdefault("id", record.id)
    out.setdefault("answer", record.answer)
    return out


def _references(f: Mapping) -> list[str]:
    """"answers" if non-empty, else ["answer"]."""
    answers = f.get("answers")
    if answers:
        return [str(a) for a in answers]
    if f.get("answer") is None:
        raise ValueError(f"record {f.get('id')!r}: needs 'answer' or 'answers'")
    return [str(f["answer"])]


def metric_of(record, default: str | None = None) -> str:
    """The record's metric: its "metric" field, else `TASK_METRICS` of its "task" (the longest
    known task name it starts with, e.g. "chartqa_test_human" -> "relaxed"), else `default`.

    Raises:
      ValueError: an unknown metric, or no metric and no default.
    """
    f = _fields(record)
    metric = f.get("metric")
    if metric is None and f.get("task") is not None:
        task = str(f["task"]).lower()
        known = [t for t in TASK_METRICS if task == t or task.startswith((t + "_", t + "-"))]
        if known:
            metric = TASK_METRICS[max(known, key=len)]
    metric = metric or default
    if metric not in METRICS:
        raise ValueError(f"record {f.get('id')!r}: metric must be one of {METRICS}, got {metric!r} "
                         f"(task {f.get('task')!r})")
    return metric


def score_record(metric: str, prediction: str, record) -> float:
    """One record's score in [0, 1] under `metric` (see the module docstring).

    Record fields (a dict, or a `formats.Record` whose ``extra`` holds them and whose last gpt turn
    is "answer"): "answer" and/or "answers" (vqa: 10 copies of the reference when there is only
    one, as a single-answer leave-one-out VQA accuracy is always 0; exact / anls / relaxed: max over the references); mc: "answer" (letter or int
    index) and "choices" (option texts in letter order); refcoco: "bbox", "width", "height",
    optional "bbox_format" ("xyxy" default, or "xywh"); pope / mme: "answer" yes/no, scored as
    the question's accuracy (acc+, precision / recall / F1 need `score_dataset`).

    Raises:
      ValueError: unknown metric or missing fields.
    """
    f = _fields(record)
    if metric == "vqa":
        answers = _references(f)
        if len(answers) == 1:   # one reference (data.py fills "answers" = [answer]): 10 copies (= exact match)
            answers = answers * 10
        return vqa_accuracy(prediction, answers)
    if metric == "exact":
        return max(exact_match(prediction, r) for r in _references(f))
    if metric == "mc":
        if not f.get("choices") or f.get("answer") is None:
            raise ValueError(f"record {f.get('id')!r}: mc needs 'answer' and 'choices'")
        return multiple_choice_accuracy(prediction, f["answer"], f["choices"])
    if metric == "anls":
        return anls(prediction, _references(f))
    if metric == "relaxed":
        return relaxed_accuracy(prediction, _references(f))
    if metric == "refcoco":
        missing = [k for k in ("bbox", "width", "height") if f.get(k) is None]
        if missing:
            raise ValueError(f"record {f.get('id')!r}: refcoco needs {missing}")
        return refcoco_correct(prediction, f["bbox"], f["width"], f["height"], f.get("bbox_format", "xyxy"))
    if metric == "pope":
        return float(pope_yes_no(prediction) == str(f["answer"]).strip().lower())
    if metric == "mme":
        return float(yes_no(prediction) == str(f["answer"]).strip().lower())
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def score_dataset(metric: str, predictions: Sequence[str], records: Sequence) -> dict:
    """Dataset-level scores of `records` (one benchmark) under `metric`.

    Returns:
      {"n", "score": mean `score_record`} plus: pope -> `pope_scores` (accuracy, precision,
      recall, f1, yes_ratio, counts); mme -> acc, acc_plus, mme_score, pairs (`mme_scores`, pairs
      by "pair_id", a record without one is its own pair).

    Raises:
      ValueError: length mismatch, no records, or a bad record.
    """
    if len(predictions) != len(records):
        raise ValueError(f"predictions ({len(predictions)}) and records ({len(records)}) differ in length")
    if not records:
        raise ValueError("records: empty, nothing to score")
    scores = [score_record(metric, p, r) for p, r in zip(predictions, records)]
    out = {"n": len(scores), "score": sum(scores) / len(scores)}
    if metric == "pope":
        out.update(pope_scores(predictions, [str(_fields(r)["answer"]) for r in records]))
    elif metric == "mme":
        fs = [_fields(r) for r in records]
        mme = mme_scores((f.get("pair_id") if f.get("pair_id") is not None else f.get("id"), p, str(f["answer"]))
                         for p, f in zip(predictions, fs))
        out.update({k: mme[k] for k in ("acc", "acc_plus", "mme_score", "pairs")})
    return out


def score_by_metric(records: Iterable, predictions: Mapping[str, str], default: str = "vqa") -> dict:
    """Groups records by (task or metric) and scores each group with `score_dataset`.

    Args:
      records: dicts or `formats.Record`s with an "id"; the metric per record from `metric_of`
        ("metric", else the "task" table, else `default`).
      predictions: record id -> prediction.

    Returns:
      {group: {"metric", "n", "score", ...}} in sorted group order, the group being the record's
      "task" if it has one, else its metric.

    Raises:
      ValueError: missing predictions (ids named), or two metrics within one task.
    """
    groups, metric_for = defaultdict(list), {}
    for r in records:
        f = _fields(r)
        metric = metric_of(f, default)
        group = str(f["task"]) if f.get("task") is not None else metric
        if metric_for.setdefault(group, metric) != metric:
            raise ValueError(f"task {group!r}: mixes metrics {metric_for[group]!r} and {metric!r}")
        groups[group].append(f)
    missing = [f["id"] for g in groups.values() for f in g if f["id"] not in predictions]
    if missing:
        raise ValueError(f"predictions: missing {len(missing)} id(s), e.g. {missing[:5]}")
    return {g: {"metric": metric_for[g], **score_dataset(metric_for[g], [predictions[f["id"]] for f in groups[g]],
                                                          groups[g])}
            for g in sorted(groups)}
