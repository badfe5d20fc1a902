"""LLaVA conversation files and InternVL meta.json: loading with validation, writing.

LLaVA format (LLaVA-Instruct, ``llava/train/train.py``): a JSON list, or JSONL (one record per
line; the format is detected from the first non-blank character, ``[`` meaning a JSON list), of ::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",          # or a list of paths, or absent (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}, ...],
     ...}                                                  # any other key is kept in Record.extra

Decisions (validation is strict; every error is a `FormatError` naming the file and the record id,
with the line number for JSONL or the index for a JSON list):

- roles: "human" / "gpt"; the aliases "user" -> "human" and "assistant" -> "gpt" (ShareGPT /
  OpenAI style) are accepted and normalised; any other role (e.g. "system") is an error. Turns must
  alternate human, gpt, human, gpt, ... starting with human and ending with gpt (every question has
  its answer), at least one pair.
- image placeholders: the number of ``<image>`` strings over all turns must equal the number of
  images. One exception, InternVL's convention (``internvl_chat_finetune.py``
  ``multi_modal_get_item``): a single-image record without any placeholder gets ``"<image>\\n"``
  prepended to its first human turn. Multi-image and text-only records must match exactly.
- image paths are relative to `image_root` and must stay inside it (docs/reliability.md#security):
  a path that leaves the root, through ``..``, as an absolute path or through a symbolic link, is
  an error naming the record, unless the caller opts in (`allow_outside_root=True`, the config's
  ``[data] allow_outside_root = true``); absolute paths inside the root are accepted. Every image must
  exist as a file when `check_images` is true (the default). Record.images holds the joined paths
  (``os.path.normpath``-ed).
- ids: strings (integers are converted); a record without "id" gets ``"<file stem>:<line>"``
  (JSONL) or ``"<file stem>:<index>"`` (JSON list). Duplicate ids in one file are an error.
- "video" records are not supported (error).

InternVL meta.json (``internvl_chat/shell/data/*.json``)::

    {"name": {"root": "images/", "annotation": "name.jsonl", "data_augment": false,
              "repeat_time": 1, "length": 1234}, ...}

with annotation lines in the same record format. Relative `root` / `annotation` paths are resolved
against the meta.json directory (and normpath-ed). `repeat_time` r > 0 (float): the records are repeated floor(r)
times, then a seeded random subset of int(n * frac(r)) records (without replacement, kept in file
order) is appended; so r < 1 subsamples int(n * r) records (InternVL takes the first int(n * r)
lines; we draw them with ``numpy.random.default_rng([seed, crc32(name)])`` so a subsample is not
biased by file order). "length", when present, must equal the number of records in the annotation.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfm.io import atomic_path
from dfm.prompts import IMAGE_TOKEN
from experiments.engine.task import DataError

HUMAN, GPT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}
RESERVED_KEYS = ("id", "image", "conversations")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class FormatError(DataError):
    """A data file (LLaVA JSON/JSONL, InternVL meta.json, image) is malformed; the message names the
    file and the record id (or line number)."""


@dataclass(frozen=True)
class Turn:
    """One conversation turn: `role` "human" (question) or "gpt" (answer) and its `text`
    (verbatim, ``<image>`` placeholders included)."""

    role: str
    text: str


@dataclass(frozen=True)
class Record:
    """One LLaVA / InternVL record.

    Attributes:
      id: unique record id.
      images: image paths (image_root joined), in placeholder order; empty for text-only records.
      turns: alternating human / gpt turns, starting with human and ending with gpt.
      extra: every other key of the JSON record (e.g. "question_type", "answers", "pair_id").
      source: where the record was read ("<file>: line 3"), for messages (not compared).
    """

    id: str
    images: tuple[Path, ...]
    turns: tuple[Turn, ...]
    extra: dict = field(default_factory=dict)
    source: str = field(default="", compare=False)

    def qa_pairs(self) -> list[tuple[str, str]]:
        """(question, answer) per human/gpt pair, ``<image>`` placeholders and surrounding
        whitespace removed from the questions."""
        return [(strip_image_tokens(self.turns[i].text), self.turns[i + 1].text)
                for i in range(0, len(self.turns), 2)]

    @property
    def question(self) -> str:
        """The last question (placeholders removed); for single-turn records the only one."""
        return self.qa_pairs()[-1][0]

    @property
    def answer(self) -> str:
        """The last gpt turn's text (the reference answer of a single-turn record)."""
        return self.turns[-1].text


def strip_image_tokens(text: str) -> str:
    """`text` without ``<image>`` placeholders, whitespace stripped."""
    return text.replace(IMAGE_TOKEN, "").strip()


def _where(path: Path, rid: str | None, loc: str) -> str:
    return f"{path}: record {rid!r} ({loc})" if rid is not None else f"{path}: record at {loc}"


def _read_rows(path: Path) -> list[tuple[str, int, object]]:
    """(location text, line-or-index number, parsed object) per record of a JSON list / JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{path}: file does not exist") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return [(f"index {i}", i, obj) for i, obj in enumerate(data)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: invalid JSON on line {lineno} (column {e.colno}): {e.msg}") from None
        rows.append((f"line {lineno}", lineno, obj))
    return rows


def _record_id(obj: dict, path: Path, loc: str, number: int) -> str:
    if "id" not in obj:
        return f"{path.stem}:{number}"
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise FormatError(f"{_where(path, None, loc)}: id must be a string or integer, got {rid!r}")
    return str(rid)


def _parse_turns(conv, where: str) -> list[Turn]:
    if not isinstance(conv, list):
        raise FormatError(f"{where}: conversations must be a list, got {type(conv).__name__}")
    if not conv:
        raise FormatError(f"{where}: conversations is empty")
    turns = []
    for i, item in enumerate(conv):
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise FormatError(f"{where}: conversations[{i}] must be an object with 'from' and 'value', got {item!r}")
        role = ROLE_ALIASES.get(item["from"]) if isinstance(item["from"], str) else None
        if role is None:
            raise FormatError(f"{where}: conversations[{i}].from must be one of {sorted(ROLE_ALIASES)}, "
                              f"got {item['from']!r}")
        if not isinstance(item["value"], str):
            raise FormatError(f"{where}: conversations[{i}].value must be a string, got {item['value']!r}")
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise FormatError(f"{where}: conversations[{i}] is from {role!r}, expected {expected!r} "
                              "(turns alternate human/gpt, starting with human)")
        turns.append(Turn(role, item["value"]))
    if turns[-1].role != GPT:
        raise FormatError(f"{where}: conversations end with a human turn (every question needs a gpt answer)")
    return turns


def inside_root(image: Path, image_root: Path) -> bool:
    """Whether `image` (already joined to the root) resolves, symbolic links followed, inside
    `image_root` (also resolved)."""
    root = os.path.realpath(image_root)
    return os.path.commonpath([root, os.path.realpath(image)]) == root


def parse_record(obj, path: Path, loc: str, number: int, image_root: Path, check_images: bool = True,
                 allow_outside_root: bool = False) -> Record:
    """One JSON object -> `Record` (see the module docstring for the rules).

    Args:
      obj: the parsed JSON record.
      path, loc, number: the file, the location text ("line 3" / "index 2") and its number, for
        messages and the default id.
      image_root: directory the image paths are relative to.
      check_images: require every image file to exist.
      allow_outside_root: accept image paths that leave `image_root` (module docstring).

    Raises:
      FormatError: naming `path` and the record id.
    """
    if not isinstance(obj, dict):
        raise FormatError(f"{_where(path, None, loc)}: must be a JSON object, got {type(obj).__name__}")
    rid = _record_id(obj, path, loc, number)
    where = _where(path, rid, loc)
    if "video" in obj:
        raise FormatError(f"{where}: video records are not supported")
    raw = obj.get("image")
    if raw is None and "image" not in obj:
        rel = []
    elif isinstance(raw, str) and raw:
        rel = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) and p for p in raw):
        rel = list(raw)
    else:
        raise FormatError(f"{where}: image must be a non-empty string or a non-empty list of strings, got {raw!r}")
    images = tuple(Path(os.path.normpath(Path(image_root) / p)) for p in rel)
    if not allow_outside_root:
        for raw_path, p in zip(rel, images):
            if not inside_root(p, image_root):
                raise FormatError(f"{where}: image path {raw_path!r} leaves the image root {str(image_root)!r}; "
                                  f"set [data] allow_outside_root = true to read images outside it")
    if check_images:
        for p in images:
            if not p.is_file():
                raise FormatError(f"{where}: image file {p} does not exist")
    if "conversations" not in obj:
        raise FormatError(f"{where}: missing 'conversations'")
    turns = _parse_turns(obj["conversations"], where)
    n_tokens = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if len(images) == 1 and n_tokens == 0:
        turns[0] = Turn(HUMAN, IMAGE_TOKEN + "\n" + turns[0].text)
    elif n_tokens != len(images):
        raise FormatError(f"{where}: {n_tokens} {IMAGE_TOKEN} placeholder(s) over all turns but "
                          f"{len(images)} image(s)")
    extra = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    return Record(rid, images, tuple(turns), extra, source=where)


def load_llava(path: str | os.PathLike, image_root: str | os.PathLike, *, check_images: bool = True,
               allow_outside_root: bool = False) -> list[Record]:
    """Records of a LLaVA JSON list or JSONL file, in file order.

    Args:
      path: the .json / .jsonl file (format detected from the content).
      image_root: directory the "image" paths are relative to.
      check_images: require every image file to exist (default true).
      allow_outside_root: accept image paths that leave `image_root` (module docstring).

    Raises:
      FormatError: bad JSON (line number for JSONL), a malformed record, a missing image file,
        an image path outside `image_root`, a placeholder / image count mismatch, a duplicate id;
        the message names the file and the
        record id (or line / index).
    """
    path = Path(path)
    records, seen = [], {}
    for loc, number, obj in _read_rows(path):
        rec = parse_record(obj, path, loc, number, Path(image_root), check_images, allow_outside_root)
        if rec.id in seen:
            raise FormatError(f"{_where(path, rec.id, loc)}: duplicate id (first at {seen[rec.id]})")
        seen[rec.id] = loc
        records.append(rec)
    return records


def record_to_json(record: Record, image_root: str | os.PathLike) -> dict:
    """The LLaVA JSON object of `record`, image paths relative to `image_root` (POSIX separators).

    Raises:
      FormatError: if `record.extra` uses a reserved key ("id", "image", "conversations").
    """
    clash = [k for k in RESERVED_KEYS if k in record.extra]
    if clash:
        raise FormatError(f"record {record.id!r}: extra uses reserved key(s) {clash}")
    obj = {"id": record.id}
    rel = [Path(os.path.relpath(p, image_root)).as_posix() for p in record.images]
    if len(rel) == 1:
        obj["image"] = rel[0]
    elif rel:
        obj["image"] = rel
    obj["conversations"] = [{"from": t.role, "value": t.text} for t in record.turns]
    obj.update(record.extra)
    return obj


def write_llava(records: Iterable[Record], path: str | os.PathLike, image_root: str | os.PathLike) -> None:
    """Write `records` as LLaVA JSONL (one object per line, UTF-8) atomically; image paths are
    written relative to `image_root`, so ``load_llava(path, image_root)`` returns equal records.

    Raises:
      FormatError: reserved keys in an extra, or duplicate ids.
    """
    lines, seen = [], set()
    for rec in records:
        if rec.id in seen:
            raise FormatError(f"{path}: duplicate record id {rec.id!r}")
        seen.add(rec.id)
        lines.append(json.dumps(record_to_json(rec, image_root), ensure_ascii=False))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def read_internvl_meta(meta_path: str | os.PathLike) -> dict[str, dict]:
    """Validated entries of an InternVL meta.json: name -> {"root": Path, "annotation": Path,
    "data_augment": bool, "repeat_time": float, "length": int | None} (paths resolved against the
    meta.json directory).

    Raises:
      FormatError: naming the meta file and the dataset entry.
    """
    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{meta_path}: file does not exist") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{meta_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(meta, dict) or not meta:
        raise FormatError(f"{meta_path}: must be a non-empty JSON object {{name: entry}}")
    base = meta_path.parent
    out = {}
    for name, entry in meta.items():
        where = f"{meta_path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: entry must be an object, got {entry!r}")
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str):
                raise FormatError(f"{where}: '{key}' must be a string path, got {entry.get(key)!r}")
        r = entry.get("repeat_time", 1)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            raise FormatError(f"{where}: repeat_time must be a number > 0, got {r!r}")
        length = entry.get("length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
            raise FormatError(f"{where}: length must be a non-negative integer, got {length!r}")
        augment = entry.get("data_augment", False)
        if not isinstance(augment, bool):
            raise FormatError(f"{where}: data_augment must be true/false, got {augment!r}")
        out[name] = {"root": Path(os.path.normpath(base / entry["root"])),
                     "annotation": Path(os.path.normpath(base / entry["annotation"])),
                     "data_augment": augment, "repeat_time": float(r), "length": length}
    return out


def repeat_records(records: Sequence[Record], repeat_time: float, rng: np.random.Generator) -> list[Record]:
    """floor(r) copies of `records`, then a random subset of int(n * frac(r)) of them (file order).

    Raises:
      ValueError: if `repeat_time` is not > 0.
    """
    if not repeat_time > 0:
        raise ValueError(f"repeat_time: must be > 0, got {repeat_time}")
    whole = int(repeat_time)
    n_extra = int(len(records) * (repeat_time - whole))
    out = list(records) * whole
    if n_extra:
        chosen = np.sort(rng.choice(len(records), size=n_extra, replace=False))
        out += [records[i] for i in chosen]
    return out


def load_internvl_meta(meta_path: str | os.PathLike, *, seed: int = 0, check_images: bool = True,
                       allow_outside_root: bool = False) -> dict[str, list[Record]]:
    """Records of every dataset of an InternVL meta.json, `repeat_time` applied.

    Args:
      meta_path: the meta.json.
      seed: seed of the `repeat_time` subsampling (generator ``default_rng([seed, crc32(name)])``).
      check_images: require every image file to exist.
      allow_outside_root: accept image paths that leave their dataset's `root` (module docstring).

    Returns:
      name -> records (a repeated record appears several times with the same id).

    Raises:
      FormatError: naming the meta file, the dataset entry and (for record errors) the annotation
        file and record id.
    """
    out = {}
    for name, entry in read_internvl_meta(meta_path).items():
        where = f"{meta_path}: dataset {name!r}"
        try:
            records = load_llava(entry["annotation"], entry["root"], check_images=check_images,
                                 allow_outside_root=allow_outside_root)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        if entry["length"] is not None and entry["length"] != len(records):
            raise FormatError(f"{where}: length is {entry['length']} but {entry['annotation']} has "
                              f"{len(records)} records")
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        out[name] = repeat_records(records, entry["repeat_time"], rng)
    return out


def write_internvl_meta(meta_path: str | os.PathLike, datasets: dict[str, Sequence[Record]],
                        image_root: str | os.PathLike, *, repeat_time: float = 1.0,
                        data_augment: bool = False) -> None:
    """Write ``<name>.jsonl`` annotations beside `meta_path` and the meta.json itself (atomically),
    with "root" stored relative to the meta.json directory.

    Raises:
      FormatError: a dataset name that is not a plain file name ([A-Za-z0-9_.-]+).
    """
    meta_path = Path(meta_path)
    meta = {}
    for name, records in datasets.items():
        if not _NAME_RE.match(name):
            raise FormatError(f"{meta_path}: dataset name {name!r} must match [A-Za-z0-9_.-]+")
        write_llava(records, meta_path.parent / f"{name}.jsonl", image_root)
        meta[name] = {"root": os.path.relpath(image_root, meta_path.parent), "annotation": f"{name}.jsonl",
                      "data_augment": data_augment, "repeat_time": repeat_time, "length": len(records)}
    with atomic_path(meta_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
