"""Corpus sources of the text job (`DataConfig.corpus`): built-in corpora and the user's own files.

``data.corpus`` is one of:

- ``"stdlib"`` (default): the Python standard library's documentation (`experiments.text.corpus`:
  ``topic:<name>`` and ``module:<dotted.name>`` documents), unchanged.
- ``"stdlib+python"``: the same documents plus a second, distinct domain, the Python source code
  of the standard library modules: one document per module file, id ``source:<dotted.name>``, the
  raw source text (read as UTF-8, undecodable bytes replaced), the same `DataConfig.exclude_dirs`,
  files over `MAX_SOURCE_BYTES` (200 kB; only ``_pydecimal.py`` on CPython 3.11) and empty files
  left out. Reading the ~450 files takes ~0.05 s; the corpus is ~4x larger than "stdlib" alone.
- a path (absolute, ``~``-expanded, or relative to the working directory):
  - a folder: every ``*.txt`` and ``*.md`` file under it (recursive; suffix case-insensitive;
    files and folders whose name starts with "." are skipped), one document per file, kept whole,
    id ``file:<path relative to the folder, POSIX separators>``, read as UTF-8 (a leading byte
    order mark is dropped);
  - a ``.jsonl`` file: one JSON object per line with a required string ``"text"`` and an optional
    ``"id"`` (string or integer; default ``line:<n>``, n the 1-based line number); blank lines
    are skipped; a duplicate id is an error.

In every source, documents whose text is empty or whitespace only are left out, and documents are
sorted by id (so the corpus, its fingerprint and the hash-of-id split `corpus.split_of` do not
depend on the order of files or lines). Errors are `experiments.engine.task.DataError` naming the
path (and the line of a JSONL file): a missing path, a file that is neither a folder nor
``.jsonl``, a file that is not UTF-8, a bad JSONL line, a duplicate id, an empty corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from experiments.engine.task import DataError
from experiments.text import corpus as corpus_mod
from experiments.text.corpus import Document

STDLIB = "stdlib"
STDLIB_PYTHON = "stdlib+python"
BUILTIN = (STDLIB, STDLIB_PYTHON)
MAX_SOURCE_BYTES = 200_000
"""Stdlib source files larger than this (bytes) are not in the "stdlib+python" corpus."""
FOLDER_SUFFIXES = (".txt", ".md")


def corpus_kind(corpus: str) -> str:
    """"stdlib", "stdlib+python", "folder" or "jsonl" for a ``data.corpus`` value (from the name
    for built-ins, else from the path on disk).

    Raises:
      DataError: the path does not exist, or is a file other than ``.jsonl`` (naming it).
    """
    if corpus in BUILTIN:
        return corpus
    path = resolve_path(corpus)
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise DataError(f"data.corpus: {path} is a file but not a .jsonl file; give a folder of "
                            f"*.txt / *.md files or a .jsonl file")
        return "jsonl"
    raise DataError(f"data.corpus: {corpus!r} is neither {STDLIB!r}, {STDLIB_PYTHON!r} nor an existing folder or "
                    f".jsonl file (resolved to {path})")


def resolve_path(value: str) -> Path:
    """``value`` as an absolute path (``~`` expanded; a relative path is relative to the working
    directory, not normalized further)."""
    return Path(value).expanduser().absolute()


def python_source_documents(root: Path | None = None, exclude_dirs: Iterable[str] = (),
                            max_bytes: int = MAX_SOURCE_BYTES) -> list[Document]:
    """One ``source:<dotted.name>`` document per stdlib module file (raw source), sorted by id.

    Args:
      root: stdlib directory (default `corpus.stdlib_root()`).
      exclude_dirs: directory names skipped (`corpus.stdlib_module_files`).
      max_bytes: files larger than this many bytes are skipped.
    """
    docs = []
    for module, path in corpus_mod.stdlib_module_files(root, exclude_dirs):
        if path.stat().st_size > max_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(f"source:{module}", text))
    return sorted(docs, key=lambda d: d.id)


def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}); "
                        f"data.corpus files must be UTF-8 text") from None
    return text.removeprefix("\ufeff")


def folder_files(folder: Path) -> list[Path]:
    """The corpus files of a folder: ``*.txt`` / ``*.md`` (case-insensitive suffix) under it,
    recursively, skipping names that start with ".", sorted by relative POSIX path."""
    folder = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in FOLDER_SUFFIXES:
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def folder_documents(folder: Path) -> list[Document]:
    """One ``file:<relative posix path>`` document per file of `folder_files`, sorted by id.

    Raises:
      DataError: a file that cannot be read or is not UTF-8 (naming it).
    """
    folder = Path(folder)
    docs = []
    for path in folder_files(folder):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        text = _decode(raw, str(path))
        if text.strip():
            docs.append(Document(f"file:{path.relative_to(folder).as_posix()}", text))
    return sorted(docs, key=lambda d: d.id)


def jsonl_documents(path: Path) -> list[Document]:
    """The documents of a JSONL file (module doc), sorted by id.

    Raises:
      DataError: naming the file and the 1-based line: not UTF-8, not JSON, not an object, no
        string "text", an "id" that is not a non-empty string or an integer, or an id already used
        on an earlier line (naming both lines).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _jsonl_rows(f, path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _jsonl_rows(f, path: Path) -> list[Document]:
    docs, seen = [], {}
    for n, raw in enumerate(f, start=1):
        where = f"{path}, line {n}"
        line = _decode(raw, where)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with a \"text\" string, got {type(row).__name__}")
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: \"text\" must be a string, got "
                            f"{'nothing' if 'text' not in row else type(text).__name__}")
        doc_id = row.get("id", f"line:{n}")
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id:
            raise DataError(f"{where}: \"id\" must be a non-empty string or an integer, got {doc_id!r}")
        if doc_id in seen:
            raise DataError(f"{where}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = n
        if text.strip():
            docs.append(Document(doc_id, text))
    return sorted(docs, key=lambda d: d.id)


def load_documents(corpus: str, exclude_dirs: Iterable[str] = ()) -> list[Document]:
    """The documents of a ``data.corpus`` value (module doc), sorted by id, ids unique.

    Args:
      corpus: "stdlib", "stdlib+python" or a path.
      exclude_dirs: stdlib directories left out (built-in corpora only).

    Raises:
      DataError: see the module doc; also when a path holds no document.
    """
    kind = corpus_kind(corpus)
    if kind == STDLIB:
        return corpus_mod.stdlib_documents(exclude_dirs=exclude_dirs)
    if kind == STDLIB_PYTHON:
        docs = corpus_mod.stdlib_documents(exclude_dirs=exclude_dirs)
        return sorted(docs + python_source_documents(exclude_dirs=exclude_dirs), key=lambda d: d.id)
    path = resolve_path(corpus)
    docs = folder_documents(path) if kind == "folder" else jsonl_documents(path)
    if not docs:
        what = "no *.txt or *.md file with text" if kind == "folder" else "no line with a non-empty \"text\""
        raise DataError(f"data.corpus: {path} holds no documents ({what})")
    return docs


def describe(corpus: str) -> dict:
    """What the data summary records of the source: ``{"source": value, "kind": ...}`` plus, for a
    path, ``"path"`` (absolute) and ``"signature"`` (`signature`).

    Raises:
      DataError: as `corpus_kind`.
    """
    kind = corpus_kind(corpus)
    out = {"source": corpus, "kind": kind}
    if kind not in BUILTIN:
        path = resolve_path(corpus)
        out |= {"path": str(path), "signature": signature(path)}
    return out


def signature(path: Path) -> str:
    """sha256 (hex, 16 chars) of the names, sizes and modification times of a path corpus's files:
    cheap (no file is read) and changes whenever a file is added, removed, resized or rewritten."""
    path = Path(path)
    files = folder_files(path) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix() if path.is_dir() else f.name}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
