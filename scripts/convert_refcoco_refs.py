"""One-off conversion of RefCOCO's official ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` to JSON lines.

    python scripts/convert_refcoco_refs.py "refcoco/refs(unc).p" refcoco/refs_unc.jsonl

The REFER API ships its referring expressions as a Python pickle, and loading a pickle can run code,
so dfm never loads one (docs/reliability.md#security). This script reads the file with an unpickler
that resolves no global at all: a refs file is a list of dicts of strings, numbers and lists, which
pickle builds from its own opcodes, so nothing in it needs a class or a function. Any global the file
names (`os.system`, `builtins.eval`, a class) stops the conversion before anything runs. The output,
one ref per line (``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences``, ...), is what
``dfm data convert --from refcoco --questions refs_unc.jsonl --annotations instances.json`` reads
(docs/benchmarks.md).

Exit status: 0 converted, 2 refused (a global in the file, not a list of refs), 1 other errors
(unreadable input, unwritable output).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global: a refs file never does."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise RefusedGlobal(f"the file names {module}.{name}; a refs file holds only lists, dicts, strings and "
                            f"numbers, so nothing was resolved and nothing was executed")


def read_refs(path: Path) -> list[dict]:
    """The refs of the pickle at `path`, loaded without resolving any global.

    Raises:
      RefusedGlobal: the file names a global. ValueError: it is not a list of dicts with a ``ref_id``.
      OSError: unreadable.
    """
    with open(path, "rb") as f:
        refs = _DataOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(refs, list) or not all(isinstance(r, dict) and "ref_id" in r for r in refs):
        raise ValueError("not a REFER refs file (expected a list of dicts with a 'ref_id')")
    return refs


def convert(old: Path, new: Path) -> int:
    """Write the refs of `old` to `new` as JSON lines (temporary file, then rename); returns the count."""
    refs = read_refs(old)
    new.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=new.parent, prefix=f".{new.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in refs)
        os.replace(tmp, new)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(refs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the official refs(...).p")
    parser.add_argument("new", type=Path, help="the JSON lines file to write")
    args = parser.parse_args(argv)
    try:
        n = convert(args.old, args.new)
    except (RefusedGlobal, ValueError, pickle.UnpicklingError) as exc:
        print(f"convert_refcoco_refs: refused {args.old}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"convert_refcoco_refs: {exc}", file=sys.stderr)
        return 1
    print(f"converted {args.old} ({n} refs) -> {args.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
