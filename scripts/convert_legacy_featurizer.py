"""One-off conversion of a legacy pickled featurizer to the `dfm-featurizer` `.npz` format.

    python scripts/convert_legacy_featurizer.py OLD_FILE NEW_FILE.npz --i-trust-this-file

Before `dfm-featurizer` version 1, `TextFeaturizer.save` / `PrecomputedFeaturizer.save` wrote a
pickle. dfm itself never loads pickles (they can run code: docs/reliability.md#security), so such a
file is refused with a message pointing here. This script lives outside the package on purpose: it is
the only place in the project that unpickles anything, it runs only when you pass
`--i-trust-this-file`, and even then it resolves only the classes a legacy featurizer holds (the
featurizer classes, scikit-learn's `TfidfVectorizer` / `TfidfTransformer` / `TruncatedSVD` and
NumPy's array reconstruction); any other global in the file (`os.system`, `builtins.eval`, ...)
stops it before anything runs. The allowlist narrows the risk; it does not remove it (a crafted file
can still abuse the constructors it names): convert only files whose origin you know.

Exit status: 0 converted, 2 refused (no `--i-trust-this-file`, a global outside the allowlist, not
a legacy featurizer), 1 other errors (unreadable input, unwritable output).
"""
from __future__ import annotations

import argparse
import io
import pickle
import sys
from pathlib import Path

#: (module, name) pairs a legacy featurizer pickle may name; nothing else is resolved.
ALLOWED = frozenset({
    ("dfm.decentral.features", "TextFeaturizer"),
    ("dfm.decentral.features", "PrecomputedFeaturizer"),
    ("sklearn.feature_extraction.text", "TfidfVectorizer"),
    ("sklearn.feature_extraction.text", "TfidfTransformer"),
    ("sklearn.decomposition._truncated_svd", "TruncatedSVD"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "float64"), ("numpy", "float32"),
    ("numpy", "int64"), ("numpy", "int32"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})

RISK = ("A pickle runs code when it is loaded. Convert only a featurizer file whose origin you know "
        "(one your own older dfm wrote); this script resolves only the classes a featurizer holds.")


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside `ALLOWED`."""


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise RefusedGlobal(f"the file names {module}.{name}, which a featurizer never holds; nothing "
                                f"was executed")
        return super().find_class(module, name)


def convert(old: Path, new: Path) -> str:
    """Unpickle `old` through the allowlist and save it with the class's own `save` (atomic).

    Returns the class name. Raises RefusedGlobal (a global outside `ALLOWED`), ValueError (not a
    featurizer)."""
    from dfm.decentral.features import PrecomputedFeaturizer, TextFeaturizer

    obj = _AllowlistUnpickler(io.BytesIO(old.read_bytes())).load()
    if not isinstance(obj, (TextFeaturizer, PrecomputedFeaturizer)):
        raise ValueError(f"{old} holds a {type(obj).__name__}, not a TextFeaturizer or PrecomputedFeaturizer")
    obj.save(new)
    return type(obj).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RISK)
    parser.add_argument("old", type=Path, help="the legacy pickled featurizer file")
    parser.add_argument("new", type=Path, help="where to write the .npz (dfm-featurizer format)")
    parser.add_argument("--i-trust-this-file", action="store_true",
                        help="required: you know where OLD comes from (see the risk below)")
    args = parser.parse_args(argv)
    if not args.i_trust_this_file:
        print(f"convert_legacy_featurizer: refused: {RISK} Pass --i-trust-this-file to convert {args.old}.",
              file=sys.stderr)
        return 2
    try:
        name = convert(args.old, args.new)
    except (RefusedGlobal, ValueError) as e:
        print(f"convert_legacy_featurizer: refused {args.old}: {e}", file=sys.stderr)
        return 2
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        print(f"convert_legacy_featurizer: error: {args.old} -> {args.new}: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.old} ({name}) -> {args.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
