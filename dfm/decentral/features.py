"""Featurizers that map raw data to the vectors the partition clusters.

- `TextFeaturizer`: tf-idf followed by TruncatedSVD (scikit-learn), as c-BTM (Gururangan et al.
  2023, arXiv 2303.14177) clusters text.
- `PrecomputedFeaturizer`: a passthrough for features from any frozen encoder (e.g. CLIP image
  embeddings, as in the paper), which only validates shape and values.

Both follow `fit(data) -> self`, `transform(data) -> [N, D] float64`, `fit_transform`, and
`save(path)` / `load(path)`.

File format (no pickle; one `.npz` written atomically, read with `allow_pickle=False`): the
arrays plus a `"meta"` entry, a 0-d unicode array holding JSON:

    {"format": "dfm-featurizer", "version": 1, "class": "TextFeaturizer" | "PrecomputedFeaturizer",
     "params": {...constructor arguments and the analyzer settings...},
     "vocabulary": [term_0, term_1, ...]            (TextFeaturizer: the tf-idf terms, column order)
     "dim": D}                                      (PrecomputedFeaturizer)

TextFeaturizer arrays: `idf [V]` float64 (the tf-idf idf weights), `components [D, V]` float64
(the TruncatedSVD basis). Its `transform` is computed here from these arrays (tokenize with the
stored `token_pattern` after lowercasing, term counts, `1 + log(tf)` when `sublinear_tf`, times
idf, row L2 normalization, then `@ components.T`), exactly scikit-learn's
`TfidfVectorizer.transform` followed by `TruncatedSVD.transform`, so a saved featurizer gives the
same features under any scikit-learn version (fitting still uses scikit-learn).

Files written by older versions (a pickle of the fitted scikit-learn objects) are refused with a
`ValueError` naming the file: loading a pickle runs whatever code the file holds, and run and export
directories are shared between people and machines (docs/reliability.md#security). A legacy file
from a trusted source converts once with `python scripts/convert_legacy_featurizer.py OLD NEW
--i-trust-this-file` (outside the package; it says the risk before it unpickles anything).
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from dfm.decentral.arguments import as_feature_matrix, check_positive_int
from dfm.io import atomic_path

FORMAT = "dfm-featurizer"
VERSION = 1
#: scikit-learn's default `TfidfVectorizer` token pattern (the one `TextFeaturizer` fits with).
TOKEN_PATTERN = r"(?u)\b\w\w+\b"


def _save_arrays(path: str | os.PathLike, meta: dict, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.asarray(json.dumps(meta, ensure_ascii=False)), **arrays)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getvalue())


def _load_file(path: str | os.PathLike, cls: type) -> tuple[dict, dict]:
    """`(meta, arrays)` of a featurizer file written by `save`; nothing in it is executed.

    Raises ValueError naming `path`: a legacy pickle (refused, with the one-off conversion command),
    not a featurizer file, another class, an unknown version.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":                                  # pickle protocol >= 2: the old format
        raise ValueError(
            f"path {path!r} is a pickled featurizer (the format before {FORMAT} version {VERSION}); pickles "
            f"run code when loaded, so dfm never loads them. If the file comes from a source you trust, "
            f"convert it once with: python scripts/convert_legacy_featurizer.py {path} <new.npz> "
            f"--i-trust-this-file")
    if head != b"PK\x03\x04":
        raise ValueError(f"path {path!r} is not a featurizer file (not a {FORMAT} .npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"path {path!r} is not a {FORMAT} file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"path {path!r}: 'format' must be {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"path {path!r}: featurizer 'version' {meta.get('version')!r} is not supported "
                         f"(this reader: {VERSION})")
    if meta.get("class") != cls.__name__:
        raise ValueError(f"path {path!r} holds a {meta.get('class')}, not a {cls.__name__}")
    return meta, arrays


def _check_texts(texts: Any, name: str = "texts") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a sequence of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name} must contain only strings; entries {bad[:5]} are not")
    return list(texts)


class TextFeaturizer:
    """tf-idf + TruncatedSVD text features (c-BTM's clustering features).

    Args:
      n_components: output dimension D of the SVD (must be < the tf-idf vocabulary size).
      seed: random_state of TruncatedSVD (randomized solver).
      max_features, min_df, sublinear_tf, stop_words: passed to `TfidfVectorizer`.

    `fit(texts)` learns the vocabulary, idf weights and SVD basis (scikit-learn) and keeps them as
    arrays (`vocabulary` list of V terms, `idf [V]`, `components [D, V]`); `transform(texts)`
    returns `[N, n_components]` float64 computed from those arrays (module doc). `save` / `load`:
    `.npz` + JSON, no pickle (module doc).

    Raises:
      ValueError: empty or non-string texts, `n_components` not below the vocabulary size,
        `transform` before `fit`; `load` of a file that is not a TextFeaturizer.
    """

    def __init__(self, n_components: int = 128, seed: int = 0, *, max_features: int | None = 2**17,
                 min_df: int = 1, sublinear_tf: bool = True, stop_words: str | None = "english"):
        self.n_components = check_positive_int(n_components, "n_components")
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.max_features = max_features
        self.min_df = min_df
        self.sublinear_tf = sublinear_tf
        self.stop_words = stop_words
        self.lowercase = True
        self.token_pattern = TOKEN_PATTERN
        self.vocabulary: list[str] | None = None
        self.idf: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def __setstate__(self, state: dict) -> None:
        """Unpickling a legacy featurizer (fitted `_tfidf` / `_svd` objects): keep only their arrays."""
        tfidf, svd = state.pop("_tfidf", None), state.pop("_svd", None)
        self.__dict__.update(state)
        self.__dict__.setdefault("lowercase", True)
        self.__dict__.setdefault("token_pattern", TOKEN_PATTERN)
        if tfidf is not None and svd is not None:
            self._set_fitted(tfidf, svd)
        else:
            self.__dict__.setdefault("vocabulary", None)
            self.__dict__.setdefault("idf", None)
            self.__dict__.setdefault("components", None)

    def _set_fitted(self, tfidf, svd) -> None:
        terms = sorted(tfidf.vocabulary_.items(), key=lambda kv: kv[1])
        self.vocabulary = [t for t, _ in terms]
        self.idf = np.asarray(tfidf.idf_, np.float64)
        self.components = np.asarray(svd.components_, np.float64)
        self.lowercase = bool(tfidf.lowercase)
        self.token_pattern = tfidf.token_pattern
        self._index = None

    def fit(self, texts: Sequence[str]) -> "TextFeaturizer":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = _check_texts(texts)
        tfidf = TfidfVectorizer(max_features=self.max_features, min_df=self.min_df,
                                sublinear_tf=self.sublinear_tf, stop_words=self.stop_words,
                                lowercase=self.lowercase, token_pattern=self.token_pattern)
        matrix = tfidf.fit_transform(texts)
        if self.n_components >= matrix.shape[1]:
            raise ValueError(f"n_components={self.n_components} must be smaller than the tf-idf "
                             f"vocabulary size ({matrix.shape[1]}) of texts")
        svd = TruncatedSVD(n_components=self.n_components, random_state=self.seed)
        svd.fit(matrix)
        self._set_fitted(tfidf, svd)
        return self

    def tfidf(self, texts: Sequence[str]):
        """The L2-normalized tf-idf rows of `texts`, a scipy CSR matrix `[N, V]` float64."""
        import scipy.sparse as sp

        if self.components is None:
            raise ValueError("TextFeaturizer is not fitted: call fit(texts) first")
        texts = _check_texts(texts)
        index = getattr(self, "_index", None)
        if index is None:
            index = self._index = {t: i for i, t in enumerate(self.vocabulary)}
        pattern = re.compile(self.token_pattern)
        rows, cols, vals = [], [], []
        for r, text in enumerate(texts):
            counts: dict[int, int] = {}
            for token in pattern.findall(text.lower() if self.lowercase else text):
                j = index.get(token)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            rows.extend([r] * len(counts))
            cols.extend(counts.keys())
            vals.extend(counts.values())
        tf = np.asarray(vals, np.float64)
        if self.sublinear_tf:
            tf = np.log(tf) + 1.0
        cols = np.asarray(cols, np.int64)
        matrix = sp.csr_matrix((tf * self.idf[cols], (np.asarray(rows, np.int64), cols)),
                               shape=(len(texts), len(self.vocabulary)))
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.diags(1.0 / norms) @ matrix

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Features `[N, n_components]` float64 (0 rows for texts with no known term)."""
        if self.components is None:
            raise ValueError("TextFeaturizer is not fitted: call fit(texts) first")
        return np.asarray(self.tfidf(texts) @ self.components.T, dtype=np.float64)

    def fit_transform(self, texts: Sequence[str]) -> np.ndarray:
        return self.fit(texts).transform(texts)

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted featurizer to `path` (`.npz` arrays + JSON meta, module doc; atomic).

        Raises ValueError when not fitted."""
        if self.components is None:
            raise ValueError("TextFeaturizer is not fitted: call fit(texts) first")
        params = {"n_components": self.n_components, "seed": self.seed, "max_features": self.max_features,
                  "min_df": self.min_df, "sublinear_tf": self.sublinear_tf, "stop_words": self.stop_words,
                  "lowercase": self.lowercase, "token_pattern": self.token_pattern, "norm": "l2"}
        meta = {"format": FORMAT, "version": VERSION, "class": type(self).__name__, "params": params,
                "vocabulary": list(self.vocabulary)}
        _save_arrays(path, meta, idf=self.idf, components=self.components)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextFeaturizer":
        """Read a file written by `save` (`.npz` + JSON, loaded with `allow_pickle=False`).

        Raises ValueError naming `path`: a legacy pickle (never loaded; module doc), not a
        featurizer file, another featurizer class, an unsupported version, arrays inconsistent
        with the vocabulary."""
        meta, arrays = _load_file(path, cls)
        p = meta["params"]
        out = cls(p["n_components"], p["seed"], max_features=p["max_features"], min_df=p["min_df"],
                  sublinear_tf=p["sublinear_tf"], stop_words=p["stop_words"])
        out.lowercase, out.token_pattern = bool(p["lowercase"]), str(p["token_pattern"])
        out.vocabulary = [str(t) for t in meta["vocabulary"]]
        out.idf = np.asarray(arrays["idf"], np.float64)
        out.components = np.asarray(arrays["components"], np.float64)
        v = len(out.vocabulary)
        if out.idf.shape != (v,) or out.components.shape != (out.n_components, v):
            raise ValueError(f"path {os.fspath(path)!r}: idf {out.idf.shape} / components {out.components.shape} "
                             f"do not match {v} terms and {out.n_components} components")
        return out


class PrecomputedFeaturizer:
    """Passthrough for features computed by a frozen encoder (e.g. CLIP image embeddings).

    `fit(features)` records the dimension D; `transform(features)` validates `[N, D]`, finite
    values, and returns float64. The partition does its own normalization and centring.

    Raises:
      ValueError: non-2-D, empty, NaN/inf features, or a dimension different from the fitted one.
    """

    def __init__(self):
        self.dim: int | None = None

    def fit(self, features: Any) -> "PrecomputedFeaturizer":
        self.dim = as_feature_matrix(features, "features").shape[1]
        return self

    def transform(self, features: Any) -> np.ndarray:
        return as_feature_matrix(features, "features", dim=self.dim)

    def fit_transform(self, features: Any) -> np.ndarray:
        return self.fit(features).transform(features)

    def save(self, path: str | os.PathLike) -> None:
        """Write `{"dim": D}` to `path` (`.npz` + JSON meta, module doc; atomic)."""
        _save_arrays(path, {"format": FORMAT, "version": VERSION, "class": type(self).__name__, "dim": self.dim})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrecomputedFeaturizer":
        """Read a file written by `save` (`.npz` + JSON, loaded with `allow_pickle=False`).

        Raises ValueError naming `path`: a legacy pickle (never loaded; module doc), another
        featurizer class, not a featurizer file."""
        meta, _ = _load_file(path, cls)
        out = cls()
        out.dim = meta.get("dim")
        return out
