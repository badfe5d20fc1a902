"""The text job's data edges (issue: security and the edges): a corpus too small for the partition's
features is named by its config key, and very long documents are tokenized in bounded pieces that
give exactly the ids (and the trained tokenizer) of the whole document."""
import functools
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main

pytestmark = pytest.mark.integration


def _corpus(folder: Path, words: list[str], docs: int = 60, length: int = 400) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(docs):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(words, length)))
    return folder


def test_svd_dim_above_the_vocabulary_names_the_key(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus", ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"])
    status = main(["partition", "--config", "tiny", "--out", str(tmp_path / "run"), "--quiet",
                   f"data.corpus={corpus}"])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dfm: error: [partition] svd_dim = 16: the train documents cannot give that many tf-idf + SVD features "
        "(n_components=16 must be smaller than the tf-idf vocabulary size (8) of texts); lower svd_dim or use a "
        "larger corpus")


def test_a_warmup_longer_than_the_stage_is_warned(tmp_path, capsys):
    status = main(["train", "--base", "--config", "tiny", "--out", str(tmp_path / "run"), "base.steps=3",
                   "base.warmup_steps=5", "base.validations=0"])
    assert status == 0
    assert ("[base] warning: warmup_steps = 5 > steps = 3: the learning rate never reaches its peak (0.003); the "
            "warmup is cut to the 3 steps") in capsys.readouterr().out.splitlines()


@functools.lru_cache(maxsize=1)
def _stdlib_docs() -> tuple:
    from experiments.text.corpus import stdlib_documents

    return tuple(stdlib_documents())                # parsed once per worker (~20 s on CI)


def _stdlib_texts(n: int = 120) -> list[str]:
    return [d.text for d in _stdlib_docs()[:n]]


def test_pieces_join_back_and_cut_only_at_single_spaces():
    from experiments.engine.tokenizer import byte_level_pieces

    text = "".join(_stdlib_texts())
    pieces = byte_level_pieces(text, 3000)
    assert "".join(pieces) == text and len(pieces) > 50
    assert all(len(p) <= 3000 for p in pieces[:-1])
    for a, b in zip(pieces, pieces[1:]):
        assert b[0] == " " and not a[-1].isspace() and not b[1].isspace()
    assert byte_level_pieces("x" * 10_000, 3000) == ["x" * 10_000]          # no safe point: one piece


def test_long_documents_train_and_encode_exactly_as_whole(monkeypatch):
    """The job's tokenizer trained and applied on pieces equals the one trained and applied on whole
    documents (the reference: HF `tokenizers` / transformers on the unsplit texts)."""
    from experiments.engine import tokenizer as tk

    texts = _stdlib_texts()
    long_texts = ["".join(texts[i:i + 40]) for i in range(0, len(texts), 40)]       # 3 documents of ~100k chars
    whole = tk.train_tokenizer(long_texts, 400)
    monkeypatch.setattr(tk, "PIECE_CHARS", 2000)
    monkeypatch.setattr(tk, "_BATCH_CHARS", 15_000)
    pieced = tk.train_tokenizer(long_texts, 400)
    assert pieced.backend_tokenizer.to_str() == whole.backend_tokenizer.to_str()
    reference = whole(long_texts + texts[:5], add_special_tokens=False)["input_ids"]
    ours = tk.encode_documents(pieced, long_texts + texts[:5])
    assert [o.tolist() for o in ours] == [r + [whole.eos_token_id] for r in reference]
    assert all(o.dtype == np.int32 for o in ours)


def test_other_pre_tokenizers_are_encoded_whole(monkeypatch):
    """A tokenizer with another pre-tokenizer (Metaspace, a leading-space convention) is never cut."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from experiments.engine import tokenizer as tk

    texts = _stdlib_texts(30)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    monkeypatch.setattr(tk, "PIECE_CHARS", 500)
    monkeypatch.setattr(tk, "_BATCH_CHARS", 2000)
    assert not tk._splits_exactly(tok)
    reference = tok(texts, add_special_tokens=False)["input_ids"]
    assert [o.tolist() for o in tk.encode_documents(tok, texts)] == [r + [tok.eos_token_id] for r in reference]
