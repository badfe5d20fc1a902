"""The default multimodal dataset (experiments/mllm/dataset.py), built on a small setting."""
import json
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from skimage.measure import label as connected

from experiments.mllm import dataset as ds
from experiments.mllm.formats import load_llava
from experiments.mllm.metrics import normalize_answer, vqa_accuracy

SMALL = dict(max_digits=60, num_shapes=20, num_photos=24)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm") / "data"
    manifest = ds.build_default_dataset(out, seed=0, **SMALL)
    return out, manifest, {s: ds.load_split(out, s) for s in ds.SPLITS}


def test_counts_and_split_by_image(built):
    out, manifest, splits = built
    images = {s: {r.images[0] for r in recs} for s, recs in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not images[a] & images[b]
    # per source: round(n * 0.15) test, round(n * 0.1) val images, the rest train
    expect = {"digits": (60, 9, 6), "shapes": (20, 3, 2), "photos": (24, 4, 2)}
    for source, (n, n_test, n_val) in expect.items():
        got = {s: manifest["sources"][s][source] for s in ds.SPLITS}
        assert got == {"train": n - n_test - n_val, "val": n_val, "test": n_test}
    assert len(list((out / "images").glob("*.png"))) == 104
    for split, recs in splits.items():
        assert manifest["records"][split] == len(recs)
        assert manifest["turns"][split] == sum(len(r.turns) // 2 for r in recs)
        assert sum(manifest["questions"][split].values()) == manifest["turns"][split]
    assert all(len(r.turns) == 4 for r in splits["train"])                # 2 QA turns per train image
    assert all(len(r.turns) == 2 for s in ("val", "test") for r in splits[s])
    assert manifest["records"]["train"] == 78 and manifest["turns"]["train"] == 156  # 45 + 15 + 18 images


def test_records_are_llava_with_consistent_answers(built):
    out, _, splits = built
    for recs in splits.values():
        for r in recs:
            assert r.turns[0].text.startswith("<image>\n") and sum("<image>" in t.text for t in r.turns) == 1
            assert r.images[0] == out / "images" / f"{r.id.rsplit('-', 1)[0]}.png"
            assert len(r.extra["turn_types"]) == len(r.turns) // 2 == len(r.extra["turn_answers"])
            assert r.extra["question_type"] == r.extra["turn_types"][0]
            for (_, answer), answers in zip(r.qa_pairs(), r.extra["turn_answers"]):
                assert len(answers) == 10 and 1 <= len(answer.split()) <= 2
                assert vqa_accuracy(answer, answers) == 1.0  # the answer is a majority reference


def test_digit_answers_match_sklearn_targets(built):
    out, _, splits = built
    digits = load_digits()
    seen = set()
    for r in (r for recs in splits.values() for r in recs if r.extra["source"] == "digits"):
        i = r.extra["source_index"]
        d = int(digits.target[i])
        assert r.extra["label"] == d and r.id.startswith(f"digits-{i:05d}-")
        for (question, answer), qtype in zip(r.qa_pairs(), r.extra["turn_types"]):
            seen.add(qtype)
            if qtype == "digit":
                assert answer == str(d)
            elif qtype == "parity":
                assert answer == ("even" if d % 2 == 0 else "odd")
            elif qtype == "compare":
                t = int(re.fullmatch(r"Is the digit greater than (\d)\?", question).group(1))
                assert answer == ("yes" if d > t else "no")
            else:
                asked = int(re.fullmatch(r"Is this the digit (\d)\?", question).group(1))
                assert answer == ("yes" if asked == d else "no")
        # the PNG is the sklearn digit: its brightness, averaged back to 8x8, correlates with it
        png = np.asarray(Image.open(r.images[0]), np.float32).max(-1)
        small = png.reshape(8, 4, 8, 4).mean((1, 3))
        assert np.corrcoef(small.ravel(), digits.images[i].ravel())[0, 1] > 0.9
    assert seen == {"digit", "parity", "compare", "mme"}


def test_shape_and_photo_answers_match_the_images(built):
    _, _, splits = built
    for r in (r for recs in splits.values() for r in recs):
        src, label = r.extra["source"], r.extra["label"]
        if src == "shapes":
            png = np.asarray(Image.open(r.images[0]))
            mask = (png != 255).any(-1)
            assert connected(mask, connectivity=2).max() == label["count"]
            np.testing.assert_array_equal(np.unique(png[mask], axis=0), [ds.COLORS[label["color"]]])
            for (question, answer), qtype in zip(r.qa_pairs(), r.extra["turn_types"]):
                expected = {"count": str(label["count"]), "shape": label["shape"], "color": label["color"]}
                if qtype == "mme":
                    assert answer == ("yes" if (label["shape"] in question.split()
                                                or label["color"] in question.split()) else "no")
                else:
                    assert answer == expected[qtype]
        elif src == "photos":
            i = int(r.id.split("-")[1])
            photo = ds.PHOTOS[i % len(ds.PHOTOS)]
            assert label == photo.label and r.extra["source_index"] == photo.loader
            for (question, answer), qtype in zip(r.qa_pairs(), r.extra["turn_types"]):
                if qtype == "name":
                    assert answer == photo.label
                else:
                    assert answer == ("yes" if question == f"Does this image show {photo.phrase}?" else "no")


def test_eval_mme_pairs_and_balanced_types(built):
    _, manifest, splits = built
    for split in ("val", "test"):
        pairs = {}
        for r in splits[split]:
            if r.extra["question_type"] == "mme":
                pairs.setdefault(r.extra["pair_id"], []).append(normalize_answer(r.answer))
            else:
                assert "pair_id" not in r.extra
        assert pairs and all(sorted(v) == ["no", "yes"] for v in pairs.values())
    # test digits: 9 images over 4 types in equal shares (3, 2, 2, 2 in some order); mme has 2 questions each
    test_digits = [r for r in splits["test"] if r.extra["source"] == "digits"]
    per_image = {}
    for r in test_digits:
        per_image.setdefault(r.images[0], set()).add(r.extra["question_type"])
    counts = sorted(sum(t == {q} for t in per_image.values()) for q in ("digit", "parity", "compare", "mme"))
    assert counts == [2, 2, 2, 3]


def test_deterministic_idempotent_and_rebuilt_on_new_params(built, tmp_path):
    out, manifest, _ = built
    other = tmp_path / "again"
    m2 = ds.build_default_dataset(other, seed=0, **SMALL)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        a = (out / name).read_text().replace(str(out), "")
        assert a == (other / name).read_text()
    for png in ("digits-00003.png", "shapes-00004.png", "photos-00005.png"):
        assert (out / "images" / png).read_bytes() == (other / "images" / png).read_bytes()
    assert {k: v for k, v in m2.items() if k not in ("paths", "seconds")} == \
        {k: v for k, v in manifest.items() if k not in ("paths", "seconds")}

    stamp = (other / "train.jsonl").stat().st_mtime_ns
    again = ds.build_default_dataset(other, seed=0, **SMALL)  # complete build: nothing rewritten
    assert (other / "train.jsonl").stat().st_mtime_ns == stamp and again["seconds"] == m2["seconds"]
    assert again["paths"]["test"] == other / "test.jsonl"

    m3 = ds.build_default_dataset(other, seed=1, max_digits=30, num_shapes=10, num_photos=10)
    assert json.loads((other / "manifest.json").read_text())["params"]["seed"] == 1
    assert len(list((other / "images").glob("*.png"))) == 50  # stale images of the first build removed
    assert (other / "train.jsonl").read_text() != (out / "train.jsonl").read_text().replace(str(out), "")
    assert sum(m3["images"].values()) == 50
    load_llava(other / "test.jsonl", other)  # every referenced image exists


def test_default_sizes_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="test_fraction, val_fraction"):
        ds.build_default_dataset(tmp_path, test_fraction=0.6, val_fraction=0.5)
    with pytest.raises(ValueError, match="image_size"):
        ds.build_default_dataset(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="split.*empty"):
        ds.build_default_dataset(tmp_path, max_digits=2, num_shapes=0, num_photos=0)
    with pytest.raises(ValueError, match="split"):
        ds.load_split(tmp_path, "dev")
    # every photo class loads offline (scikit-image ships these files)
    for photo in ds.PHOTOS:
        x = ds.photo_array(photo.loader)
        assert x.dtype == np.uint8 and x.shape[-1] == 3
