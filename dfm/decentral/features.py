"""Featurizers that map raw data to the vectors the partition clusters.

- `TextFeaturizer`: tf-idf followed by TruncatedSVD (scikit-learn), as c-BTM (Gururangan et al.
  2023, arXiv 2303.14177) clusters text.
- `PrecomputedFeaturizer`: a passthrough for features from any frozen encoder (e.g. CLIP image
  embeddings, as in the paper), which only validates shape and values.

Both follow `fit(data) -> self`, `transform(data) -> [N, D] float64`, `fit_transform`, and save to
one pickle file written atomically (temp file, then `os.replace`).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Sequence

import numpy as np

from dfm.decentral.validation import as_feature_matrix, check_positive_int
from dfm.io import atomic_write_bytes


def _atomic_pickle(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _load_pickle(path: str | os.PathLike, cls: type) -> Any:
    with open(os.fspath(path), "rb") as f:
        obj = pickle.load(f)
    if not isinstance(obj, cls):
        raise ValueError(f"path {path!r} holds a {type(obj).__name__}, not a {cls.__name__}")
    return obj


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

    `fit(texts)` learns the vocabulary, idf weights and SVD basis; `transform(texts)` returns
    `[N, n_components]` float64. Pickles (`save`/`load`).

    Raises:
      ValueError: empty or non-string texts, `n_components` not below the vocabulary size,
        `transform` before `fit`.
    """

    def __init__(self, n_components: int = 128, seed: int = 0, *, max_features: int | None = 2**17,
                 min_df: int = 1, sublinear_tf: bool = True, stop_words: str | None = "english"):
        self.n_components = check_positive_int(n_components, "n_components")
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.max_features = max_features
        self.min_df = min_df
        self.sublinear_tf = sublinear_tf
        self.stop_words = stop_words
        self._tfidf = None
        self._svd = None

    def fit(self, texts: Sequence[str]) -> "TextFeaturizer":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = _check_texts(texts)
        tfidf = TfidfVectorizer(max_features=self.max_features, min_df=self.min_df,
                                sublinear_tf=self.sublinear_tf, stop_words=self.stop_words)
        matrix = tfidf.fit_transform(texts)
        if self.n_components >= matrix.shape[1]:
            raise ValueError(f"n_components={self.n_components} must be smaller than the tf-idf "
                             f"vocabulary size ({matrix.shape[1]}) of texts")
        svd = TruncatedSVD(n_components=self.n_components, random_state=self.seed)
        svd.fit(matrix)
        self._tfidf, self._svd = tfidf, svd
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        if self._svd is None:
            raise ValueError("TextFeaturizer is not fitted: call fit(texts) first")
        texts = _check_texts(texts)
        return np.asarray(self._svd.transform(self._tfidf.transform(texts)), dtype=np.float64)

    def fit_transform(self, texts: Sequence[str]) -> np.ndarray:
        return self.fit(texts).transform(texts)

    def save(self, path: str | os.PathLike) -> None:
        _atomic_pickle(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextFeaturizer":
        return _load_pickle(path, cls)


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
        _atomic_pickle(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrecomputedFeaturizer":
        return _load_pickle(path, cls)
