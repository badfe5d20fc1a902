"""Benchmark scorers (experiments/mllm/scorers.py) on hand-computed cases from the official rules."""
import pytest

from experiments.mllm.formats import Record, Turn
from experiments.mllm.scorers import (
    anls,
    box_iou,
    extract_choice,
    levenshtein,
    metric_of,
    multiple_choice_accuracy,
    parse_box,
    pope_scores,
    pope_yes_no,
    refcoco_correct,
    refcoco_iou,
    relaxed_accuracy,
    relaxed_correctness,
    score_by_metric,
    score_dataset,
    score_record,
)

# ----------------------------------------------------------------------------- multiple choice

CHOICES = ["cat", "dog", "bird"]   # offered letters A, B, C


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"),                                  # rule 1: one character
    ("  B\n", "B"),                              # stripped first
    ("D", "D"),                                  # rule 1 returns any single char (then wrong vs gold)
    ("a", "a"),                                  # no upper-casing: "a" != "A"
    ("B. dog", "B"),                             # rule 2: first char is an offered letter
    ("C) bird", "C"),
    ("A cat", "A"),                              # rule 2 quirk: "A" as an article still counts
    ("The answer is C.", "C"),                   # rule 3 (LLaVA): "T" is not an offered letter
    ("The answer is A. The answer is B.", None),  # rule 3 needs exactly one match; no option text
    ("I think it is a dog", "B"),                # rule 4: option text "dog" in the answer
    ("It is a bird or a cat", "A"),              # rule 4: first option in letter order ("cat")
    ("(B)", None),                               # "(" not a letter, no pattern, no option text
    ("E. fish", None),                           # E is not offered with 3 choices
    ("", None),
])
def test_extract_choice(pred, expected):
    assert extract_choice(pred, CHOICES) == expected


def test_multiple_choice_accuracy_gold_letter_or_index():
    assert multiple_choice_accuracy("B. dog", "B", CHOICES) == 1.0
    assert multiple_choice_accuracy("B. dog", 1, CHOICES) == 1.0   # ScienceQA answer index 1 -> "B"
    assert multiple_choice_accuracy("a", "A", CHOICES) == 0.0
    assert multiple_choice_accuracy("nothing fits", "A", CHOICES) == 0.0


# ----------------------------------------------------------------------------- ANLS

def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3   # k->s, e->i, +g
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("hello", "helo") == 1


@pytest.mark.parametrize("pred, answers, expected", [
    ("hello", ["helo"], 0.8),                  # distance 1, length max(5, 4) = 5, NL 0.2 -> 0.8
    ("abc", ["xyz"], 0.0),                     # NL 3/3 = 1 -> 0, below tau
    ("abc", ["axy"], 0.0),                     # NL 2/3 -> 1/3 < 0.5 -> 0
    ("ab", ["ac"], 0.5),                       # NL 1/2 -> 0.5, not < 0.5: kept (official "<")
    ("helo", ["xyz", "hello"], 0.8),           # max over gold answers: 0 and 0.8
    ("  Hello ", ["hello"], 1.0),              # lower-cased and stripped: distance 0
    ("hello   world", ["hello worlds"], 12 / 13),  # collapsed "hello world" vs "hello worlds": distance 1;
                                               # length from the raw strings: max(13, 12) = 13
    ("", [""], 1.0),                           # length 0 -> NL 0
])
def test_anls(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected)


def test_anls_empty_answers():
    with pytest.raises(ValueError, match="answers"):
        anls("x", [])


# ----------------------------------------------------------------------------- relaxed accuracy

@pytest.mark.parametrize("pred, target, expected", [
    ("104", "100", True),     # |104 - 100| / 100 = 0.04 <= 0.05
    ("106", "100", False),    # 0.06 > 0.05
    ("95", "100", True),      # 0.05 <= 0.05 (boundary included)
    ("12%", "12", False),     # "12%" -> 0.12 (pix2struct divides by 100); |0.12 - 12| / 12 = 0.99
    ("12%", "0.12", True),    # 0.12 vs 0.12
    ("12%", "12.5%", True),   # 0.12 vs 0.125: 0.005 / 0.125 = 0.04
    ("0", "0", True),         # gold 0 is falsy -> exact string match
    ("0.0", "0", False),      # "0.0" != "0"
    ("1,000", "1000", False),  # no thousands-separator handling: "1,000" is not a float -> strings differ
    ("1,000", "1,000", True),
    ("Yes", "yes", True),     # case-insensitive string match
    ("red ", "red", False),   # relaxed_correctness itself does not strip
])
def test_relaxed_correctness(pred, target, expected):
    assert relaxed_correctness(pred, target) is expected


def test_relaxed_accuracy_strips_prediction_and_maxes_over_answers():
    assert relaxed_accuracy(" 104 ", ["100"]) == 1.0
    assert relaxed_accuracy("red ", ["red"]) == 1.0
    assert relaxed_accuracy("50", ["100", "51"]) == 1.0   # 0.5 vs 100 wrong, |50 - 51| / 51 = 0.0196 right


# ----------------------------------------------------------------------------- RefCOCO

def test_box_iou():
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)  # inter 5*5, union 100 + 100 - 25
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5                      # 50 / 100
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0                         # empty union


def test_parse_box():
    assert parse_box("[[100, 200, 500, 600]]") == (100.0, 200.0, 500.0, 600.0)
    assert parse_box("<ref>the man</ref><box>[[1,2,3,4]]</box> and [[5, 6, 7, 8]]") == (1.0, 2.0, 3.0, 4.0)
    assert parse_box("[0.1, 0.2, 0.5, 0.6]") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box("on the left") is None
    assert parse_box("[[a, b, c, d]]") is None


def test_refcoco():
    w, h = 200, 100
    pred = "[[100, 200, 500, 600]]"   # /1000 -> (0.1, 0.2, 0.5, 0.6); x * 200, y * 100 -> (20, 20, 100, 60)
    assert refcoco_iou(pred, (20, 20, 100, 60), w, h) == pytest.approx(1.0)
    assert refcoco_iou(pred, (20, 20, 80, 40), w, h, gold_format="xywh") == pytest.approx(1.0)  # COCO x, y, w, h
    # gold (20, 20, 100, 100): area 80 * 80 = 6400, prediction 80 * 40 = 3200 inside it -> IoU 0.5: correct
    assert refcoco_correct(pred, (20, 20, 100, 100), w, h) == 1.0
    # gold (20, 20, 100, 101): 3200 / (80 * 81) = 0.494 < 0.5: wrong
    assert refcoco_iou(pred, (20, 20, 100, 101), w, h) == pytest.approx(3200 / 6480)
    assert refcoco_correct(pred, (20, 20, 100, 101), w, h) == 0.0
    # coordinates summing to < 4 are taken as 0-1 fractions (InternVL quirk): same pixels
    assert refcoco_correct("[0.1, 0.2, 0.5, 0.6]", (20, 20, 100, 60), w, h) == 1.0
    assert refcoco_correct("the man on the left", (20, 20, 100, 60), w, h) == 0.0
    with pytest.raises(ValueError, match="gold_format"):
        refcoco_iou(pred, (0, 0, 1, 1), w, h, gold_format="cxcywh")


# ----------------------------------------------------------------------------- POPE

@pytest.mark.parametrize("pred, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),            # "No there is no dog": "No" is a word
    ("There is not a cat", "no"),
    ("No.", "no"),                             # text before "." is "No"
    ("Yes. There is no cat.", "yes"),          # only the first sentence counts
    ("NO", "yes"),                             # official quirk: only "No", "no", "not" match
    ("No!", "yes"),                            # "!" not removed: the word is "No!"
    ("Nope", "yes"),
])
def test_pope_yes_no(pred, expected):
    assert pope_yes_no(pred) == expected


def test_pope_scores():
    labels = ["yes"] * 4 + ["no"] * 4
    preds = ["Yes", "Yes", "Yes", "No", "Yes", "Yes", "No", "No"]
    # TP 3, FN 1 (gold yes); FP 2, TN 2 (gold no)
    # acc 5/8; P = 3/5 = 0.6; R = 3/4; F1 = 2 * 0.6 * 0.75 / 1.35 = 0.9 / 1.35 = 2/3; yes ratio 5/8
    got = pope_scores(preds, labels)
    assert got == {"accuracy": 0.625, "precision": pytest.approx(0.6), "recall": 0.75, "f1": pytest.approx(2 / 3),
                   "yes_ratio": 0.625, "tp": 3, "fp": 2, "tn": 2, "fn": 1, "n": 8}
    # all "no": P, R, F1 have zero denominators -> 0.0
    assert pope_scores(["no", "no"], ["yes", "no"])["f1"] == 0.0
    with pytest.raises(ValueError, match="label must be yes or no"):
        pope_scores(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="differ in length"):
        pope_scores(["yes"], [])


# ----------------------------------------------------------------------------- dispatch

def test_metric_of():
    assert metric_of({"id": "a", "metric": "anls", "task": "chartqa"}) == "anls"   # metric wins
    assert metric_of({"id": "a", "task": "ChartQA_test_human"}) == "relaxed"
    assert metric_of({"id": "a", "task": "refcoco+_val"}) == "refcoco"
    assert metric_of({"id": "a", "task": "ai2diagram_test"}) == "mc"
    assert metric_of({"id": "a", "task": "docvqa"}) == "anls"
    assert metric_of({"id": "a"}, default="vqa") == "vqa"
    with pytest.raises(ValueError, match="metric must be one of"):
        metric_of({"id": "a", "task": "unknown"})
    with pytest.raises(ValueError, match="metric must be one of"):
        metric_of({"id": "a", "metric": "bleu"})


def test_score_record_each_metric():
    assert score_record("vqa", "two", {"answer": "2"}) == 1.0                  # 10 copies of the answer
    assert score_record("vqa", "two", {"answer": "2", "answers": ["2"]}) == 1.0  # one answer: 10 copies too
    assert score_record("vqa", "8", {"answers": ["3"] * 7 + ["8"] * 3}) == pytest.approx(0.9)
    assert score_record("exact", "Two.", {"answers": ["3", "2"]}) == 1.0
    assert score_record("mc", "The answer is B.", {"answer": 1, "choices": CHOICES}) == 1.0
    assert score_record("anls", "helo", {"answers": ["hello"]}) == pytest.approx(0.8)
    assert score_record("relaxed", "104", {"answer": "100"}) == 1.0
    assert score_record("refcoco", "[[100, 200, 500, 600]]",
                        {"bbox": [20, 20, 80, 40], "bbox_format": "xywh", "width": 200, "height": 100}) == 1.0
    assert score_record("pope", "No, it is not.", {"answer": "no"}) == 1.0
    assert score_record("mme", "Yes.", {"answer": "yes"}) == 1.0
    with pytest.raises(ValueError, match="refcoco needs"):
        score_record("refcoco", "[[1, 2, 3, 4]]", {"id": "r", "bbox": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="mc needs"):
        score_record("mc", "A", {"id": "m", "answer": "A"})
    with pytest.raises(ValueError, match="metric must be one of"):
        score_record("bleu", "x", {"answer": "x"})


def test_score_dataset_mme_and_pope():
    recs = [{"id": "1", "answer": "yes", "pair_id": "p"}, {"id": "2", "answer": "no", "pair_id": "p"}]
    got = score_dataset("mme", ["yes", "yes"], recs)
    # 1 of 2 right: acc 0.5; pair p not both right: acc+ 0; mme_score 100 * 0.5
    assert got == {"n": 2, "score": 0.5, "acc": 0.5, "acc_plus": 0.0, "mme_score": 50.0, "pairs": 1}
    got = score_dataset("pope", ["Yes", "No"], [{"answer": "yes"}, {"answer": "yes"}])
    # TP 1, FN 1: acc 0.5, P 1, R 0.5, F1 2 * 0.5 / 1.5 = 2/3
    assert got["score"] == 0.5 and got["accuracy"] == 0.5 and got["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differ in length"):
        score_dataset("vqa", ["a"], [])


def test_score_by_metric_mixed_records():
    rows = [
        {"id": "c1", "task": "chartqa", "answer": "100"},
        {"id": "c2", "task": "chartqa", "answer": "100"},
        {"id": "d1", "task": "docvqa", "answers": ["hello"]},
        {"id": "s1", "task": "scienceqa", "answer": "A", "choices": ["cat", "dog"]},
        Record("v1", (), (Turn("human", "<image>\nq?"), Turn("gpt", "2")), {"metric": "vqa"}),
    ]
    preds = {"c1": "104", "c2": "106", "d1": "helo", "s1": "B", "v1": "two", "extra": "x"}
    got = score_by_metric(rows, preds)
    assert list(got) == ["chartqa", "docvqa", "scienceqa", "vqa"]
    assert got["chartqa"] == {"metric": "relaxed", "n": 2, "score": 0.5}     # 104 right, 106 wrong
    assert got["docvqa"] == {"metric": "anls", "n": 1, "score": pytest.approx(0.8)}
    assert got["scienceqa"] == {"metric": "mc", "n": 1, "score": 0.0}
    assert got["vqa"] == {"metric": "vqa", "n": 1, "score": 1.0}           # Record: answer = last gpt turn
    with pytest.raises(ValueError, match=r"missing 1 id\(s\), e\.g\. \['c2'\]"):
        score_by_metric(rows, {k: v for k, v in preds.items() if k != "c2"})
    with pytest.raises(ValueError, match="mixes metrics"):
        score_by_metric([{"id": "a", "task": "t", "metric": "vqa", "answer": "1"},
                         {"id": "b", "task": "t", "metric": "anls", "answer": "1"}], {"a": "1", "b": "1"})


def test_question_rows_carry_the_scorer_fields_into_evaluation():
    """The eval JSONL's per-record `task` / `metric` / scorer inputs reach the question rows that
    `experiments.mllm.evaluate` scores with `score_by_metric`; records without them are unchanged."""
    from pathlib import Path

    from experiments.mllm.data import _question_rows
    from experiments.mllm.formats import Record, Turn
    from experiments.mllm.scorers import score_by_metric

    turns = (Turn("human", "<image>\nWhere is the cat?"), Turn("gpt", "[[0, 0, 500, 500]]"))
    grounded = Record("r1", (Path("a.png"),), turns,
                      {"task": "refcoco_val", "bbox": [0, 0, 50, 50], "width": 100, "height": 100})
    plain = Record("r2", (Path("a.png"),), (Turn("human", "<image>\nDigit?"), Turn("gpt", "7")), {})
    rows = _question_rows([grounded, plain], "test", {"a.png": 0})
    assert rows[0]["task"] == "refcoco_val" and rows[0]["bbox"] == [0, 0, 50, 50] and rows[0]["width"] == 100
    assert "task" not in rows[1] and "bbox" not in rows[1]
    # the predicted box [[0, 0, 500, 500]] on a 100 x 100 image is (0, 0, 50, 50): IoU 1 with the gold
    result = score_by_metric(rows[:1], {"r1": "[[0, 0, 500, 500]]"}, default="vqa")
    assert result["refcoco_val"]["metric"] == "refcoco" and result["refcoco_val"]["score"] == 1.0
