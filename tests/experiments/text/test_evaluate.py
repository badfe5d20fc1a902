"""The text job's scored test set (`experiments.text.evaluate.eval_set`): which documents are
evaluated (>= 2 full chunks; at most `max_docs`, taken in turn from each true cluster in id order),
which chunks are scored (chunk 0 is context only; at most `max_scored` after it), worked out by hand
on a small split with remainders and clusters of unequal size."""
from types import SimpleNamespace

import numpy as np
import pytest

from experiments.engine.graph import Assignments
from experiments.text.evaluate import eval_set
from experiments.text.sequences import Sequences

# 7 test documents with 3, 1, 2, 4, 2, 0, 2 full chunks; true clusters 0, 0, 1, 1, 0, 1, 2.
CHUNKS = [3, 1, 2, 4, 2, 0, 2]
LABELS = np.array([0, 0, 1, 1, 0, 1, 2])
DOC = np.array([d for d, n in enumerate(CHUNKS) for _ in range(n)], np.int32)
CHUNK = np.array([c for n in CHUNKS for c in range(n)], np.int32)
TOKENS = np.stack([DOC * 10 + CHUNK] * 2, axis=1).astype(np.int32)       # token = 10 * doc + chunk


def _data():
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    return SimpleNamespace(splits={"test": SimpleNamespace(ids=[f"d{i}" for i in range(7)])},
                           sequences={"test": Sequences(TOKENS, DOC, CHUNK)}, tokenizer=tokenizer)


class Featurizer:
    """Document 4's context has no known term (zero features)."""

    def transform(self, texts):
        return np.array([[0.0, 0.0] if t.startswith("40 ") else [1.0, 0.0] for t in texts])


def _eval_set(max_docs=0, max_scored=0):
    assignments = Assignments(units={"test": LABELS}, example_unit=np.zeros(0, np.int64))
    return eval_set(_data(), assignments, "test", Featurizer(), seq_len=2, max_docs=max_docs, max_scored=max_scored)


def test_every_document_with_two_chunks_and_all_its_chunks():
    es = _eval_set()
    assert es.ids == ["d0", "d2", "d3", "d4", "d6"]          # d1 (one chunk) and d5 (none) left out
    assert es.labels.tolist() == [0, 1, 1, 0, 2]
    assert es.x1[:, 0].tolist() == [0, 1, 2, 20, 21, 30, 31, 32, 33, 40, 41, 60, 61]
    assert es.doc.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4]
    assert es.context.tolist() == [c == 0 for c in [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 0, 1]]
    assert int(es.scored.sum()) == 2 + 1 + 3 + 1 + 1
    assert es.has_features.tolist() == [True, True, True, False, True]


def test_at_most_max_docs_taken_in_turn_from_each_cluster_and_max_scored_chunks():
    """max_scored=2 cuts d3 to chunks 0-2; max_docs=4 over the candidates d0, d2, d3, d4, d6 with
    clusters 0, 1, 1, 0, 2: round one takes d0 (cluster 0), d2 (1), d6 (2), round two d4 (0); the
    fourth document ends it before d3."""
    es = _eval_set(max_docs=4, max_scored=2)
    assert es.ids == ["d0", "d2", "d4", "d6"]
    assert es.labels.tolist() == [0, 1, 0, 2]
    assert es.x1[:, 0].tolist() == [0, 1, 2, 20, 21, 40, 41, 60, 61]
    assert es.x1[es.scored, 0].tolist() == [1, 2, 21, 41, 61]


def test_max_scored_one_and_fewer_documents_than_max_docs():
    es = _eval_set(max_docs=10, max_scored=1)
    assert es.ids == ["d0", "d2", "d3", "d4", "d6"]
    assert es.x1[es.scored, 0].tolist() == [1, 21, 31, 41, 61]          # one scored chunk each


def test_max_docs_smaller_than_the_number_of_clusters():
    assert _eval_set(max_docs=2).ids == ["d0", "d2"]                   # first of cluster 0, then of 1


def test_no_document_with_two_chunks_is_an_error():
    data = _data()
    data.sequences["test"] = Sequences(TOKENS[CHUNK == 0], DOC[CHUNK == 0], CHUNK[CHUNK == 0])
    assignments = Assignments(units={"test": LABELS}, example_unit=np.zeros(0, np.int64))
    with pytest.raises(RuntimeError, match="two full chunks"):
        eval_set(data, assignments, "test", Featurizer(), seq_len=2)
