"""The default multimodal dataset (experiments/mllm/dataset.py), built on a small setting."""
import hashlib
import inspect
import json
import re

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as connected
from sklearn.datasets import load_digits

from experiments.mllm import dataset as ds
from experiments.mllm.formats import load_llava
from experiments.mllm.metrics import normalize_answer, vqa_accuracy

SMALL = {"max_digits": 60, "num_shapes": 20, "num_photos": 30}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm") / "data"
    manifest = ds.build_default_dataset(out, seed=0, **SMALL)
    return out, manifest, {s: ds.load_split(out, s) for s in ds.SPLITS}


def _all(splits):
    return [(split, r) for split, recs in splits.items() for r in recs]


def test_counts_and_split_by_image(built):
    out, manifest, splits = built
    images = {s: {r.images[0] for r in recs} for s, recs in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not images[a] & images[b]
    # per source: round(n * 0.15) test, round(n * 0.1) val images, the rest train
    expect = {"digits": (60, 9, 6), "shapes": (20, 3, 2), "photos": (30, 4, 3)}
    for source, (n, n_test, n_val) in expect.items():
        got = {s: manifest["sources"][s][source] for s in ds.SPLITS}
        assert got == {"train": n - n_test - n_val, "val": n_val, "test": n_test}
    assert len(list((out / "images").glob("*.png"))) == 110
    for split, recs in splits.items():
        assert manifest["records"][split] == len(recs)
        assert manifest["turns"][split] == sum(len(r.turns) // 2 for r in recs)
        assert sum(manifest["questions"][split].values()) == manifest["turns"][split]
    assert all(len(r.turns) == 4 for r in splits["train"])                # 2 QA turns per train image
    assert all(len(r.turns) == 2 for s in ("val", "test") for r in splits[s])
    assert manifest["records"]["train"] == 83 and manifest["turns"]["train"] == 166   # 45 + 15 + 23 images
    assert manifest["records"]["test"] == 9 * 5 + 3 * 5 + 4 * 3           # every question of every test image


def test_templates_are_shared_across_sources(built):
    """Every template (question text with the object / colour slot) is asked of images of >= 2
    sources, every template is used, and every open question's text is asked of >= 2 sources."""
    _, manifest, splits = built
    by_template, by_text = {}, {}
    for _, r in _all(splits):
        for (question, _), qtype, template in zip(r.qa_pairs(), r.extra["turn_types"], r.extra["turn_templates"]):
            question = question.replace("<image>\n", "")
            assert template in ds.TEMPLATES[qtype]
            slot = re.escape(template).replace(r"\{\}", "(.+)")
            assert re.fullmatch(slot, question), (template, question)
            by_template.setdefault(template, set()).add(r.extra["source"])
            if qtype != "mme":
                by_text.setdefault(question, set()).add(r.extra["source"])
    assert set(by_template) == {t for ts in ds.TEMPLATES.values() for t in ts}
    assert all(len(sources) >= 2 for sources in by_template.values()), by_template
    assert all(len(sources) >= 2 for sources in by_text.values()), by_text
    assert {t: sorted(s) for t, s in by_template.items()} == manifest["templates"]
    for qtype in ("what", "mme"):   # asked of every source
        assert {src for src, types in ds.SOURCE_TYPES.items() if qtype in types} == set(ds.SOURCES)


def _mme_answer(question, obj, color):
    m = re.fullmatch(r"Is there (.+) in the image\?", question)
    if m:
        assert m.group(1) in ds.OBJECTS
        return "yes" if m.group(1) == obj else "no"
    m = re.fullmatch(r"Is the main object (\w+)\?", question)
    assert m and m.group(1) in ds.COLORS
    return "yes" if m.group(1) == color else "no"


def test_digit_answers_match_sklearn_and_the_pixels(built):
    _, _, splits = built
    digits = load_digits()
    seen = set()
    for _, r in _all(splits):
        if r.extra["source"] != "digits":
            continue
        i, label = r.extra["source_index"], r.extra["label"]
        d = int(digits.target[i])
        assert label["digit"] == d and r.id.startswith(f"digits-{i:05d}-")
        expected = {"what": str(d), "color": label["color"], "count": str(label["count"])}
        for (question, answer), qtype in zip(r.qa_pairs(), r.extra["turn_types"]):
            seen.add(qtype)
            want = _mme_answer(question.replace("<image>\n", ""), f"a {d}", label["color"]) if qtype == "mme" \
                else expected[qtype]
            assert answer == want
        # the PNG: `count` copies of the sklearn digit (each averaged back to 8x8 correlates with it), in
        # the colour of COLORS[color] (every lit pixel is a multiple of it), black elsewhere
        png = np.asarray(Image.open(r.images[0]), np.float32)
        lit = png.max(-1) > 40
        rgb = np.asarray(ds.COLORS[label["color"]], np.float32)
        scale = png[lit] @ rgb / (rgb @ rgb)
        np.testing.assert_allclose(png[lit], scale[:, None] * rgb, atol=2.5)
        quads = [png[(q // 2) * 16:(q // 2 + 1) * 16, (q % 2) * 16:(q % 2 + 1) * 16].max(-1) for q in range(4)]
        if label["count"] == 1:
            copies = [png.max(-1).reshape(8, 4, 8, 4).mean((1, 3))]
        else:
            assert sorted(q for q in range(4) if quads[q].max() > 0) == label["quadrants"]
            assert len(label["quadrants"]) == label["count"]
            copies = [quads[q].reshape(8, 2, 8, 2).mean((1, 3)) for q in label["quadrants"]]
        for small in copies:
            assert np.corrcoef(small.ravel(), digits.images[i].ravel())[0, 1] > 0.9
    assert seen == {"what", "color", "count", "mme"}


def test_shape_answers_match_the_images(built):
    _, _, splits = built
    for _, r in _all(splits):
        if r.extra["source"] != "shapes":
            continue
        label = r.extra["label"]
        png = np.asarray(Image.open(r.images[0]))
        mask = (png != 255).any(-1)
        assert connected(mask, connectivity=2).max() == label["count"]
        np.testing.assert_array_equal(np.unique(png[mask], axis=0), [ds.COLORS[label["color"]]])
        expected = {"count": str(label["count"]), "what": label["shape"], "color": label["color"]}
        for (question, answer), qtype in zip(r.qa_pairs(), r.extra["turn_types"]):
            want = _mme_answer(question.replace("<image>\n", ""), f"a {label['shape']}", label["color"]) \
                if qtype == "mme" else expected[qtype]
            assert answer == want


def test_test_photos_are_held_out_regions_and_no_eval_image_is_a_train_image(built):
    """Val / test photo crops lie in cells that no train crop touches (faces: other people), the
    recorded region is the image's source (resized back, it matches the PNG), and no val / test PNG
    of any source is pixel-identical to a train PNG."""
    _, _, splits = built
    regions = {s: [] for s in ds.SPLITS}
    labels = {p.label: p for p in ds.PHOTOS}
    for split, r in _all(splits):
        if r.extra["source"] != "photos":
            continue
        photo = labels[r.extra["label"]]
        region = r.extra["region"]
        assert region[0] in {s.loader for s in photo.sources}
        regions[split].append((region, r.extra["unit"]))
        for (question, answer), qtype in zip(r.qa_pairs(), r.extra["turn_types"]):
            want = _mme_answer(question.replace("<image>\n", ""), photo.phrase, None) if qtype == "mme" \
                else photo.label
            assert answer == want and qtype in ds.SOURCE_TYPES["photos"]
        # the region is where the pixels come from (either orientation)
        array = ds.photo_array(region[0])
        if region[0] == "lfw_subset":
            _, face, top, left, side = region
            src = array[face][top:top + side, left:left + side]
        else:
            _, top, left, side = region
            src = array[top:top + side, left:left + side]
        png = np.asarray(Image.open(r.images[0]), np.float32)
        back = [np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize(png.shape[:2], Image.Resampling.BOX),
                           np.float32) for x in (src, src[:, ::-1])]
        assert min(np.abs(b - png).mean() for b in back) < 1.0 if side >= 32 else True

    def overlap(a, b):
        if a[0] != b[0]:
            return False
        if a[0] == "lfw_subset":
            return a[1] == b[1]                       # the same person
        return a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[3] and b[2] < a[2] + a[3]

    for held in ("val", "test"):
        assert regions[held]
        for reg, unit in regions[held]:
            assert not any(overlap(reg, tr) for tr, _ in regions["train"]), (held, reg)
            assert unit not in {u for _, u in regions["train"]}

    def digest(path):
        return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()

    train = {digest(r.images[0]) for r in splits["train"]}
    assert not any(digest(r.images[0]) in train for s in ("val", "test") for r in splits[s])


def test_photo_cells_are_disjoint_squares_inside_the_photographs():
    units = ds.photo_units(0, 0.1, 0.15)
    for photo in ds.PHOTOS:
        split_cells = units[photo.label]
        cells = [c for s in ds.SPLITS for c in split_cells[s]]
        assert len(cells) == len(set(cells)) >= 40 and all(split_cells[s] for s in ds.SPLITS)
        assert len(split_cells["test"]) == round(len(cells) * 0.15)
        for loader, top, left, side in cells:
            array = ds.photo_array(loader)
            if loader == "lfw_subset":
                assert 0 <= top < 100 and side == 25
                continue
            assert 0 <= top and top + side <= array.shape[0] and 0 <= left and left + side <= array.shape[1]
            grid = [(t, lf) for ld, t, lf, _ in cells if ld == loader]
            assert all((t - top) % side == 0 and (lf - left) % side == 0 for t, lf in grid)   # one grid: disjoint


def test_eval_records_pairs_and_question_types(built):
    _, _, splits = built
    for split in ("val", "test"):
        pairs = {}
        for r in splits[split]:
            if r.extra["question_type"] == "mme":
                pairs.setdefault(r.extra["pair_id"], []).append(normalize_answer(r.answer))
            else:
                assert "pair_id" not in r.extra
        assert pairs and all(sorted(v) == ["no", "yes"] for v in pairs.values())
    per_image = {}
    for r in splits["test"]:     # test: every question type of the source, mme twice
        per_image.setdefault(r.images[0], []).append((r.extra["source"], r.extra["question_type"]))
    for qs in per_image.values():
        assert sorted(t for _, t in qs) == sorted(ds.SOURCE_TYPES[qs[0][0]] + ("mme",))
    val_types = {}
    for r in splits["val"]:      # val: one question type per image (mme: its pair)
        val_types.setdefault(r.images[0], set()).add(r.extra["question_type"])
    assert all(len(t) == 1 for t in val_types.values())
    for recs in splits.values():
        for r in recs:
            for (_, answer), answers in zip(r.qa_pairs(), r.extra["turn_answers"]):
                assert len(answers) == 10 and 1 <= len(answer.split()) <= 2
                assert vqa_accuracy(answer, answers) == 1.0  # the answer is a majority reference


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


def test_default_config_has_at_least_2000_test_questions(tmp_path):
    """The data section of mllm-digits (as experiments/mllm/data.py passes it) is the builder's
    default and gives >= 2000 test questions on every question type and source."""
    from experiments.registry import load_job

    _, config = load_job("mllm-digits")
    d = config.data
    kwargs = {"image_size": d.image_size, "max_digits": d.max_digits or None, "num_shapes": d.num_shapes,
              "num_photos": d.num_photos}
    defaults = {k: p.default for k, p in inspect.signature(ds.build_default_dataset).parameters.items() if k in kwargs}
    assert kwargs == defaults and d.max_test == 0
    m = ds.build_default_dataset(tmp_path / "full", seed=config.seed, **kwargs)
    assert m["records"]["test"] == m["turns"]["test"] >= 2000
    assert set(m["questions"]["test"]) == {"what", "color", "count", "mme"}
    assert set(m["sources"]["test"]) == set(ds.SOURCES) and m["records"]["val"] >= 300
    assert all(len(s) >= 2 for s in m["templates"].values())


def test_bad_arguments_and_offline_photos(tmp_path):
    with pytest.raises(ValueError, match="test_fraction, val_fraction"):
        ds.build_default_dataset(tmp_path, test_fraction=0.6, val_fraction=0.5)
    with pytest.raises(ValueError, match="image_size"):
        ds.build_default_dataset(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="split.*empty"):
        ds.build_default_dataset(tmp_path, max_digits=2, num_shapes=0, num_photos=0)
    with pytest.raises(ValueError, match="split"):
        ds.load_split(tmp_path, "dev")
    # every photograph loads offline (scikit-image ships these files)
    for source in {s for photo in ds.PHOTOS for s in photo.sources}:
        x = ds.photo_array(source.loader)
        assert x.dtype == np.uint8 and x.shape[-1] == 3
