"""Corpus, split, tokenizer and sequence chunking of the main job."""
import random

import numpy as np
import pytest

from experiments.engine.batches import EpochBatches, allocate_steps
from experiments.engine.tokenizer import BOS, EOS, PAD, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer
from experiments.text import corpus, sources
from experiments.text.config import DataConfig
from experiments.text.sequences import chunk_documents, pack_tokens, unpack_tokens


@pytest.fixture(scope="module")
def docs():
    return corpus.stdlib_documents(exclude_dirs=DataConfig().exclude_dirs)


def test_corpus_ids_unique_sorted_and_sizes_positive(docs):
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids)) > 100
    assert ids == sorted(ids)
    assert all(d.text.strip() for d in docs)
    assert sum(len(d.text) for d in docs) > 500_000
    topics = [i for i in ids if i.startswith("topic:")]
    modules = [i for i in ids if i.startswith("module:")]
    assert len(topics) > 20 and len(modules) > 100 and len(topics) + len(modules) == len(ids)
    assert "module:json" in ids and "topic:assert" in ids


def test_corpus_excludes_tests_and_idlelib(docs):
    for d in docs:
        parts = d.id.split(":", 1)[1].split(".")
        assert not {"test", "tests", "idlelib", "lib2to3", "encodings"} & set(parts), d.id


def test_corpus_is_deterministic(docs):
    again = corpus.stdlib_documents(exclude_dirs=DataConfig().exclude_dirs)
    assert corpus.fingerprint(again) == corpus.fingerprint(docs)


def test_python_source_documents_are_the_raw_module_files(docs):
    """"stdlib+python": one ``source:<module>`` document per module file, its bytes as text, same
    exclusions and module naming as the docstring documents, big files left out."""
    exclude = DataConfig().exclude_dirs
    src = sources.python_source_documents(exclude_dirs=exclude)
    ids = [d.id for d in src]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) > 300
    assert all(i.startswith("source:") for i in ids)
    root = corpus.stdlib_root()
    by_id = {d.id: d.text for d in src}
    assert by_id["source:json"] == (root / "json" / "__init__.py").read_text(encoding="utf-8")
    assert by_id["source:json.decoder"] == (root / "json" / "decoder.py").read_text(encoding="utf-8")
    for i in ids:
        assert not {"test", "tests", "idlelib", "lib2to3", "encodings"} & set(i[len("source:"):].split(".")), i
    # every module with docstrings has its source document too (unless over the size cap)
    modules = {d.id[len("module:"):] for d in docs if d.id.startswith("module:")}
    sourced = {i[len("source:"):] for i in ids}
    big = {m for m, path in corpus.stdlib_module_files(exclude_dirs=exclude)
           if path.stat().st_size > sources.MAX_SOURCE_BYTES}
    assert modules - sourced == big & modules
    capped = sources.python_source_documents(exclude_dirs=exclude, max_bytes=5_000)
    assert 0 < len(capped) < len(src)
    assert all(len(d.text.encode("utf-8")) <= 5_000 for d in capped)


def test_stdlib_python_corpus_is_both_domains_sorted(docs):
    both = sources.load_documents("stdlib+python", DataConfig().exclude_dirs)
    src = sources.python_source_documents(exclude_dirs=DataConfig().exclude_dirs)
    assert [d.id for d in both] == sorted(d.id for d in docs + src)
    assert corpus.fingerprint([d for d in both if not d.id.startswith("source:")]) == corpus.fingerprint(docs)


def test_module_text_headers_in_source_order():
    source = '"""Mod doc."""\nclass A:\n    """A doc."""\n    def f(self):\n        """f doc."""\ndef g():\n    pass\n'
    text = corpus.module_text(source, "pkg.mod")
    assert text == "module pkg.mod\n\nMod doc.\n\nclass A\nA doc.\n\ndef A.f\nf doc."
    assert corpus.module_text("x = 1\n", "m") == ""


def test_split_is_deterministic_order_independent_and_by_hash(docs):
    a = corpus.split_documents(docs, 0.1, 0.1)
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    b = corpus.split_documents(shuffled, 0.1, 0.1)
    for name in corpus.SPLITS:
        assert sorted(d.id for d in a[name]) == sorted(d.id for d in b[name])
        assert len(a[name]) > 0
    n = len(docs)
    assert sum(len(v) for v in a.values()) == n
    assert 0.04 * n < len(a["test"]) < 0.2 * n and 0.04 * n < len(a["val"]) < 0.2 * n
    for d in a["test"]:
        assert corpus.hash_unit(d.id) < 0.1
    for d in a["train"]:
        assert corpus.hash_unit(d.id) >= 0.2
    # the split of a document does not depend on the other documents
    assert corpus.split_of("module:json", 0.1, 0.1) == corpus.split_of("module:json", 0.1, 0.1)


def test_hash_unit_range_and_bad_fractions():
    values = [corpus.hash_unit(f"doc{i}") for i in range(2000)]
    assert 0 <= min(values) and max(values) < 1
    assert abs(np.mean(values) - 0.5) < 0.03
    with pytest.raises(ValueError, match="val_fraction, test_fraction"):
        corpus.split_of("x", 0.6, 0.5)


@pytest.fixture(scope="module")
def small_tokenizer(docs):
    return train_tokenizer([d.text for d in docs[:60]], 300)


def test_tokenizer_vocab_and_special_tokens(small_tokenizer):
    tok = small_tokenizer
    assert len(tok) == 300
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)


def test_tokenizer_training_is_deterministic(docs, small_tokenizer):
    again = train_tokenizer([d.text for d in docs[:60]], 300)
    assert again.get_vocab() == small_tokenizer.get_vocab()


def test_autotokenizer_round_trip(tmp_path, small_tokenizer, docs):
    save_tokenizer(small_tokenizer, tmp_path / "tokenizer")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert load_tokenizer(tmp_path / "tokenizer").get_vocab() == loaded.get_vocab()
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    texts = [docs[0].text[:500], "def f(x):\n    return x ** 2  # é ✓ 日本", "  leading spaces\ttabs\n"]
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == small_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    encoded = encode_documents(loaded, texts)
    assert [e[-1] for e in encoded] == [loaded.eos_token_id] * 3
    assert all(e.dtype == np.int32 for e in encoded)


def test_chunk_documents_full_chunks_only():
    docs = [np.arange(10), np.arange(3), np.arange(8) + 100]
    seqs = chunk_documents(docs, 4)
    np.testing.assert_array_equal(seqs.tokens, [[0, 1, 2, 3], [4, 5, 6, 7], [100, 101, 102, 103], [104, 105, 106, 107]])
    np.testing.assert_array_equal(seqs.doc, [0, 0, 2, 2])
    np.testing.assert_array_equal(seqs.chunk, [0, 1, 0, 1])
    flat, offsets = pack_tokens(docs)
    assert [list(a) for a in unpack_tokens(flat, offsets)] == [list(a) for a in docs]


def test_epoch_batches_deterministic_and_cover_each_epoch():
    a = EpochBatches(10, 4, seed=1, stream="expert-0")
    b = EpochBatches(10, 4, seed=1, stream="expert-0")
    first_epoch = np.concatenate([a.indices(0), a.indices(1), a.indices(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))
    for step in (7, 0, 3):  # any order: a pure function of the step
        np.testing.assert_array_equal(a.indices(step), b.indices(step))
    c = EpochBatches(10, 4, seed=1, stream="expert-1")
    assert any(not np.array_equal(a.indices(s), c.indices(s)) for s in range(3))


def test_allocate_steps_proportional_and_exact_sum():
    steps = allocate_steps(100, [300, 100, 100, 500])
    assert sum(steps) == 100 and steps == [30, 10, 10, 50]
    assert sum(allocate_steps(7, [5, 1, 1])) == 7 and min(allocate_steps(7, [5, 1, 1])) >= 1
    with pytest.raises(ValueError, match="total_steps"):
        allocate_steps(2, [1, 1, 1])
