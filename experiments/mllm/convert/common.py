"""Helpers shared by the benchmark converters: reading the official files (every error a
`ValueError` naming the file and the record), image paths relative to the job's image root, and
the eval record itself.

The eval record is the job's LLaVA record (`experiments.mllm.formats`), single turn::

    {"id": "<task>:<official id>", "image": "<path relative to the image root>",
     "conversations": [{"from": "human", "value": "<image>\\n<question><suffix>"},
                       {"from": "gpt", "value": "<reference answer>"}],
     "task": "<task>", "metric": "<scorer>", "question_type": "<task>",
     ...}                       # the scorer's inputs: answers, choices, bbox, width, height, pair_id

Image paths are written relative to the image root the job will read them from (``[data]
image_root``; default: the ``images`` folder the converter was given), POSIX separators, never
leaving that root (`formats.inside_root` is what the job checks).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from dfm.io import atomic_path

#: the image placeholder of the job's records (= ``dfm.prompts.IMAGE_TOKEN``; not imported from
#: there, which would load JAX for a file conversion)
IMAGE_TOKEN = "<image>"
#: LLaVA-1.5 / InternVL's instruction for short-answer benchmarks (VQAv2, GQA, TextVQA, POPE, ...)
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
#: LLaVA-1.5 / InternVL's instruction for multiple-choice benchmarks (ScienceQA)
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


class Images:
    """Where a benchmark's images are and the root the records name them relative to.

    Args:
      images: the folder of the benchmark's images (the converter's ``--images``).
      image_root: the folder the job reads image paths relative to (``[data] image_root``);
        default `images`. `images` must be inside it.
      check: require every image a record names to exist as a file.
    """

    def __init__(self, images: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 check: bool = True):
        self.dir = Path(images)
        self.root = Path(image_root) if image_root is not None else self.dir
        self.check = check
        if check and not self.dir.is_dir():
            raise ValueError(f"{self.dir}: the images folder does not exist")
        root, here = os.path.realpath(self.root), os.path.realpath(self.dir)
        if os.path.commonpath([root, here]) != root:
            raise ValueError(f"image root {str(self.root)!r}: the images folder {str(self.dir)!r} is not inside it")

    def path(self, relative: str, where: str) -> str:
        """The record's "image" for the file `relative` to the images folder (an official file's
        own name, e.g. ``COCO_val2014_000000262148.jpg``), relative to the image root.

        Raises:
          ValueError: the name leaves the images folder, or (with `check`) the file is missing;
            the message is prefixed with `where` (file and record).
        """
        if not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
            raise ValueError(f"{where}: image {relative!r} must be a relative path inside the images folder")
        full = self.dir / relative
        if self.check and not full.is_file():
            raise ValueError(f"{where}: image file {full} does not exist (pass --no-check-images to convert "
                             "without the images)")
        # relative to the resolved folders, as the "inside the root" check above compares them (a symlinked
        # --images folder that points into the root must not give ``../`` paths the job then refuses)
        here = os.path.join(os.path.realpath(self.dir), os.path.normpath(relative))
        return Path(os.path.relpath(here, os.path.realpath(self.root))).as_posix()


def read_text(path: Path, what: str) -> str:
    """The text of `path` (UTF-8, a byte order mark dropped).

    Raises:
      ValueError: a missing file, a folder, or text that is not UTF-8; naming `path` and `what`.
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} file does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: {what} must be a file, got a folder") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} file is not UTF-8 text ({e})") from None


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON file `path` (`what` names it in messages, e.g. "VQAv2 questions").

    Raises:
      ValueError: missing file, not UTF-8, or invalid JSON (line and column named).
    """
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} file is not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg})") from None


def read_json_or_lines(path: str | os.PathLike, what: str) -> list[tuple[str, object]]:
    """``[(location, object)]`` of a JSON list or a JSON-lines file (blank lines skipped); the
    location is "line N" or "index N" for messages.

    Raises:
      ValueError: as `read_json`, naming the bad line.
    """
    path = Path(path)
    text = read_text(path, what)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {what} file is not valid JSON (line {e.lineno}, column {e.colno}: "
                             f"{e.msg})") from None
        return [(f"index {i}", obj) for i, obj in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} of the {what} file is not valid JSON (column {e.colno}: "
                             f"{e.msg})") from None
    return rows


def field(obj, key: str, types: type | tuple, where: str):
    """``obj[key]``, checked to be of `types` (bool never counts as int).

    Raises:
      ValueError: `obj` is not an object, the key is missing or the value has another type;
        the message starts with `where`.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{where}: missing {key!r} (keys: {sorted(obj)[:12]})")
    value, tys = obj[key], (types if isinstance(types, tuple) else (types,))
    if not isinstance(value, tys) or (isinstance(value, bool) and bool not in tys):
        raise ValueError(f"{where}: {key!r} must be {' or '.join(t.__name__ for t in tys)}, got {value!r}")
    return value


def text_field(obj, key: str, where: str) -> str:
    """A non-empty string field (`field`), stripped.

    Raises:
      ValueError: as `field`, or an empty string.
    """
    value = field(obj, key, str, where).strip()
    if not value:
        raise ValueError(f"{where}: {key!r} is empty")
    return value


def answer_list(obj, key: str, where: str) -> list[str]:
    """A non-empty list of answer strings (numbers are converted), stripped.

    Raises:
      ValueError: as `field`, an empty list or a non-string item.
    """
    values = field(obj, key, list, where)
    if not values:
        raise ValueError(f"{where}: {key!r} is empty (the split has no answers to score against)")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"{where}: {key!r} must hold strings, got {v!r}")
        out.append(str(v).strip())
    return out


def most_common(answers: list[str]) -> str:
    """The most frequent answer, ties to the first one given (the reference answer of a record with
    several human answers: TextVQA, DocVQA's first)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def record(rid: str, image: str, question: str, answer: str, task: str, metric: str, suffix: str = "",
           **extra) -> dict:
    """One single-turn eval record (module docstring); `extra` keys with value None are left out."""
    out = {"id": rid, "image": image,
           "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}{suffix}"},
                             {"from": "gpt", "value": answer}],
           "task": task, "metric": metric, "question_type": task}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def write_jsonl(records: Iterable[dict], output: str | os.PathLike) -> int:
    """Write `records` as JSON lines (UTF-8) atomically: a temporary file beside `output`, then
    ``os.replace``; returns the number written.

    Raises:
      ValueError: two records with the same id (both named); nothing is written then.
    """

    lines, seen = [], {}
    for i, rec in enumerate(records):
        if rec["id"] in seen:
            raise ValueError(f"{output}: record {rec['id']!r} (number {i + 1}) has the same id as number "
                             f"{seen[rec['id']] + 1}")
        seen[rec["id"]] = i
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(lines))
    return len(lines)
