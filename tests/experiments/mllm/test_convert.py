"""Benchmark converters (experiments/mllm/convert/): each on a tiny hand-made file in the official
layout. The JSONL is checked field by field, read back by the job's own eval-record path
(`formats.load_llava` -> `data._question_rows`, what the evaluate stage scores), and the scores of
hand-written predictions are compared with the benchmark's own rule computed here by hand."""
import argparse
import itertools
import json
import re
from pathlib import Path

import pytest

from experiments.mllm import data, formats
from experiments.mllm.convert import CONVERTERS, convert
from experiments.mllm.convert.cli import add_parser, main
from experiments.mllm.convert.common import IMAGE_TOKEN, LETTER_ANSWER, SHORT_ANSWER
from experiments.mllm.scorers import METRICS, metric_of, score_by_metric, score_record

ROOT = Path(__file__).resolve().parents[3]


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not decoded by the loader")


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _job_rows(out: Path, image_root: Path) -> list[dict]:
    """The question rows the evaluate stage scores, read by the job's own loader."""
    records = formats.load_llava(out, image_root)
    index = {str(p): i for i, p in enumerate(sorted({str(r.images[0]) for r in records}))}
    return data._question_rows(records, "test", index)


def _scores(out: Path, image_root: Path, predictions: dict) -> dict:
    rows = _job_rows(out, image_root)
    return score_by_metric(rows, {f"{r['id']}": predictions[r["id"]] for r in rows})


def test_every_benchmark_has_a_converter_and_a_known_metric():
    assert set(CONVERTERS) == {"vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "refcoco", "chartqa", "docvqa"}
    assert {c.metric for c in CONVERTERS.values()} == set(METRICS)
    from dfm.prompts import IMAGE_TOKEN as LIBRARY_IMAGE_TOKEN

    assert IMAGE_TOKEN == LIBRARY_IMAGE_TOKEN


# ----------------------------------------------------------------------------- VQAv2

def _vqa_accuracy_by_hand(pred: str, answers: list[str]) -> float:
    """Antol et al.: min(#humans that said it / 3, 1), averaged over the 10 choose 9 subsets."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == pred for i in s) / 3, 1.0) for s in subsets) / len(subsets)


def _vqav2_files(tmp_path):
    images = tmp_path / "coco" / "val2014"
    _touch(images, "COCO_val2014_000000262148.jpg", "COCO_val2014_000000000042.jpg")
    q = _write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
                      {"image_id": 42, "question": "How many dogs?", "question_id": 42001}]})
    a1 = ["down"] * 2 + ["at table"] * 7 + ["skateboard"]
    a2 = ["2"] * 10
    a = _write(tmp_path / "v2_mscoco_val2014_annotations.json", {"info": {}, "license": {}, "data_subtype": "val2014",
        "annotations": [
            {"question_id": 262148000, "image_id": 262148, "question_type": "where is", "answer_type": "other",
             "multiple_choice_answer": "at table",
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a1)]},
            {"question_id": 42001, "image_id": 42, "question_type": "how many", "answer_type": "number",
             "multiple_choice_answer": "2",
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a2)]}]})
    return images, q, a, a1, a2


def test_vqav2(tmp_path):
    images, q, a, a1, a2 = _vqav2_files(tmp_path)
    out = tmp_path / "vqav2.jsonl"
    info = convert("vqav2", out, images=images, questions=q, annotations=a)
    assert info["records"] == 2 and info["tasks"] == ["vqav2_val2014"] and info["skipped"] == {}
    rec = _lines(out)[0]
    assert rec == {"id": "vqav2_val2014:262148000", "image": "COCO_val2014_000000262148.jpg",
                   "conversations": [{"from": "human", "value": "<image>\nWhere is he looking?" + SHORT_ANSWER},
                                     {"from": "gpt", "value": "at table"}],
                   "task": "vqav2_val2014", "metric": "vqa", "question_type": "vqav2_val2014",
                   "answers": a1, "answer_type": "other", "question_id": 262148000}
    rows = _job_rows(out, images)
    assert [r["answers"] for r in rows] == [a1, a2] and rows[0]["metric"] == "vqa"
    for pred in ("down", "at table", "skateboard", "floor"):     # 2, 7, 1, 0 humans said it
        assert score_record("vqa", pred, rows[0]) == pytest.approx(_vqa_accuracy_by_hand(pred, a1))
    assert _vqa_accuracy_by_hand("down", a1) == pytest.approx(0.6)     # by hand: (2 * 1/3 + 8 * 2/3) / 10
    preds = {"vqav2_val2014:262148000": "down", "vqav2_val2014:42001": "two"}   # "two" normalises to "2"
    assert _scores(out, images, preds)["vqav2_val2014"]["score"] == pytest.approx((0.6 + 1.0) / 2)


def test_vqav2_layout_errors_name_the_file_and_the_question(tmp_path):
    images, q, a, _, _ = _vqav2_files(tmp_path)
    bad = json.loads(a.read_text())
    bad["annotations"] = bad["annotations"][:1]
    _write(a, bad)
    with pytest.raises(ValueError, match=rf"{re.escape(str(q))}: question 42001: no annotation in"):
        convert("vqav2", tmp_path / "o.jsonl", images=images, questions=q, annotations=a)
    _write(q, {"questions": [{"image_id": 262148, "question_id": 262148000}]})
    with pytest.raises(ValueError, match=r"question 262148000: missing 'question'"):
        convert("vqav2", tmp_path / "o.jsonl", images=images, questions=q, annotations=a, split="val2014")
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_image_and_image_root(tmp_path):
    images, q, a, _, _ = _vqav2_files(tmp_path)
    (images / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(ValueError, match=r"question 42001: image file .*COCO_val2014_000000000042.jpg does not exist"):
        convert("vqav2", tmp_path / "o.jsonl", images=images, questions=q, annotations=a)
    out = tmp_path / "o.jsonl"
    convert("vqav2", out, images=images, questions=q, annotations=a, check_images=False,
            image_root=tmp_path / "coco")
    assert [r["image"] for r in _lines(out)] == ["val2014/COCO_val2014_000000262148.jpg",
                                                 "val2014/COCO_val2014_000000000042.jpg"]
    with pytest.raises(ValueError, match="is not inside it"):
        convert("vqav2", out, images=images, questions=q, annotations=a, image_root=tmp_path / "elsewhere")


# ----------------------------------------------------------------------------- GQA

def test_gqa(tmp_path):
    images = tmp_path / "images"
    _touch(images, "n161313.jpg", "n235859.jpg")
    q = _write(tmp_path / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no",
                      "fullAnswer": "No, it is clear.", "isBalanced": True, "types": {}, "semantic": []},
        "201640614": {"imageId": "n235859", "question": "Who is wearing the dress?", "answer": "woman",
                      "fullAnswer": "The woman is wearing a dress.", "isBalanced": True}})
    out = tmp_path / "gqa.jsonl"
    convert("gqa", out, images=images, questions=q)
    rec = _lines(out)[1]
    assert rec["id"] == "gqa_testdev_balanced:201640614" and rec["image"] == "n235859.jpg"
    assert rec["conversations"][1]["value"] == "woman" and rec["metric"] == "exact"
    assert rec["full_answer"] == "The woman is wearing a dress." and "answers" not in rec

    def gqa_by_hand(pred, gold):      # GQA's rule: the answer string equals the gold (LLaVA lower-cases, drops ".")
        return float(pred.strip().lower().rstrip(".") == gold)

    preds = {"gqa_testdev_balanced:201307251": "No.", "gqa_testdev_balanced:201640614": "man"}
    expected = (gqa_by_hand("No.", "no") + gqa_by_hand("man", "woman")) / 2
    assert expected == 0.5 and _scores(out, images, preds)["gqa_testdev_balanced"]["score"] == expected


# ----------------------------------------------------------------------------- TextVQA

def test_textvqa(tmp_path):
    images = tmp_path / "train_images"
    _touch(images, "0054c91397f2fe05.jpg", "005635e119b9f32f.jpg")
    a1 = ["nokia"] * 6 + ["toshiba"] * 3 + ["unanswerable"]
    a2 = ["ace"] * 4 + ["ac"] * 4 + ["a.c.e"] * 2
    q = _write(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": [
        {"question": "what is the brand of phone?", "image_id": "0054c91397f2fe05", "image_classes": ["Phone"],
         "answers": a1, "question_tokens": [], "question_id": 34602, "set_name": "val"},
        {"question": "what letters are on the sign?", "image_id": "005635e119b9f32f", "answers": a2,
         "question_id": 34603, "set_name": "val"}]})
    out = tmp_path / "textvqa.jsonl"
    convert("textvqa", out, images=images, questions=q)
    recs = _lines(out)
    assert [r["id"] for r in recs] == ["textvqa_val:34602", "textvqa_val:34603"]
    assert [r["conversations"][1]["value"] for r in recs] == ["nokia", "ace"]   # most frequent, ties: first
    assert recs[0]["answers"] == a1 and recs[0]["metric"] == "vqa"
    preds = {"textvqa_val:34602": "Toshiba", "textvqa_val:34603": "ac"}
    expected = (_vqa_accuracy_by_hand("toshiba", a1) + _vqa_accuracy_by_hand("ac", a2)) / 2
    assert expected == pytest.approx((0.9 + 1.0) / 2)   # 3 humans: (3 x 2/3 + 7 x 3/3) / 10 = 0.9; 4: 1
    assert _scores(out, images, preds)["textvqa_val"]["score"] == pytest.approx(expected)


def test_textvqa_test_split_without_answers_is_an_error(tmp_path):
    images = tmp_path / "test_images"
    _touch(images, "a.jpg")
    q = _write(tmp_path / "TextVQA_0.5.1_test.json", {"dataset_type": "test", "data": [
        {"question": "what?", "image_id": "a", "question_id": 7, "answers": []}]})
    with pytest.raises(ValueError, match=r"question 7: 'answers' is empty"):
        convert("textvqa", tmp_path / "o.jsonl", images=images, questions=q)
    listed = _write(tmp_path / "list.json", [{"question": "what?", "image_id": "a", "question_id": 7}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(listed))}: must be a JSON object, got list"):
        convert("textvqa", tmp_path / "o.jsonl", images=images, questions=listed)     # not a TextVQA file


# ----------------------------------------------------------------------------- ScienceQA

def test_scienceqa(tmp_path):
    images = tmp_path / "images"
    _touch(images, "test/4/image.png", "test/9/image.png", "val/12/image.png")
    problems = _write(tmp_path / "problems.json", {
        "4": {"question": "Which of these states is farthest north?", "choices": ["West Virginia", "Louisiana",
              "Arizona", "Oklahoma"], "answer": 0, "hint": "", "image": "image.png", "task": "closed choice",
              "split": "test", "subject": "social science"},
        "7": {"question": "Which word would you find on a dictionary page?", "choices": ["ceiling", "cane"],
              "answer": 1, "hint": "", "image": None, "split": "test"},
        "9": {"question": "Identify the question that the experiment can best answer.",
              "choices": ["Do more snails?", "Do fewer snails?"], "answer": 1,
              "hint": "Gabriel set up two tanks.", "image": "image.png", "split": "test"},
        "12": {"question": "Which animal?", "choices": ["cat", "dog"], "answer": 0, "hint": "",
               "image": "image.png", "split": "val"}})
    out = tmp_path / "sqa.jsonl"
    info = convert("scienceqa", out, images=images, questions=problems)
    assert info["records"] == 2 and info["skipped"] == {"text-only problems (no image)": 1}
    recs = _lines(out)
    assert recs[1] == {"id": "scienceqa_test:9", "image": "test/9/image.png", "conversations": [
        {"from": "human", "value": "<image>\nGabriel set up two tanks.\nIdentify the question that the experiment "
                                   "can best answer.\nA. Do more snails?\nB. Do fewer snails?" + LETTER_ANSWER},
        {"from": "gpt", "value": "B"}], "task": "scienceqa_test", "metric": "mc", "question_type": "scienceqa_test",
        "choices": ["Do more snails?", "Do fewer snails?"], "question_id": "9"}
    assert recs[0]["conversations"][1]["value"] == "A" and "Context" not in recs[0]["conversations"][0]["value"]
    splits = _write(tmp_path / "pid_splits.json", {"train": [], "val": ["12"], "test": ["4", "7", "9"],
                                                   "minival": ["12"]})
    out2 = tmp_path / "minival.jsonl"
    info = convert("scienceqa", out2, images=images, questions=problems, splits=splits, split="minival")
    assert info["records"] == 1 and _lines(out2)[0]["image"] == "val/12/image.png"
    # ScienceQA's rule: the predicted option equals the gold option (accuracy)
    preds = {"scienceqa_test:4": "A", "scienceqa_test:9": "The answer is A."}
    assert _scores(out, images, preds)["scienceqa_test"]["score"] == (1 + 0) / 2
    preds = {"scienceqa_test:4": "West Virginia", "scienceqa_test:9": "B. Do fewer snails?"}
    assert _scores(out, images, preds)["scienceqa_test"]["score"] == 1.0
    _write(problems, {"5": {"question": "q", "choices": ["a", "b"], "answer": 2, "image": "image.png",
                            "split": "test"}})
    with pytest.raises(ValueError, match=r"problem '5': answer index 2 outside the 2 choices"):
        convert("scienceqa", tmp_path / "o.jsonl", images=images, questions=problems)


# ----------------------------------------------------------------------------- POPE

def test_pope(tmp_path):
    images = tmp_path / "val2014"
    names = [f"COCO_val2014_{i:012d}.jpg" for i in (310196, 210789)]
    _touch(images, *names)
    rows = [{"question_id": 1, "image": names[0], "text": "Is there a snowboard in the image?", "label": "yes"},
            {"question_id": 2, "image": names[0], "text": "Is there a dog in the image?", "label": "no"},
            {"question_id": 3, "image": names[1], "text": "Is there a person in the image?", "label": "yes"},
            {"question_id": 4, "image": names[1], "text": "Is there a car in the image?", "label": "no"}]
    q = tmp_path / "coco_pope_adversarial.json"
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pope.jsonl"
    convert("pope", out, images=images, questions=q)
    recs = _lines(out)
    assert recs[1] == {"id": "pope_adversarial:2", "image": names[0], "conversations": [
        {"from": "human", "value": "<image>\nIs there a dog in the image?" + SHORT_ANSWER},
        {"from": "gpt", "value": "no"}], "task": "pope_adversarial", "metric": "pope",
        "question_type": "pope_adversarial", "question_id": 2}
    preds = {"pope_adversarial:1": "Yes, there is.", "pope_adversarial:2": "Yes",
             "pope_adversarial:3": "No, there is not.", "pope_adversarial:4": "No."}
    # by hand, "yes" positive: TP = q1, FP = q2, FN = q3, TN = q4
    tp, fp, fn, tn = 1, 1, 1, 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    got = _scores(out, images, preds)["pope_adversarial"]
    assert got["f1"] == pytest.approx(f1) == 0.5
    assert got["accuracy"] == (tp + tn) / 4 and got["yes_ratio"] == (tp + fp) / 4
    (tmp_path / "bad.json").write_text(json.dumps({**rows[0], "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.json: line 1 \(question 1\): label must be 'yes' or 'no'"):
        convert("pope", out, images=images, questions=tmp_path / "bad.json")


# ----------------------------------------------------------------------------- MME

def _mme_tree(root: Path) -> None:
    # layout 1: images/ + questions_answers_YN/ (artwork, ...)
    _touch(root, "artwork/images/10002.jpg", "artwork/images/10049.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by maris, jacob? Please answer yes or no.\tYes\n"
        "Is this artwork created by gogh, vincent van? Please answer yes or no.\tNo\n")
    (root / "artwork" / "questions_answers_YN" / "10049.txt").write_text(
        "Is this artwork titled The Storm? Please answer yes or no.\tYes\n"
        "Is this artwork titled A Calm Sea? Please answer yes or no.\tNo\n")
    # layout 2: <name>.png beside <name>.txt (existence, ...)
    _touch(root, "existence/000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    (root / "eval_tool").mkdir()


def test_mme(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    _mme_tree(root)
    out = tmp_path / "mme.jsonl"
    info = convert("mme", out, images=root)
    assert info["records"] == 6 and info["tasks"] == ["mme_artwork", "mme_existence"]
    assert info["skipped"] == {"folders without question files": 1}
    recs = _lines(out)
    assert recs[0] == {"id": "mme_artwork:10002.jpg:0", "image": "artwork/images/10002.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs this artwork created by maris, jacob? Please answer yes or no."},
        {"from": "gpt", "value": "Yes"}], "task": "mme_artwork", "metric": "mme", "question_type": "mme",
        "pair_id": "artwork/10002.jpg"}
    assert recs[5]["image"] == "existence/000000006040.jpg" and recs[5]["pair_id"] == "existence/000000006040.jpg"
    preds = {"mme_artwork:10002.jpg:0": "Yes", "mme_artwork:10002.jpg:1": "Yes",     # pair 1: one right
             "mme_artwork:10049.jpg:0": "Yes", "mme_artwork:10049.jpg:1": "No",      # pair 2: both right
             "mme_existence:000000006040.jpg:0": "yes", "mme_existence:000000006040.jpg:1": "no"}
    got = _scores(out, root, preds)
    # MME's rule per subtask: acc over questions, acc+ over images (both questions right), score = acc + acc+ (%)
    acc, acc_plus = 3 / 4, 1 / 2
    assert got["mme_artwork"]["acc"] == acc and got["mme_artwork"]["acc_plus"] == acc_plus
    assert got["mme_artwork"]["mme_score"] == pytest.approx(100 * (acc + acc_plus))
    assert got["mme_existence"]["mme_score"] == pytest.approx(200.0)
    # the job's own per-question-type table pools the MME questions with acc / acc+ too
    from experiments.mllm.metrics import score_predictions

    pooled = score_predictions(_job_rows(out, root), preds)["mme"]
    assert pooled["acc"] == pytest.approx(5 / 6) and pooled["acc_plus"] == pytest.approx(2 / 3)
    # the eval_tool layout: <image>\t<question>\t<answer>
    (root / "existence" / "000000006040.txt").write_text(
        "000000006040.jpg\tIs there a train in this image? Please answer yes or no.\tYes\n")
    with pytest.raises(ValueError, match=r"image existence/000000006040.jpg has 1 question\(s\).*exactly 2"):
        convert("mme", out, images=root, category="existence")
    (root / "existence" / "000000006040.txt").write_text("Is there a train?\tMaybe\n")
    with pytest.raises(ValueError, match=r"000000006040.txt: line 1: answer must be 'Yes' or 'No'"):
        convert("mme", out, images=root, category="existence")
    assert convert("mme", out, images=root, category="artwork")["records"] == 4


# ----------------------------------------------------------------------------- RefCOCO

def _iou_by_hand(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


def test_refcoco(tmp_path):
    images = tmp_path / "train2014"
    _touch(images, "COCO_train2014_000000581857.jpg")
    inst = _write(tmp_path / "instances.json", {
        "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 1719310, "image_id": 581857, "bbox": [100.0, 50.0, 200.0, 100.0],
                         "category_id": 1, "area": 20000.0, "iscrowd": 0, "segmentation": []}],
        "categories": [{"id": 1, "name": "person"}]})
    refs = [{"ref_id": 0, "image_id": 581857, "ann_id": 1719310, "split": "testA", "category_id": 1,
             "file_name": "COCO_train2014_000000581857_1719310.jpg", "sent_ids": [0, 1],
             "sentences": [{"sent": "woman in gray shirt", "sent_id": 0, "tokens": [], "raw": "Woman in gray shirt"},
                           {"sent": "left woman", "sent_id": 1, "tokens": [], "raw": "left woman"}]},
            {"ref_id": 1, "image_id": 581857, "ann_id": 1719310, "split": "train", "sentences": [{"sent": "x"}]}]
    q = tmp_path / "refs_unc.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in refs))
    out = tmp_path / "refcoco.jsonl"
    info = convert("refcoco", out, images=images, questions=q, annotations=inst, split="testA")
    assert info["records"] == 2 and info["tasks"] == ["refcoco_testA"]
    rec = _lines(out)[0]
    assert rec == {"id": "refcoco_testA:0:0", "image": "COCO_train2014_000000581857.jpg", "conversations": [
        {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence "
                                   "describes: <ref>woman in gray shirt</ref>"},
        {"from": "gpt", "value": "[[156, 104, 469, 312]]"}],     # 100/640, 50/480, 300/640, 150/480 x 1000
        "task": "refcoco_testA", "metric": "refcoco", "question_type": "refcoco_testA",
        "bbox": [100.0, 50.0, 200.0, 100.0], "bbox_format": "xywh", "width": 640, "height": 480, "ref_id": 0}
    rows = _job_rows(out, images)
    assert rows[0]["bbox_format"] == "xywh" and rows[0]["width"] == 640
    gold = (100, 50, 300, 150)
    # boxes in InternVL's 0-1000 coordinates -> pixels (x * 640 / 1000, y * 480 / 1000), IoU by hand:
    # near = (128, 60, 320, 159.84): IoU 15480 / 23689.28 = 0.65 >= 0.5; far does not meet the gold box
    near = (200, 125, 500, 333)
    near_px = (near[0] * 0.64, near[1] * 0.48, near[2] * 0.64, near[3] * 0.48)
    far = (500, 500, 900, 900)
    far_px = (far[0] * 0.64, far[1] * 0.48, far[2] * 0.64, far[3] * 0.48)
    assert _iou_by_hand(near_px, gold) >= 0.5 > _iou_by_hand(far_px, gold)
    preds = {"refcoco_testA:0:0": "<ref>woman</ref><box>[[200, 125, 500, 333]]</box>",
             "refcoco_testA:0:1": "[[500, 500, 900, 900]]"}
    assert _scores(out, images, preds)["refcoco_testA"]["score"] == 0.5
    assert score_record("refcoco", rec["conversations"][1]["value"], rows[0]) == 1.0   # the reference itself
    with pytest.raises(ValueError, match=r"refs_unc.jsonl: line 1 \(ref 0\): image_id 581857 is not in"):
        convert("refcoco", out, images=images, questions=q, annotations=_write(tmp_path / "i2.json", {"images": []}))
    with pytest.raises(ValueError, match=r"no ref with \"split\": 'val'"):
        convert("refcoco", out, images=images, questions=q, annotations=inst, split="val")


# ----------------------------------------------------------------------------- ChartQA

def _relaxed_by_hand(pred: str, label: str) -> float:
    """ChartQA: a number within 5% of the gold number, otherwise an exact (case-insensitive) string."""
    try:
        return float(abs(float(pred) - float(label)) / abs(float(label)) <= 0.05)
    except ValueError:
        return float(pred.lower() == label.lower())


def test_chartqa(tmp_path):
    images = tmp_path / "test" / "png"
    _touch(images, "41699051005347.png", "multi_col_1066.png", "two_col_3.png")
    q = _write(tmp_path / "test" / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14"},
        {"imgname": "multi_col_1066.png", "query": "Is the value of Favorable 38 in 2015?", "label": "Yes"},
        {"imgname": "two_col_3.png", "query": "What was the revenue in 2019?", "label": 120.5}])
    out = tmp_path / "chartqa.jsonl"
    convert("chartqa", out, images=images, questions=q)
    recs = _lines(out)
    assert recs[2] == {"id": "chartqa_test_human:2", "image": "two_col_3.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat was the revenue in 2019?" + SHORT_ANSWER},
        {"from": "gpt", "value": "120.5"}], "task": "chartqa_test_human", "metric": "relaxed",
        "question_type": "chartqa_test_human", "answers": ["120.5"]}
    preds = {"chartqa_test_human:0": "14.5", "chartqa_test_human:1": "yes", "chartqa_test_human:2": "130"}
    expected = sum(_relaxed_by_hand(p, g) for p, g in zip(preds.values(), ["14", "Yes", "120.5"])) / 3
    assert expected == pytest.approx(2 / 3)       # 3.6% off: right; "yes" == "Yes"; 7.9% off: wrong
    assert _scores(out, images, preds)["chartqa_test_human"]["score"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- DocVQA

def test_docvqa(tmp_path):
    root = tmp_path / "val"
    _touch(root, "documents/pybv0228_81.png", "documents/xnbl0037_1.png")
    q = _write(root / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [{"questionId": 49153, "question": "What is the 'actual' value per 1000, during the year 1975?",
                  "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
                  "answers": ["0.28"], "data_split": "val"},
                 {"questionId": 24581, "question": "What is name of university?", "image": "documents/xnbl0037_1.png",
                  "answers": ["University of California", "university of california, san diego"],
                  "docId": 1}]})
    out = tmp_path / "docvqa.jsonl"
    convert("docvqa", out, images=root, questions=q)
    recs = _lines(out)
    assert recs[1]["id"] == "docvqa_val:24581" and recs[1]["image"] == "documents/xnbl0037_1.png"
    assert recs[1]["answers"] == ["University of California", "university of california, san diego"]
    assert recs[1]["conversations"][1]["value"] == "University of California" and recs[1]["metric"] == "anls"
    # ANLS by hand, tau = 0.5: "0.27" vs "0.28": 1 edit / 4 characters -> 1 - 0.25 = 0.75;
    # "University of California." vs the first answer: 1 edit / 25 -> 0.96; "San Diego" vs both: NL > 0.5 -> 0
    preds = {"docvqa_val:49153": "0.27", "docvqa_val:24581": "University of California."}
    assert _scores(out, root, preds)["docvqa_val"]["score"] == pytest.approx((0.75 + (1 - 1 / 25)) / 2)
    assert score_record("anls", "San Diego", _job_rows(out, root)[1]) == 0.0


# ----------------------------------------------------------------------------- CLI and API edges

def _parser():
    parser = argparse.ArgumentParser(prog="dfm")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_converts_and_names_what_is_missing(tmp_path, capsys):
    images, q, a, _, _ = _vqav2_files(tmp_path)
    out = tmp_path / "cli.jsonl"
    args = _parser().parse_args(["data", "convert", "--from", "vqav2", "--questions", str(q), "--annotations", str(a),
                                 "--images", str(images), "--out", str(out)])
    assert args.command == "data" and args.data_command == "convert"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "vqav2: 2 records" in printed and f'image_root = "{images}"' in printed and out.is_file()
    args = _parser().parse_args(["data", "convert", "--from", "vqav2", "--questions", str(q), "--images",
                                 str(images), "--out", str(out)])
    assert main(args) == 2 and "--from vqav2 needs --annotations" in capsys.readouterr().err
    args = _parser().parse_args(["data", "convert", "--from", "gqa", "--questions", str(a), "--images", str(images),
                                 "--out", str(tmp_path / "g.jsonl"), "--category", "x"])
    assert main(args) == 2 and "does not take --category" in capsys.readouterr().err
    args = _parser().parse_args(["data", "convert", "--from", "gqa", "--questions", str(a), "--images", str(images),
                                 "--out", str(tmp_path / "g.jsonl")])
    assert main(args) == 1 and not (tmp_path / "g.jsonl").exists()
    assert "dfm data convert: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "convert", "--from", "coco", "--images", "x", "--out", "y"])


def test_api_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'coco'"):
        convert("coco", tmp_path / "o.jsonl", images=tmp_path)
    with pytest.raises(ValueError, match="gqa: needs --questions"):
        convert("gqa", tmp_path / "o.jsonl", images=tmp_path)
    with pytest.raises(ValueError, match=r"gqa: does not take --annotations"):
        convert("gqa", tmp_path / "o.jsonl", images=tmp_path, questions="q", annotations="a")
    (tmp_path / "q.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"q.json: GQA questions file is not valid JSON \(line 1, column 2"):
        convert("gqa", tmp_path / "o.jsonl", images=tmp_path, questions=tmp_path / "q.json")


# ----------------------------------------------------------------------------- docs/benchmarks.md

def test_the_doc_shows_one_loadable_record_per_scorer(tmp_path):
    """Every example record in docs/benchmarks.md is read by the job's loader, names its metric,
    and its own reference answer scores 1."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```json\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    records = [json.loads(line) for b in blocks for line in b.splitlines() if line.strip()]
    assert sorted(r["metric"] for r in records) == sorted(METRICS)
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for rec in formats.load_llava(path, tmp_path, check_images=False):
        assert metric_of(rec) == rec.extra["metric"]
        assert score_record(metric_of(rec), rec.answer, rec) == 1.0, rec.id


def test_a_symlinked_images_folder_inside_the_root_gives_paths_the_job_accepts(tmp_path):
    from experiments.mllm.convert.common import Images
    from experiments.mllm.formats import inside_root

    root = tmp_path / "root"
    _touch(root / "coco", "a.jpg")
    link = tmp_path / "link"
    link.symlink_to(root / "coco", target_is_directory=True)
    path = Images(link, image_root=root).path("a.jpg", "test")
    assert path == "coco/a.jpg"                       # not "../link/a.jpg", which the job refuses
    assert inside_root(root / path, root) and (root / path).is_file()
