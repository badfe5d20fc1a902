"""Yes / no benchmarks in their official layouts: POPE (metric "pope": accuracy, precision,
recall, F1 with "yes" positive, yes-ratio) and MME (metric "mme": acc and acc+ over the two
questions of each image).

Each converter returns ``(records, skipped)`` as `experiments.mllm.convert.vqa` does.
"""
from __future__ import annotations

from pathlib import Path

from experiments.mllm.convert.common import (
    SHORT_ANSWER,
    Images,
    field,
    read_json_or_lines,
    read_text,
    record,
    text_field,
)

#: image files MME ships (some categories .jpg, others .png)
MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def pope(images: Images, *, questions, task: str | None = None,
         suffix: str | None = None) -> tuple[list[dict], dict]:
    """POPE -> records whose reference answer is the "label" (yes / no).

    File: ``coco_pope_{random,popular,adversarial}.json``, JSON lines ``{"question_id", "image",
    "text", "label": "yes" | "no"}``; images (COCO val2014, ``COCO_val2014_<id:012d>.jpg``) in
    `images`. Task ``pope_<what follows "pope_" in the file name>`` (``pope_random``, ...), so the
    three files can be concatenated: ids are ``<task>:<question_id>``.

    Raises:
      ValueError: not this layout, or a label that is not yes / no (file and line named).
    """
    path = Path(questions)
    stem = path.stem
    task = task or (f"pope_{stem.split('pope_', 1)[1]}" if "pope_" in stem else "pope")
    out = []
    for loc, q in read_json_or_lines(path, "POPE"):
        where = f"{path}: {loc}"
        qid = field(q, "question_id", (int, str), where)
        where = f"{path}: {loc} (question {qid})"
        label = text_field(q, "label", where).lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: label must be 'yes' or 'no', got {q['label']!r}")
        image = images.path(text_field(q, "image", where), where)
        out.append(record(f"{task}:{qid}", image, text_field(q, "text", where), label, task, "pope",
                          SHORT_ANSWER if suffix is None else suffix, question_id=qid))
    return out, {}


def _mme_folders(category_dir: Path) -> tuple[Path, Path]:
    """(image folder, question folder) of one MME category: ``images/`` and
    ``questions_answers_YN/`` when present, else the category folder itself for both."""
    if (category_dir / "images").is_dir():
        return category_dir / "images", category_dir / "questions_answers_YN"
    return category_dir, category_dir


def _mme_image(folder: Path, stem: str, where: str) -> Path:
    for suffix in MME_IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise ValueError(f"{where}: no image {stem}{{{','.join(MME_IMAGE_SUFFIXES)}}} in {folder}")


def mme(images: Images, *, category: str | None = None, task: str | None = None,
        suffix: str | None = None) -> tuple[list[dict], dict]:
    """MME -> one record per question, the two questions of an image sharing "pair_id".

    Layout (``MME_Benchmark_release_version/``, given as `images`): one folder per category
    (subtask); either ``<category>/images/<name>.jpg`` with
    ``<category>/questions_answers_YN/<name>.txt`` (artwork, celebrity, landmark, posters, scene),
    or ``<category>/<name>.png|jpg`` beside ``<category>/<name>.txt`` (the others). Each ``.txt``
    holds the image's two questions, one per line: ``<question>\\t<Yes|No>``; a line of three or more
    tab-separated fields is read as ``<image file>\\t<question>\\t<Yes|No>[\\t...]`` (the
    ``eval_tool/Your_Results`` layout) instead. The questions already end with "Please answer yes or
    no.", so the default suffix is empty.

    Args:
      category: comma-separated categories to convert (default: every folder with ``.txt`` files).
      task: prefix of the task names (default "mme"): task ``<prefix>_<category>``, so the job
        reports MME's per-subtask score (acc + acc+); question_type is "mme" for all.

    Returns:
      (records, {"folders without question files": n} when some were passed over).

    Raises:
      ValueError: a requested category that is missing, a bad line, an answer other than Yes /
        No, a missing image, or an image without exactly two questions (file named).
    """
    root = images.dir
    if not root.is_dir():
        raise ValueError(f"{root}: the MME folder does not exist")
    wanted = [c.strip() for c in category.split(",") if c.strip()] if category else None
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if wanted is None else [root / c for c in wanted]
    prefix = task or "mme"
    out, skipped = [], {}
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such MME category folder")
        image_dir, qa_dir = _mme_folders(folder)
        texts = sorted(qa_dir.glob("*.txt")) if qa_dir.is_dir() else []
        if not texts:
            if wanted is not None:
                raise ValueError(f"{qa_dir}: no question files (<image>.txt) in MME category {folder.name!r}")
            skipped["folders without question files"] = skipped.get("folders without question files", 0) + 1
            continue
        cat_task, pairs = f"{prefix}_{folder.name}", {}
        for txt in texts:
            for n, line in enumerate(read_text(txt, "MME questions").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{txt}: line {n}"
                parts = [p.strip() for p in line.split("\t")]
                if len(parts) == 2:
                    image_file, (question, answer) = _mme_image(image_dir, txt.stem, where), parts
                elif len(parts) >= 3:
                    image_file, question, answer = image_dir / parts[0], parts[1], parts[2]
                else:
                    raise ValueError(f"{where}: expected '<question>\\t<Yes|No>', got {line!r}")
                if answer not in ("Yes", "No"):
                    raise ValueError(f"{where}: answer must be 'Yes' or 'No', got {answer!r}")
                if not question:
                    raise ValueError(f"{where}: the question is empty")
                pair = f"{folder.name}/{image_file.name}"
                k = len(pairs.setdefault(pair, []))
                pairs[pair].append(where)
                rel = image_file.relative_to(root).as_posix()
                out.append(record(f"{cat_task}:{image_file.name}:{k}", images.path(rel, where), question, answer,
                                  cat_task, "mme", "" if suffix is None else suffix, pair_id=pair,
                                  question_type="mme"))
        bad = {p: w for p, w in pairs.items() if len(w) != 2}
        if bad:
            pair, where = next(iter(bad.items()))
            raise ValueError(f"MME category {folder.name!r}: image {pair} has {len(where)} question(s) ({where}); "
                             "acc+ needs exactly 2 per image")
    if not out:
        raise ValueError(f"{root}: no MME category folder with question files (<category>/*.txt or "
                         "<category>/questions_answers_YN/*.txt)")
    return out, skipped
