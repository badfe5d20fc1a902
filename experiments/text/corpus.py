"""The text corpus: documentation of the Python standard library, available offline everywhere.

Documents (each with a unique id, sorted by id):
- ``topic:<name>``: the help topics of `pydoc_data.topics` (the language reference sections that
  ``help("assert")`` shows);
- ``module:<dotted.name>``: one document per stdlib module, the module docstring followed by the
  docstrings of its classes and functions (methods included) in source order, each introduced by
  a header line ``class Name`` / ``def Class.method``. Docstrings are extracted with `ast` (no
  import), cleaned with `ast.get_docstring`. Modules under `DataConfig.exclude_dirs` (tests,
  idlelib, ...) and modules without any docstring are left out.

The split is by document: ``sha256(id)`` mapped to [0, 1) puts a document in test if the value is
below ``test_fraction``, in val if below ``test_fraction + val_fraction``, else in train. It is
deterministic and independent of the order and number of documents. The corpus depends on the
Python version (it is the running interpreter's stdlib); `fingerprint` identifies it.
"""
from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Document:
    """One corpus document: a unique `id` ("topic:..." or "module:...") and its `text`."""

    id: str
    text: str


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter (``sysconfig`` "stdlib")."""
    return Path(sysconfig.get_paths()["stdlib"])


def topic_documents() -> list[Document]:
    """`pydoc_data.topics` help topics, one document each, sorted by id."""
    from pydoc_data import topics

    return sorted(
        (Document(f"topic:{name}", text.strip()) for name, text in topics.topics.items() if text.strip()),
        key=lambda d: d.id,
    )


def module_text(source: str, module: str) -> str:
    """Docstrings of one module's source as a document text ("" if it has none).

    Raises:
      SyntaxError: if `source` does not parse.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        tree = ast.parse(source)
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"module {module}\n\n{doc}")

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                text = ast.get_docstring(child)
                if text:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {qual}\n{text}")
                visit(child, qual + ".")

    visit(tree, "")
    return "\n\n".join(parts)


def stdlib_module_files(root: Path | None = None, exclude_dirs: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """``(dotted module name, file)`` of every ``.py`` module under the stdlib, in walk order.

    Directories named in `exclude_dirs` (any path component) or starting with "." are not entered;
    files whose path is not a valid dotted module name (e.g. ``site-packages`` leftovers, scripts
    with dashes) are skipped; ``pkg/__init__.py`` is the module ``pkg``.

    Args:
      root: stdlib directory (default `stdlib_root()`).
      exclude_dirs: directory names to skip.
    """
    root = stdlib_root() if root is None else Path(root)
    exclude = set(exclude_dirs)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if not parts or any(not p.isidentifier() for p in parts):
                continue
            out.append((".".join(parts), path))
    return out


def module_documents(root: Path | None = None, exclude_dirs: Iterable[str] = ()) -> list[Document]:
    """One document per stdlib module with at least one docstring, sorted by id.

    Args:
      root: stdlib directory (default `stdlib_root()`).
      exclude_dirs: directory names; a module with any of them as a path component is skipped.
    """
    docs = []
    for module, path in stdlib_module_files(root, exclude_dirs):
        try:
            text = module_text(path.read_text(encoding="utf-8", errors="replace"), module)
        except (SyntaxError, ValueError):
            continue
        if text.strip():
            docs.append(Document(f"module:{module}", text))
    return sorted(docs, key=lambda d: d.id)


def stdlib_documents(exclude_dirs: Iterable[str] = ()) -> list[Document]:
    """The whole corpus: help topics and module docstrings, sorted by id (ids are unique)."""
    docs = sorted(topic_documents() + module_documents(exclude_dirs=exclude_dirs), key=lambda d: d.id)
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):  # pragma: no cover - module paths and topic names are unique
        raise RuntimeError("corpus: duplicate document ids")
    return docs


def hash_unit(doc_id: str) -> float:
    """``sha256(doc_id)`` as a number in [0, 1) (first 8 bytes, big-endian)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    """"train", "val" or "test" for a document id (deterministic, order-independent).

    Raises:
      ValueError: if the fractions are not in [0, 1) or sum to 1 or more.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction, test_fraction: must be in [0, 1) with sum < 1, got {val_fraction}, {test_fraction}")
    u = hash_unit(doc_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_documents(docs: Sequence[Document], val_fraction: float, test_fraction: float) -> dict[str, list[Document]]:
    """Documents grouped by `split_of`, each list in input order."""
    out = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.id, val_fraction, test_fraction)].append(d)
    return out


def fingerprint(docs: Sequence[Document]) -> str:
    """sha256 over ids and texts (hex, 16 chars): identifies the corpus version."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode("utf-8") + b"\0" + d.text.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]
