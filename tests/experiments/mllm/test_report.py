"""The multimodal report's intervals (experiments/mllm/report.py): exact match / VQA accuracy with
95% intervals, per question type, delta_vs_dense and its verdict, against an independent numpy
bootstrap over test images; the markdown table."""
import numpy as np
import pytest

from experiments.mllm.metrics import exact_match, question_scores, vqa_accuracy
from experiments.mllm.report import dense_comparison, markdown


def _results(seed=0):
    """60 test images with 4 questions each (types what / color / mme x 2); dense right on 50% of
    the questions, 'better' on 75%, 'same' = dense."""
    rng = np.random.default_rng(seed)
    rows, preds = [], {"dense": [], "better": [], "same": []}
    for img in range(60):
        for k, (t, ans) in enumerate((("what", "7"), ("color", "red"), ("mme", "yes"), ("mme", "no"))):
            rows.append({"id": f"i{img}-{k}", "image": img, "question_type": t, "answer": ans, "answers": [ans] * 10,
                         "pair_id": f"i{img}" if t == "mme" else None, "source": "digits"})
            preds["dense"].append(ans if rng.random() < 0.5 else "blue")
            preds["better"].append(ans if rng.random() < 0.75 else "blue")
    preds["same"] = list(preds["dense"])
    scores = {n: question_scores(rows, {r["id"]: p for r, p in zip(rows, ps)}) for n, ps in preds.items()}
    systems = [{"name": n, "scores": {}} for n in ("dense", "better", "same")]
    return {"test_rows": rows, "question_scores": scores, "systems": systems}, preds


def _by_hand(values, image, reference, resamples, seed):
    """Percentile bootstrap over images, written out with numpy: per-image sums, the same seeded draws."""
    images = np.unique(image)
    a = np.array([values[image == i].sum() for i in images])
    b = np.array([reference[image == i].sum() for i in images])
    n = np.array([(image == i).sum() for i in images], float)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, resamples, 256):
        idx = rng.integers(0, len(images), size=(min(256, resamples - start), len(images)))
        stats.append((a - b)[idx].sum(1) / n[idx].sum(1))
    return np.quantile(np.concatenate(stats), [0.025, 0.975])


def test_question_scores_are_the_per_question_metrics():
    results, preds = _results()
    rows = results["test_rows"]
    q = results["question_scores"]["better"]
    assert q["exact_match"] == [exact_match(p, r["answer"]) for p, r in zip(preds["better"], rows)]
    assert q["vqa_accuracy"] == [vqa_accuracy(p, r["answers"]) for p, r in zip(preds["better"], rows)]


def test_intervals_and_delta_vs_dense_match_a_bootstrap_by_hand():
    results, _ = _results()
    comparison = dense_comparison(results, seed=3, margin=0.01, resamples=500)
    image = np.array([r["image"] for r in results["test_rows"]])
    qtype = np.array([r["question_type"] for r in results["test_rows"]])
    em = {n: np.array(results["question_scores"][n]["exact_match"]) for n in ("dense", "better", "same")}
    zero = np.zeros(len(image))
    dense, better, same = results["systems"]
    assert better["exact_match"] == pytest.approx(em["better"].mean(), abs=1e-12)
    assert better["intervals"]["exact_match"]["ci95"] == pytest.approx(
        list(_by_hand(em["better"], image, zero, 500, 3)), abs=1e-12)
    for t in ("what", "color", "mme"):
        m = qtype == t
        by = better["intervals"]["exact_match_by_type"][t]
        assert by["n"] == m.sum() and by["exact_match"] == pytest.approx(em["better"][m].mean(), abs=1e-12)
        assert by["ci95"] == pytest.approx(list(_by_hand(em["better"][m], image[m], zero[m], 500, 3)), abs=1e-12)
    d = better["delta_vs_dense"]
    assert d["mean"] == pytest.approx(em["better"].mean() - em["dense"].mean(), abs=1e-12)
    assert d["ci95"] == pytest.approx(list(_by_hand(em["better"], image, em["dense"], 500, 3)), abs=1e-12)
    assert d["ci95"][0] > 0 and d["verdict"] == "better"        # +25 points on 240 questions: clear
    assert d["units"] == 60 and d["questions"] == 240 and d["seeds"] == [3] and d["std"] is None
    assert same["delta_vs_dense"]["ci95"] == [0.0, 0.0] and same["delta_vs_dense"]["verdict"] == "within margin"
    assert dense["delta_vs_dense"]["verdict"] == "reference"
    assert comparison["metric_key"] == "exact_match" and comparison["higher_is_better"] is True
    assert comparison["parity_margin"] == 0.01 and "60 test images" in comparison["statistic"]


def test_markdown_shows_the_intervals_delta_and_verdict():
    results, _ = _results()
    comparison = dense_comparison(results, seed=0, margin=0.01, resamples=200)
    for s in results["systems"]:
        em = np.mean(results["question_scores"][s["name"]]["exact_match"])
        vqa = np.mean(results["question_scores"][s["name"]]["vqa_accuracy"])
        s.update(router="", answer_nll=1.0, scores={
            "all": {"n": 240, "exact_match": em, "vqa_accuracy": vqa},
            **{t: {"n": 60 if t != "mme" else 120, "exact_match": s["intervals"]["exact_match_by_type"][t]["exact_match"]}
               for t in ("color", "mme", "what")}})
    rep = {"config": {"name": "m", "partition": {"num_clusters": 2}}, "question_types": ["color", "mme", "what"],
           "num_test_questions": 240, "num_test_images": 60, "num_val_questions": 10, "temperature": 1.0,
           "comparison": comparison, "systems": results["systems"],
           "partition": {"images_per_cluster": [1, 1], "conversations_per_cluster": [1, 1],
                         "test_images_per_cluster": [30, 30]},
           "train_clusters_by_source": {}, "routing_by_source": {"sources": [], "weights": {}}, "stages": {}}
    md = markdown(rep)
    better = results["systems"][1]
    lo, hi = (100 * x for x in better["delta_vs_dense"]["ci95"])
    row = next(line for line in md.splitlines() if line.startswith("| better |"))
    assert f"{100 * better['delta_vs_dense']['mean']:+.1f} ± - [{lo:+.1f}, {hi:+.1f}]" in row
    assert row.rstrip(" |").endswith("better")
    ci = better["intervals"]["exact_match"]["ci95"]
    assert f"{100 * better['exact_match']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" in row
    assert "| system | color (n=60) | mme (n=120) | what (n=60) |" in md
    assert "Margin m = 1 EM point(s)" in md


def test_benchmark_scores_are_a_table_not_a_question_type():
    """Records scored by their own metric (``scores.by_task``, e.g. from ``dfm data convert``) are not a
    question type, and report.md lists them per system (the KeyError 'n' of a report with converted files)."""
    from experiments.mllm.report import _types, benchmark_lines

    by_task = {"vqav2_val": {"metric": "vqa", "n": 3, "score": 0.6}, "pope_random": {"metric": "pope", "n": 4,
                                                                                      "score": 0.75, "f1": 0.8}}
    systems = [{"name": "dense", "scores": {"all": {"n": 7}, "what": {"n": 7}, "by_task": by_task}},
               {"name": "ensemble/centroid-top1", "scores": {"all": {"n": 7}, "what": {"n": 7},
                                                            "by_task": {"vqav2_val": {**by_task["vqav2_val"],
                                                                                      "score": 1 / 3}}}}]
    assert _types(systems) == ["what"]
    lines = benchmark_lines(systems)
    assert "| system | vqav2_val (vqa, n=3) | pope_random (pope, n=4) |" in lines
    assert "| dense | 60.0 | 75.0 |" in lines and "| ensemble/centroid-top1 | 33.3 | — |" in lines
    assert benchmark_lines([{"name": "dense", "scores": {"all": {"n": 1}}}]) == []
