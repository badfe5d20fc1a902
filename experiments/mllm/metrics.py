"""Answer scorers: VQA answer normalisation and accuracy, exact match, MME acc / acc+.

`normalize_answer` ports the official VQA evaluation (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, Python 3 version): newlines / tabs -> spaces,
strip, ``processPunctuation`` then ``processDigitArticle``, with its tables (contractions,
manualMap, articles, periodStrip, commaStrip, punct) copied unchanged, quirks included: the
period regex's look-behind is malformed (so every period not followed by a digit is removed) and
``re.UNICODE`` (= 32) is passed as the `count` of ``re.sub`` (at most 32 periods removed);
capitalised contraction keys ("Im", "Ive") never match since words are lower-cased first.

All scores are fractions in [0, 1] (MME's paper reports acc and acc+ in percent; multiply by 100;
``mme_score`` is MME's per-subtask score acc + acc+ in percent, in [0, 200]).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!")


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: a punctuation mark next to a space (or any mark when the
    text has a digit,digit comma) is deleted, otherwise replaced by a space; then periods not
    followed by a digit are removed."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))  # sic: the official script passes re.UNICODE (32) as count


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, number words -> digits, drop articles, fix
    contractions, single spaces."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """The official VQA answer normalisation ("Two dogs." -> "2 dogs", "dont" -> "don't",
    "a cat" -> "cat")."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(s))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised prediction equals the normalised reference (`normalize_answer`), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy (Antol et al. 2015, official leave-one-out form).

    For each of the n human answers, ``min(1, (#matches of the prediction among the other n - 1
    answers) / 3)``, averaged over the n. With 10 answers of which m match: m = 0 -> 0, 1 -> 0.3,
    2 -> 0.6, 3 -> 0.9, >= 4 -> 1. Prediction and answers are compared after `normalize_answer`
    (the official script only punctuation-processes the already normalised VQA annotations; full
    normalisation of the references is the same on those and also maps our "seven" to "7").

    Raises:
      ValueError: if `answers` is empty.
    """
    if len(answers) == 0:
        raise ValueError("answers: need at least one reference answer, got none")
    pred = normalize_answer(prediction)
    match = [normalize_answer(a) == pred for a in answers]
    total = sum(match)
    return sum(min(1.0, (total - m) / 3.0) for m in match) / len(match)


def yes_no(prediction: str) -> str:
    """"yes" / "no" if the normalised prediction is exactly that, else "other" (MME's own parser
    also accepts "yes"/"no" within the first 4 characters; we are strict)."""
    p = normalize_answer(prediction)
    return p if p in ("yes", "no") else "other"


def mme_scores(rows: Iterable[tuple[str, str, str]]) -> dict:
    """MME accuracy (Fu et al. 2023): acc over questions and acc+ over images.

    Args:
      rows: (pair_id, prediction, answer) per question; the answer is "yes" or "no" (after
        normalisation); every pair_id (image) has exactly 2 questions (MME: one yes, one no).

    Returns:
      {"acc": fraction of questions whose `yes_no(prediction)` equals the answer (a prediction that
      is neither yes nor no is wrong), "acc_plus": fraction of pair_ids with both questions right,
      "mme_score": 100 * (acc + acc_plus) (MME's subtask score, in [0, 200]),
      "questions": n questions, "pairs": n pair_ids}.

    Raises:
      ValueError: no rows, an answer that is not yes/no, or a pair_id without exactly 2 questions
        (all named).
    """
    by_pair = defaultdict(list)
    for pair_id, prediction, answer in rows:
        ref = normalize_answer(answer)
        if ref not in ("yes", "no"):
            raise ValueError(f"pair {pair_id!r}: answer must be yes or no, got {answer!r}")
        by_pair[pair_id].append(yes_no(prediction) == ref)
    if not by_pair:
        raise ValueError("rows: empty, nothing to score")
    bad = {k: len(v) for k, v in by_pair.items() if len(v) != 2}
    if bad:
        raise ValueError(f"pair_id: each needs exactly 2 questions, got {dict(list(bad.items())[:5])}")
    right = [ok for oks in by_pair.values() for ok in oks]
    acc = sum(right) / len(right)
    acc_plus = sum(all(oks) for oks in by_pair.values()) / len(by_pair)
    return {"acc": acc, "acc_plus": acc_plus, "mme_score": 100.0 * (acc + acc_plus),
            "questions": len(right), "pairs": len(by_pair)}


def _row_fields(row) -> dict:
    """id, question_type, reference, answers, pair_id of a Record or a dict row."""
    if isinstance(row, Mapping):
        get, rid = row.get, row["id"]
        reference = row.get("answer")
    else:  # experiments.mllm.formats.Record
        get, rid = row.extra.get, row.id
        reference = row.answer
    answers = get("answers")
    if reference is None:
        if not answers:
            raise ValueError(f"row {rid!r}: needs 'answer' or 'answers'")
        reference = answers[0]
    if not answers:
        answers = [reference] * 10
    return {"id": str(rid), "question_type": get("question_type") or "unknown", "reference": reference,
            "answers": list(answers), "pair_id": get("pair_id")}


def _scored(rows: Iterable, predictions: Mapping[str, str]) -> list[dict]:
    """`_row_fields` of every row plus its "em" and "vqa" scores (see `score_predictions`)."""
    items = [_row_fields(r) for r in rows]
    if not items:
        raise ValueError("rows: empty, nothing to score")
    missing = [it["id"] for it in items if it["id"] not in predictions]
    if missing:
        raise ValueError(f"predictions: missing {len(missing)} id(s), e.g. {missing[:5]}")
    for it in items:
        pred = predictions[it["id"]]
        it["em"] = exact_match(pred, it["reference"])
        it["vqa"] = vqa_accuracy(pred, it["answers"])
    return items


def question_scores(rows: Iterable, predictions: Mapping[str, str]) -> dict[str, list[float]]:
    """Per-question scores, in row order: ``{"exact_match": [n], "vqa_accuracy": [n]}`` (0 / 1 and
    the VQA accuracy in [0, 1] of each row; rows and predictions as in `score_predictions`, whose
    means these are).

    Raises:
      ValueError: no rows, or a row without a prediction (ids named).
    """
    items = _scored(rows, predictions)
    return {"exact_match": [it["em"] for it in items], "vqa_accuracy": [it["vqa"] for it in items]}


def score_predictions(rows: Iterable, predictions: Mapping[str, str]) -> dict:
    """Scores per question type and overall.

    Args:
      rows: single-turn test items, either `Record`s (reference = last gpt turn; "question_type",
        "answers", "pair_id" read from `extra`) or dicts with keys "id", "question_type", "answer"
        and/or "answers", optional "pair_id". A row without "answers" scores VQA accuracy against 10
        copies of its reference (= exact match); a row without a reference uses answers[0].
      predictions: row id -> predicted answer string (extra ids are ignored).

    Returns:
      {question_type: {"n", "exact_match", "vqa_accuracy"} (+ for "mme": "acc", "acc_plus",
      "mme_score", "pairs" from `mme_scores`, grouped by pair_id), ..., "all": {"n", "exact_match",
      "vqa_accuracy"}}; means are fractions in [0, 1]; types in sorted order, "all" last.

    Raises:
      ValueError: no rows, a row without a prediction (ids named), or bad mme rows.
    """
    items = _scored(rows, predictions)
    groups = defaultdict(list)
    for it in items:
        groups[it["question_type"]].append(it)

    def summary(group):
        return {"n": len(group), "exact_match": sum(g["em"] for g in group) / len(group),
                "vqa_accuracy": sum(g["vqa"] for g in group) / len(group)}

    out = {}
    for qtype in sorted(groups):
        out[qtype] = summary(groups[qtype])
        if qtype == "mme":
            mme = mme_scores((g["pair_id"] if g["pair_id"] is not None else g["id"], predictions[g["id"]],
                              g["reference"]) for g in groups[qtype])
            out[qtype].update({k: mme[k] for k in ("acc", "acc_plus", "mme_score", "pairs")})
    out["all"] = summary(items)
    return out
