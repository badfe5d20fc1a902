"""VQA / MME scorers (experiments/mllm/metrics.py) on hand-checked examples."""
import pytest

from experiments.mllm.formats import Record, Turn
from experiments.mllm.metrics import (
    exact_match,
    mme_scores,
    normalize_answer,
    score_predictions,
    vqa_accuracy,
    yes_no,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),          # period removed, number word -> digit
    ("dont", "don't"),                # contractions table
    ("don't", "don't"),               # the apostrophe is not in the punct list
    ("a cat", "cat"),                 # articles dropped
    ("The Man's hat.", "man's hat"),
    ("1,000", "1000"),                # commaStrip: digit,digit -> every mark deleted, not spaced
    ("hello, world", "hello world"),  # ", " -> mark next to a space is deleted
    ("black/white", "black white"),   # mark without a space next to it -> space
    ("t-shirt", "t shirt"),
    ("x - ray", "x ray"),
    ("3.5", "3.5"),                   # a period followed by a digit stays
    ("Yes!", "yes"),
    ("  The\tRed\ncar ", "red car"),  # tabs / newlines -> spaces, stripped
    ("none", "0"),
    ("Seven", "7"),
    ("whats up?", "what's up"),
    ("Im", "im"),                     # official quirk: the key "Im" never matches after lower-casing
])
def test_normalize_answer_official_examples(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("Two", "2") == 1.0
    assert exact_match("the cat.", "Cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("", "") == 1.0


@pytest.mark.parametrize("m, expected", [
    # 10 answers, m of them equal to the prediction. Leave-one-out: each of the m matching
    # annotators sees m - 1 matches among the other 9, each of the 10 - m others sees m;
    # acc = (m * min(1, (m-1)/3) + (10 - m) * min(1, m/3)) / 10.
    (0, 0.0),
    (1, 0.3),   # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 = 9 / 10
    (4, 1.0),   # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(m, expected):
    answers = ["7"] * m + ["1"] * (10 - m)
    assert vqa_accuracy("7", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_other_lengths():
    answers = ["seven"] * 2 + ["7"] * 6 + ["nine", "9"]
    assert vqa_accuracy("Seven.", answers) == pytest.approx(1.0)      # 8 matches
    assert vqa_accuracy("9", answers) == pytest.approx(0.6)           # 2 matches
    assert vqa_accuracy("a 9", ["9", "9", "9"]) == pytest.approx(2 / 3)  # each sees 2 of 2 others
    assert vqa_accuracy("cat", ["cat"]) == 0.0                          # one answer: no other annotators
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("cat", [])


def test_yes_no_strict():
    assert [yes_no(p) for p in ("Yes.", "no", "yes, it is", "maybe", "No!")] == ["yes", "no", "other", "other", "no"]


def test_mme_scores_table():
    rows = [
        ("img1", "yes", "yes"), ("img1", "No", "no"),    # both right
        ("img2", "yes", "yes"), ("img2", "yes", "no"),   # one right
        ("img3", "maybe", "yes"), ("img3", "yes", "no"),  # none right ("maybe" is wrong)
        ("img4", "Yes.", "yes"), ("img4", "no.", "no"),  # both right after normalisation
    ]
    got = mme_scores(rows)
    # acc = 5 right of 8 questions; acc+ = 2 of 4 images (img1, img4); score = 100 * (0.625 + 0.5)
    assert got == {"acc": 0.625, "acc_plus": 0.5, "mme_score": pytest.approx(112.5), "questions": 8, "pairs": 4}


def test_mme_scores_errors():
    with pytest.raises(ValueError, match=r"pair_id: each needs exactly 2 questions, got \{'b': 1\}"):
        mme_scores([("a", "yes", "yes"), ("a", "no", "no"), ("b", "yes", "yes")])
    with pytest.raises(ValueError, match=r"pair 'a': answer must be yes or no, got 'cat'"):
        mme_scores([("a", "yes", "cat")])
    with pytest.raises(ValueError, match="empty"):
        mme_scores([])


def rec(rid, answer, qtype, answers=None, pair_id=None):
    extra = {"question_type": qtype}
    if answers is not None:
        extra["answers"] = answers
    if pair_id is not None:
        extra["pair_id"] = pair_id
    return Record(rid, (), (Turn("human", "<image>\nq?"), Turn("gpt", answer)), extra)


def test_score_predictions_records_and_dicts():
    records = [
        rec("d1", "7", "digit", ["7"] * 8 + ["seven"] * 2),
        rec("d2", "3", "digit", ["3"] * 7 + ["8"] * 3),
        rec("m1", "yes", "mme", ["yes"] * 10, "p1"), rec("m2", "no", "mme", ["no"] * 10, "p1"),
        rec("m3", "yes", "mme", ["yes"] * 10, "p2"), rec("m4", "no", "mme", ["no"] * 10, "p2"),
        rec("n1", "cat", "name", ["cat"] * 8 + ["kitten"] * 2),
    ]
    predictions = {"d1": "seven", "d2": "8", "m1": "yes", "m2": "no", "m3": "yes", "m4": "yes",
                   "n1": "kitten", "unused": "x"}
    got = score_predictions(records, predictions)
    assert list(got) == ["digit", "mme", "name", "all"]
    # d1: exact 1, vqa 1; d2: exact 0, vqa 0.9 (3 of 10 answers are "8")
    assert got["digit"] == {"n": 2, "exact_match": 0.5, "vqa_accuracy": pytest.approx(0.95)}
    # m4 wrong: acc 3/4, acc+ 1/2 (p1 only), exact match 3/4
    assert got["mme"] == {"n": 4, "exact_match": 0.75, "vqa_accuracy": 0.75, "acc": 0.75, "acc_plus": 0.5,
                          "mme_score": pytest.approx(125.0), "pairs": 2}
    # n1: "kitten" is 2 of 10 -> exact 0, vqa 0.6
    assert got["name"] == {"n": 1, "exact_match": 0.0, "vqa_accuracy": pytest.approx(0.6)}
    # all: exact (1 + 0 + 1 + 1 + 1 + 0 + 0) / 7, vqa (1 + 0.9 + 1 + 1 + 1 + 0 + 0.6) / 7
    assert got["all"] == {"n": 7, "exact_match": pytest.approx(4 / 7), "vqa_accuracy": pytest.approx(5.5 / 7)}

    rows = [{"id": "a", "question_type": "count", "answer": "2"},            # no answers: 10 x reference
            {"id": "b", "question_type": "count", "answers": ["3"] * 10}]    # no answer: answers[0]
    got = score_predictions(rows, {"a": "two", "b": "4"})
    assert got["count"] == {"n": 2, "exact_match": 0.5, "vqa_accuracy": 0.5}


def test_score_predictions_errors():
    with pytest.raises(ValueError, match=r"predictions: missing 1 id\(s\), e\.g\. \['b'\]"):
        score_predictions([rec("a", "1", "digit"), rec("b", "2", "digit")], {"a": "1"})
    with pytest.raises(ValueError, match="empty"):
        score_predictions([], {})
    with pytest.raises(ValueError, match=r"row 'z': needs 'answer' or 'answers'"):
        score_predictions([{"id": "z", "question_type": "x"}], {"z": "1"})
