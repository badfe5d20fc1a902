"""Referring-expression grounding in the official RefCOCO / RefCOCO+ / RefCOCOg layout, as JSON
(metric "refcoco": precision at IoU >= 0.5 of the first box of the answer).

The official refs file, ``refs(unc).p`` (``refs(umd).p`` for RefCOCOg), is a Python pickle, and a
pickle can run code when it is loaded: this converter never reads one. Export it once to JSON lines
with ``scripts/convert_refcoco_refs.py`` (an unpickler that resolves no global), then convert that file.

Returns ``(records, skipped)`` as `experiments.mllm.convert.vqa` does.
"""
from __future__ import annotations

from pathlib import Path

from experiments.mllm.convert.common import Images, field, read_json, read_json_or_lines, record, text_field

#: InternVL ``eval/refcoco/evaluate_grounding.py``'s question
REFCOCO_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"


def box_answer(bbox_xywh, width: float, height: float) -> str:
    """The reference answer for a COCO box (pixels, x y w h): InternVL's ``[[x1, y1, x2, y2]]``
    with coordinates scaled to 0-1000 and rounded (`experiments.mllm.scorers.refcoco_iou` maps
    them back to pixels)."""
    x, y, w, h = bbox_xywh
    coords = (x / width, y / height, (x + w) / width, (y + h) / height)
    return "[[" + ", ".join(str(round(c * 1000)) for c in coords) + "]]"


def _box(value, where: str) -> list[float]:
    if (not isinstance(value, list) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{where}: bbox must be 4 numbers [x, y, w, h] (COCO, pixels), got {value!r}")
    if value[2] <= 0 or value[3] <= 0:
        raise ValueError(f"{where}: bbox {value} has no area")
    return [float(v) for v in value]


def refcoco(images: Images, *, questions, annotations, split: str | None = None, task: str | None = None,
            suffix: str | None = None) -> tuple[list[dict], dict]:
    """RefCOCO / RefCOCO+ / RefCOCOg -> one record per referring sentence.

    Files: the refs exported as JSON lines (or a JSON list), one ref per line as the pickle holds it:
    ``{"ref_id", "image_id", "ann_id", "split", "sentences": [{"sent", "sent_id", ...}], ...}``
    (a ref may carry its own ``"bbox": [x, y, w, h]`` instead of "ann_id"), and COCO's
    ``instances.json`` of the same dataset (``{"images": [{"id", "file_name", "width", "height"}],
    "annotations": [{"id", "bbox"}]}``): the box is the annotation's (REFER ``getRefBox``), the
    image size and file name the image's. Images (COCO train2014) in `images`.

    Records: "bbox" in COCO pixels with "bbox_format": "xywh", "width" and "height" of the
    original image; the reference answer is `box_answer`; the question `REFCOCO_PROMPT`.

    Args:
      split: keep the refs whose "split" is this ("val", "testA", "testB", "test"); default all.
      task: default ``refcoco_<split>`` (name RefCOCO+ / RefCOCOg ``refcoco+_<split>`` /
        ``refcocog_<split>`` yourself: the files do not say which dataset they are).

    Raises:
      ValueError: not this layout, an image or annotation the refs name that instances.json lacks,
        or no ref of `split` (file and ref id named).
    """
    path, ipath = Path(questions), Path(annotations)
    inst = read_json(ipath, "COCO instances")
    image_info = {}
    for i, im in enumerate(field(inst, "images", list, str(ipath))):
        where = f"{ipath}: images[{i}]"
        image_info[field(im, "id", int, where)] = (text_field(im, "file_name", where),
                                                   field(im, "width", (int, float), where),
                                                   field(im, "height", (int, float), where))
    boxes = {}
    for i, ann in enumerate(inst.get("annotations") or []):
        where = f"{ipath}: annotations[{i}]"
        boxes[field(ann, "id", int, where)] = (ann.get("bbox"), where)
    task = task or (f"refcoco_{split}" if split else "refcoco")
    out = []
    for loc, ref in read_json_or_lines(path, "RefCOCO refs"):
        where = f"{path}: {loc}"
        ref_id = field(ref, "ref_id", int, where)
        where = f"{path}: {loc} (ref {ref_id})"
        if split is not None and ref.get("split") != split:
            continue
        image_id = field(ref, "image_id", int, where)
        if image_id not in image_info:
            raise ValueError(f"{where}: image_id {image_id} is not in {ipath}")
        file_name, width, height = image_info[image_id]
        if ref.get("bbox") is not None:
            bbox = _box(ref["bbox"], where)
        else:
            ann_id = field(ref, "ann_id", int, where)
            if ann_id not in boxes:
                raise ValueError(f"{where}: ann_id {ann_id} is not in the annotations of {ipath}")
            bbox = _box(boxes[ann_id][0], boxes[ann_id][1])
        image = images.path(file_name, where)
        sentences = field(ref, "sentences", list, where)
        if not sentences:
            raise ValueError(f"{where}: 'sentences' is empty")
        for k, s in enumerate(sentences):
            swhere = f"{where}: sentences[{k}]"
            sent = text_field(s, "sent", swhere)
            sid = s.get("sent_id", k)
            out.append(record(f"{task}:{ref_id}:{sid}", image, REFCOCO_PROMPT.format(sent),
                              box_answer(bbox, width, height), task, "refcoco", "" if suffix is None else suffix,
                              bbox=bbox, bbox_format="xywh", width=width, height=height, ref_id=ref_id))
    if not out:
        raise ValueError(f"{path}: no ref" + (f" with \"split\": {split!r}" if split else "") + " in the file")
    return out, {}
