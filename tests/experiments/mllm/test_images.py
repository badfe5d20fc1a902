"""Image paths of LLaVA / InternVL records stay inside their image root unless the config opts in
(docs/reliability.md#security), and an unreadable image is traced to the record and line that uses it."""
import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.engine.pipeline import open_run
from experiments.engine.config import resolve_path
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.mllm.formats import FormatError, load_internvl_meta, load_llava
from experiments.mllm.images import UnreadableImageError
from experiments.mllm.task import MultimodalTask


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _record(rid: str, image: str) -> str:
    return json.dumps({"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]})


@pytest.fixture
def layout(tmp_path):
    """`root/` with one image inside, `outside/secret.png` beside it, and a symlink inside the root
    that points outside."""
    root = tmp_path / "root"
    _png(root / "in.png")
    _png(tmp_path / "outside" / "secret.png", 1)
    os.symlink(tmp_path / "outside", root / "link")
    return root


@pytest.mark.parametrize("image, shown", [
    ("../outside/secret.png", "'../outside/secret.png'"),
    ("sub/../../outside/secret.png", "'sub/../../outside/secret.png'"),
    ("../../../../etc/passwd", "'../../../../etc/passwd'"),
    ("link/secret.png", "'link/secret.png'"),                     # a symbolic link leaving the root
])
def test_a_path_that_leaves_the_root_is_refused(layout, image, shown):
    (layout / "data.jsonl").write_text(_record("a", "in.png") + "\n" + _record("b", image) + "\n")
    with pytest.raises(FormatError) as e:
        load_llava(layout / "data.jsonl", layout)
    assert str(e.value) == (f"{layout / 'data.jsonl'}: record 'b' (line 2): image path {shown} leaves the image "
                            f"root {str(layout)!r}; set [data] allow_outside_root = true to read images outside it")


def test_absolute_paths_follow_the_same_rule(layout):
    outside = str(layout.parent / "outside" / "secret.png")
    (layout / "data.jsonl").write_text(_record("a", str(layout / "in.png")) + "\n" + _record("b", outside) + "\n")
    with pytest.raises(FormatError, match=r"record 'b' \(line 2\): image path .* leaves the image root"):
        load_llava(layout / "data.jsonl", layout)
    (layout / "data.jsonl").write_text(_record("a", str(layout / "in.png")) + "\n")
    assert load_llava(layout / "data.jsonl", layout)[0].images == (layout / "in.png",)


def test_the_opt_in_reads_outside_the_root(layout):
    (layout / "data.jsonl").write_text(_record("b", "../outside/secret.png") + "\n" + _record("c", "link/secret.png"))
    records = load_llava(layout / "data.jsonl", layout, allow_outside_root=True)
    assert [r.images for r in records] == [(layout.parent / "outside" / "secret.png",),
                                           (layout / "link" / "secret.png",)]


def test_internvl_meta_roots_confine_their_records(layout, tmp_path):
    (tmp_path / "ann.jsonl").write_text(_record("x", "../outside/secret.png") + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"photos": {"root": "root", "annotation": "ann.jsonl"}}))
    with pytest.raises(FormatError, match=r"dataset 'photos': .*record 'x' \(line 1\): image path "
                                          r"'../outside/secret.png' leaves the image root"):
        load_internvl_meta(tmp_path / "meta.json")
    assert len(load_internvl_meta(tmp_path / "meta.json", allow_outside_root=True)["photos"]) == 1


def _config(data: Path, **extra) -> MultimodalExperimentConfig:
    raw = tomllib.loads(resolve_path("mllm-tiny").read_text())
    raw["data"] = {"source": "llava", "train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"),
                   "test": str(data / "test.jsonl"), "image_root": str(data / "images"), "image_size": 16,
                   "vocab_size": 300, **extra}
    return MultimodalExperimentConfig.from_dict(raw, "llava-small")


def _files(data: Path, train_images: list[str]) -> None:
    for i in range(4):
        _png(data / "images" / f"{i}.png", i)
    (data / "train.jsonl").write_text("".join(_record(f"t{i}", im) + "\n" for i, im in enumerate(train_images)))
    for split in ("val", "test"):
        (data / f"{split}.jsonl").write_text(_record(f"{split}0", "0.png") + "\n")


def test_the_job_honours_the_config_switch(tmp_path):
    task = MultimodalTask()
    data = tmp_path / "data"
    _files(data, ["0.png", "1.png", "../outside.png"])
    _png(data / "outside.png", 9)
    config = _config(data)
    with pytest.raises(FormatError, match=r"train.jsonl: record 't2' \(line 3\): image path '../outside.png' leaves"):
        task.prepare_data(config, open_run(config, tmp_path / "run"), log=lambda *a: None)
    config = _config(data, allow_outside_root=True)
    assert task.prepare_data(config, open_run(config, tmp_path / "run2"),
                             log=lambda *a: None).summary["records"]["train"] == 3


def test_an_unreadable_image_names_the_record_and_line(tmp_path):
    task = MultimodalTask()
    data = tmp_path / "data"
    _files(data, ["0.png", "1.png", "2.png", "1.png"])
    (data / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = _config(data)
    with pytest.raises(UnreadableImageError) as e:
        task.prepare_data(config, open_run(config, tmp_path / "run"), log=lambda *a: None)
    assert str(e.value).startswith(f"{data / 'train.jsonl'}: record 't2' (line 3): {data / 'images' / '2.png'}: "
                                   f"unreadable image (")
