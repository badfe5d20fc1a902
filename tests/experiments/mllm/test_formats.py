"""LLaVA / InternVL formats (experiments/mllm/formats.py) and image loading (experiments/mllm/images.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from experiments.mllm import images
from experiments.mllm.formats import (
    FormatError, Record, Turn, load_internvl_meta, load_llava, read_internvl_meta, write_internvl_meta,
    write_llava,
)


@pytest.fixture
def root(tmp_path):
    """An image root with a.png, b.png (4x4 RGB) and sub/c.png."""
    (tmp_path / "sub").mkdir()
    for name, value in (("a.png", 10), ("b.png", 20), ("sub/c.png", 30)):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / name)
    return tmp_path


def conv(*texts):
    roles = ["human", "gpt"]
    return [{"from": roles[i % 2], "value": t} for i, t in enumerate(texts)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "r1", "image": "a.png", "conversations": conv("<image>\nWhat is it?", "red", "Sure?", "yes"),
     "question_type": "color", "answers": ["red"] * 10},
    {"id": 7, "image": ["a.png", "sub/c.png"], "conversations": conv("<image> and <image>: same?", "no")},
    {"id": "text-only", "conversations": conv("Hello?", "Hi.")},
]


def test_load_json_list_and_jsonl_give_the_same_records(root):
    from_json = load_llava(_write_json(root / "data.json", ROWS), root)
    from_jsonl = load_llava(write_jsonl(root / "data.jsonl", ROWS), root)
    assert from_json == from_jsonl
    r1, r7, rt = from_json
    assert r1 == Record("r1", (root / "a.png",), (Turn("human", "<image>\nWhat is it?"), Turn("gpt", "red"),
                                                   Turn("human", "Sure?"), Turn("gpt", "yes")),
                        {"question_type": "color", "answers": ["red"] * 10})
    assert r1.qa_pairs() == [("What is it?", "red"), ("Sure?", "yes")]
    assert (r1.question, r1.answer) == ("Sure?", "yes")
    assert r7.id == "7" and r7.images == (root / "a.png", root / "sub" / "c.png") and r7.extra == {}
    assert rt.images == () and rt.turns[0].text == "Hello?"


def _write_json(path, rows):
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def test_aliases_and_single_image_without_placeholder(root):
    rows = [{"id": "x", "image": "b.png", "conversations": [{"from": "user", "value": "Colour?"},
                                                             {"from": "assistant", "value": "grey"}]}]
    (rec,) = load_llava(write_jsonl(root / "d.jsonl", rows), root)
    # user/assistant normalised; InternVL convention: "<image>\n" prepended to the first human turn
    assert rec.turns == (Turn("human", "<image>\nColour?"), Turn("gpt", "grey"))


def test_missing_id_gets_file_stem_and_line(root):
    rows = [{"image": "a.png", "conversations": conv("<image>\nq", "a")}]
    path = root / "anno.jsonl"
    path.write_text("\n" + json.dumps(rows[0]) + "\n", encoding="utf-8")  # blank line 1 is skipped
    assert [r.id for r in load_llava(path, root)] == ["anno:2"]


def test_write_read_round_trip_relative_paths(root):
    recs = load_llava(write_jsonl(root / "d.jsonl", ROWS), root)
    out = root / "out" / "copy.jsonl"
    write_llava(recs, out, root)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["image"] == "a.png" and lines[1]["image"] == ["a.png", "sub/c.png"]
    assert "image" not in lines[2] and lines[0]["answers"] == ["red"] * 10
    assert load_llava(out, root) == recs
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_write_rejects_duplicate_ids_and_reserved_extra(root):
    rec = Record("a", (), (Turn("human", "q"), Turn("gpt", "a")), {})
    with pytest.raises(FormatError, match="duplicate record id 'a'"):
        write_llava([rec, rec], root / "x.jsonl", root)
    with pytest.raises(FormatError, match=r"record 'b'.*reserved key\(s\) \['image'\]"):
        write_llava([Record("b", (), rec.turns, {"image": "z"})], root / "x.jsonl", root)


@pytest.mark.parametrize("row, pattern", [
    ({"id": "m1", "image": "nope.png", "conversations": conv("<image>\nq", "a")},
     r"record 'm1' \(line 1\): image file .*nope\.png does not exist"),
    ({"id": "m2", "image": "a.png", "conversations": {"from": "human"}}, r"record 'm2'.*conversations must be a list"),
    ({"id": "m3", "image": "a.png", "conversations": []}, r"record 'm3'.*conversations is empty"),
    ({"id": "m4", "image": "a.png", "conversations": [{"from": "human"}]},
     r"record 'm4'.*conversations\[0\] must be an object with 'from' and 'value'"),
    ({"id": "m5", "image": "a.png", "conversations": conv("<image>\nq", "a")[::-1]},
     r"record 'm5'.*conversations\[0\] is from 'gpt', expected 'human'"),
    ({"id": "m6", "image": "a.png", "conversations": conv("<image>\nq", "a", "q2")},
     r"record 'm6'.*end with a human turn"),
    ({"id": "m7", "conversations": [{"from": "system", "value": "s"}] + conv("q", "a")},
     r"record 'm7'.*conversations\[0\]\.from must be one of"),
    ({"id": "m8", "image": "a.png", "conversations": conv("<image><image>\nq", "a")},
     r"record 'm8'.*2 <image> placeholder\(s\) over all turns but 1 image\(s\)"),
    ({"id": "m9", "image": ["a.png", "b.png"], "conversations": conv("q", "a")},
     r"record 'm9'.*0 <image> placeholder\(s\) over all turns but 2 image\(s\)"),
    ({"id": "m10", "conversations": conv("<image>\nq", "a")}, r"record 'm10'.*1 <image> placeholder\(s\).*but 0"),
    ({"id": "m11", "image": [], "conversations": conv("q", "a")}, r"record 'm11'.*image must be a non-empty"),
    ({"id": "m12", "image": "a.png", "conversations": conv("<image>\nq", 3)},
     r"record 'm12'.*conversations\[1\]\.value must be a string"),
    ({"id": ["x"], "conversations": conv("q", "a")}, r"record at line 1: id must be a string or integer"),
    ({"id": "m14", "video": "v.mp4", "conversations": conv("q", "a")}, r"record 'm14'.*video records"),
])
def test_malformed_records_name_file_and_id(root, row, pattern):
    path = write_jsonl(root / "bad.jsonl", [row])
    with pytest.raises(FormatError, match=pattern) as info:
        load_llava(path, root)
    assert str(path) in str(info.value)


def test_placeholder_in_a_later_turn_counts(root):
    rows = [{"id": "late", "image": "a.png", "conversations": conv("Hi", "hello", "Now <image> this?", "ok")}]
    (rec,) = load_llava(write_jsonl(root / "d.jsonl", rows), root)
    assert rec.turns[0].text == "Hi" and rec.qa_pairs()[1] == ("Now  this?", "ok")


def test_bad_jsonl_line_number_duplicate_id_and_bad_json_list(root):
    good = json.dumps({"id": "g", "conversations": conv("q", "a")})
    path = root / "broken.jsonl"
    path.write_text(good + "\n\n" + '{"id": "h", "conversations": [\n', encoding="utf-8")
    with pytest.raises(FormatError, match=r"broken\.jsonl: invalid JSON on line 3"):
        load_llava(path, root)
    path.write_text(good + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"record 'g' \(line 2\): duplicate id \(first at line 1\)"):
        load_llava(path, root)
    bad_list = root / "broken.json"
    bad_list.write_text('[\n {"id": "a"},\n oops\n]', encoding="utf-8")
    with pytest.raises(FormatError, match=r"broken\.json: invalid JSON at line 3"):
        load_llava(bad_list, root)
    with pytest.raises(FormatError, match=r"record 'a' \(index 0\): missing 'conversations'"):
        load_llava(_write_json(bad_list, [{"id": "a"}]), root)
    with pytest.raises(FormatError, match=r"missing\.jsonl: file does not exist"):
        load_llava(root / "missing.jsonl", root)


def test_check_images_false_skips_existence(root):
    rows = [{"id": "m", "image": "nope.png", "conversations": conv("<image>\nq", "a")}]
    (rec,) = load_llava(write_jsonl(root / "d.jsonl", rows), root, check_images=False)
    assert rec.images == (root / "nope.png",)


# ------------------------------------------------------------------ InternVL meta
def test_internvl_meta_round_trip_and_repeat_time(root):
    recs = [Record(f"r{i}", (root / "a.png",), (Turn("human", f"<image>\nq{i}"), Turn("gpt", "a")), {"k": i})
            for i in range(10)]
    meta = root / "meta" / "meta.json"
    write_internvl_meta(meta, {"ds_a": recs, "ds_b": recs[:3]}, root)
    raw = json.loads(meta.read_text())
    assert raw["ds_a"] == {"root": "..", "annotation": "ds_a.jsonl", "data_augment": False,
                           "repeat_time": 1.0, "length": 10}
    assert load_internvl_meta(meta) == {"ds_a": recs, "ds_b": recs[:3]}
    entries = read_internvl_meta(meta)
    assert entries["ds_b"]["annotation"] == meta.parent / "ds_b.jsonl" and entries["ds_b"]["length"] == 3

    raw["ds_a"]["repeat_time"] = 2
    raw["ds_b"]["repeat_time"] = 0.5
    meta.write_text(json.dumps(raw))
    loaded = load_internvl_meta(meta, seed=3)
    assert loaded["ds_a"] == recs + recs
    assert len(loaded["ds_b"]) == 1 and loaded["ds_b"][0] in recs[:3]  # int(3 * 0.5) = 1

    raw["ds_a"]["repeat_time"] = 0.55  # int(10 * 0.55) = 5, seeded subset in file order
    meta.write_text(json.dumps(raw))
    sub = load_internvl_meta(meta, seed=3)["ds_a"]
    ids = [r.id for r in sub]
    assert len(ids) == 5 and ids == sorted(ids, key=lambda s: int(s[1:])) and set(ids) <= {r.id for r in recs}
    assert [r.id for r in load_internvl_meta(meta, seed=3)["ds_a"]] == ids
    others = {tuple(r.id for r in load_internvl_meta(meta, seed=s)["ds_a"]) for s in range(4, 12)}
    assert len(others | {tuple(ids)}) > 1  # the seed changes the subset

    raw["ds_a"]["repeat_time"] = 1.5  # 10 + int(10 * 0.5)
    meta.write_text(json.dumps(raw))
    assert len(load_internvl_meta(meta)["ds_a"]) == 15


def test_internvl_meta_errors_name_entry_and_file(root):
    recs = [Record("r0", (root / "a.png",), (Turn("human", "<image>\nq"), Turn("gpt", "a")), {})]
    meta = root / "meta.json"
    write_internvl_meta(meta, {"ds": recs}, root)
    raw = json.loads(meta.read_text())
    meta.write_text(json.dumps({"ds": raw["ds"] | {"length": 4}}))
    with pytest.raises(FormatError, match=r"dataset 'ds': length is 4 but .*ds\.jsonl has 1 records"):
        load_internvl_meta(meta)
    meta.write_text(json.dumps({"ds": raw["ds"] | {"repeat_time": 0}}))
    with pytest.raises(FormatError, match=r"meta\.json: dataset 'ds': repeat_time must be a number > 0"):
        load_internvl_meta(meta)
    meta.write_text(json.dumps({"ds": {"annotation": "ds.jsonl"}}))
    with pytest.raises(FormatError, match=r"dataset 'ds': 'root' must be a string path"):
        load_internvl_meta(meta)
    (root / "a.png").unlink()
    meta.write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"meta\.json: dataset 'ds': .*ds\.jsonl: record 'r0' \(line 1\): "
                                          r"image file .*a\.png does not exist"):
        load_internvl_meta(meta)
    with pytest.raises(FormatError, match="dataset name 'a b'"):
        write_internvl_meta(meta, {"a b": recs}, root)


# ------------------------------------------------------------------ images
def test_load_image_values_modes_and_resize(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.full((5, 5), 51, np.uint8), "L").save(tmp_path / "grey.png")
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "big.jpg")

    out = images.load_image(tmp_path / "rgb.png", 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    Image.fromarray(rgb).resize((2, 2), Image.Resampling.BOX).save(tmp_path / "expect.png")
    np.testing.assert_array_equal(out, np.asarray(Image.open(tmp_path / "expect.png"), np.float32) / 255)
    np.testing.assert_allclose(images.load_image(tmp_path / "grey.png", 5), 0.2, atol=1e-7)  # 51 / 255
    np.testing.assert_allclose(images.load_image(tmp_path / "rgba.png", 5)[..., 0], 1.0)  # alpha dropped
    big = images.load_images([tmp_path / "big.jpg", tmp_path / "grey.png"], 8)
    assert big.shape == (2, 8, 8, 3) and abs(big[0].mean() - 200 / 255) < 0.02
    np.testing.assert_allclose(big[1], 0.2, atol=1e-7)  # bicubic upsampling of a constant image


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("junk.png", "cut.png"):
        with pytest.raises(images.UnreadableImageError, match=rf"{name}: unreadable image"):
            images.load_image(tmp_path / name, 8)
    with pytest.raises(FormatError, match=r"gone\.png: image file does not exist"):
        images.load_image(tmp_path / "gone.png", 8)
    with pytest.raises(ValueError, match="size"):
        images.load_image(tmp_path / "ok.png", 0)


def test_normalize_constants_match_transformers():
    from transformers.image_utils import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD)

    assert images.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and images.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)
    assert images.IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and images.IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)
    x = np.array([[[0.485, 0.456, 0.406], [0.714, 0.680, 0.631]]], np.float32)  # mean, mean + std
    np.testing.assert_allclose(images.normalize(x, images.IMAGENET_MEAN, images.IMAGENET_STD),
                               [[[0, 0, 0], [1, 1, 1]]], atol=1e-5)
    assert images.normalize(np.zeros((2, 3, 3, 3)), images.OPENAI_CLIP_MEAN, images.OPENAI_CLIP_STD)[0, 0, 0, 0] \
        == pytest.approx(-0.48145466 / 0.26862954, rel=1e-6)
    with pytest.raises(ValueError, match="last axis must be 3"):
        images.normalize(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="std > 0"):
        images.normalize(np.zeros((1, 3)), (0, 0, 0), (1, 0, 1))


def test_save_png_round_trip(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    images.save_png(x, tmp_path / "d" / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d" / "x.png")), x)
    with pytest.raises(ValueError, match="uint8"):
        images.save_png(x.astype(np.float32), tmp_path / "y.png")


def test_resize_uint8_is_the_clip_processors_resize():
    """Square images resized to CLIP's size as `CLIPImageProcessorPil` does (bicubic, no crop left)."""
    from transformers import CLIPImageProcessorPil

    x = np.random.default_rng(0).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20},
                                      do_rescale=False, do_normalize=False)
    want = processor(images=list(x), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = images.resize_uint8(x, 20)
    assert got.dtype == np.uint8 and got.shape == (3, 20, 20, 3)
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    assert images.resize_uint8(x, 12) is x
    with pytest.raises(ValueError, match="uint8"):
        images.resize_uint8(x.astype(np.float32), 8)
