"""The user's own corpus (`data.corpus` = a folder or a JSONL file, `experiments.text.sources`): ids,
texts, errors naming the file and line, the data stage on it, and a changed corpus being refused."""
import json
import os
import shutil

import numpy as np
import pytest

from experiments.engine.pipeline import open_run
from experiments.engine.config import ConfigError
from experiments.engine.rundir import RunDirError
from experiments.engine.task import DataError
from experiments.engine.tokenizer import load_tokenizer
from experiments.registry import load_job
from experiments.text import corpus, sources
from experiments.text.task import TextTask

TASK = TextTask()
WORDS = {"space": ["rocket", "orbit", "moon", "launch", "planet", "star", "comet", "gravity", "telescope", "astronaut"],
         "kitchen": ["flour", "sugar", "oven", "butter", "recipe", "dough", "knife", "onion", "garlic", "simmer"]}


def _text(i: int) -> str:
    rng = np.random.default_rng(i)
    words = WORDS["space" if i % 2 else "kitchen"]
    return " ".join(rng.choice(words, size=60)) + f" document {i}.\n"


def _folder(root, n=40):
    for i in range(n):
        sub = root / ("notes" if i % 3 else "more/deep")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.{'md' if i % 4 else 'txt'}").write_text(_text(i), encoding="utf-8")
    return root


def test_folder_documents_ids_texts_and_skips(tmp_path):
    root = tmp_path / "c"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.md").write_text("# Title\n\nbody é\n", encoding="utf-8")
    (root / "z.TXT").write_bytes("\ufeffwith a byte order mark\r\nline 2".encode())
    (root / "empty.txt").write_text("  \n\t", encoding="utf-8")          # whitespace only: left out
    (root / "code.py").write_text("print(1)", encoding="utf-8")          # not .txt / .md
    (root / ".hidden.txt").write_text("secret", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "notes.txt").write_text("git internals", encoding="utf-8")
    docs = sources.load_documents(str(root))
    assert [(d.id, d.text) for d in docs] == [("file:a/b/x.md", "# Title\n\nbody é\n"),
                                              ("file:z.TXT", "with a byte order mark\r\nline 2")]
    assert sources.describe(str(root))["kind"] == "folder"


def test_folder_errors_name_the_file(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    with pytest.raises(DataError, match=r"holds no documents \(no \*\.txt or \*\.md file"):
        sources.load_documents(str(root))
    (root / "ok.txt").write_text("fine", encoding="utf-8")
    (root / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 \(byte 3"):
        sources.load_documents(str(root))
    with pytest.raises(DataError, match=r"data\.corpus: 'nowhere/x' is neither 'stdlib', 'stdlib\+python' nor"):
        sources.load_documents("nowhere/x")
    (tmp_path / "corpus.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus\.csv is a file but not a \.jsonl file"):
        sources.load_documents(str(tmp_path / "corpus.csv"))


def test_jsonl_documents_ids_and_relative_path(tmp_path, monkeypatch):
    rows = ['{"text": "first", "id": "b"}', "", '{"text": "second"}', '{"id": 7, "text": "third"}',
            '{"text": "   "}', '{"text": "ünïcode", "extra": [1, 2]}']
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    docs = sources.load_documents("c.jsonl")                               # relative to the working directory
    assert [(d.id, d.text) for d in docs] == [("7", "third"), ("b", "first"), ("line:3", "second"),
                                              ("line:6", "ünïcode")]
    described = sources.describe("c.jsonl")
    assert described["kind"] == "jsonl" and described["path"] == str(tmp_path / "c.jsonl")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": "b", "id": "line:1"}'], r"line 2: duplicate id 'line:1' \(first on line 1\)"),
    (['{"text": "a", "id": "x"}', '{"text": "b"}', '{"text": "c", "id": "x"}'],
     r"line 3: duplicate id 'x' \(first on line 1\)"),
    (['{"text": "a"}', '{"text": "b",}'], r"line 2: not valid JSON"),
    (['["text"]'], r"line 1: expected a JSON object"),
    (['{"body": "a"}'], r"line 1: \"text\" must be a string, got nothing"),
    (['{"text": 3}'], r"line 1: \"text\" must be a string, got int"),
    (['{"text": "a", "id": ""}'], r"line 1: \"id\" must be a non-empty string or an integer"),
    (['{"text": "a", "id": true}'], r"line 1: \"id\" must be a non-empty string or an integer"),
    (['{"text": " "}', ""], r"holds no documents \(no line with a non-empty \"text\"\)"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        sources.load_documents(str(path))
    assert str(path) in str(info.value)


def test_jsonl_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid UTF-8"):
        sources.load_documents(str(path))


def test_config_checks_corpus_and_init_from():
    with pytest.raises(ConfigError, match=r"data\.corpus: must be"):
        load_job("tiny", None, ['data.corpus=""'])
    with pytest.raises(ConfigError, match=r"model\.init_from: .*only schedule = \"ar\""):
        load_job("tiny", "masked", ["model.init_from=/some/dir"])
    assert load_job("tiny")[1].data.corpus == "stdlib" and load_job("tiny")[1].model.init_from == ""


def _prepare(out, *overrides, log=lambda *a: None):
    """The text task's data stage of the tiny config (with `overrides`) in the run directory `out`."""
    _, config = load_job("tiny", None, list(overrides))
    return TASK.prepare_data(config, open_run(config, out), log=log)


def test_data_stage_on_a_folder_and_changed_corpus_is_refused(tmp_path):
    root = _folder(tmp_path / "mine")
    out = tmp_path / "run"
    data = _prepare(out, f"data.corpus={root}")
    s = data.summary
    assert s["corpus"] == {"source": str(root), "kind": "folder", "path": str(root),
                           "signature": sources.signature(root)}
    assert s["tokenizer"] == {"kind": "bpe"}
    docs = sources.load_documents(str(root))
    assert s["fingerprint"] == corpus.fingerprint(docs)
    assert sum(s["documents"].values()) == 40
    # the split is the hash-of-id split; every text is the file's, tokens are the run tokenizer's
    tok = load_tokenizer(out / "tokenizer")
    by_id = {d.id: d.text for d in docs}
    for name, split in data.splits.items():
        assert split.ids and all(corpus.split_of(i, 0.1, 0.1) == name for i in split.ids)
        for i, text, toks in zip(split.ids, split.texts, split.tokens):
            assert text == by_id[i]
            assert toks.tolist() == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # a changed config (another corpus) is another run
    with pytest.raises(RunDirError, match=r"differs in: data\.corpus"):
        _prepare(out, "data.corpus=stdlib+python")
    # same files, new times: accepted; new content at the same path: refused
    path = root / "notes" / "doc01.md"
    os.utime(path, ns=(0, 0))
    _prepare(out, f"data.corpus={root}")
    path.write_text("completely new text", encoding="utf-8")
    with pytest.raises(DataError, match=r"holds other documents than when this run's data stage read"):
        _prepare(out, f"data.corpus={root}")
    # a corpus that is gone: the run keeps using its own copy
    shutil.rmtree(root)
    lines = []
    assert _prepare(out, f"data.corpus={root}", log=lines.append).summary == s and "no longer exists" in lines[0]


def test_data_stage_on_jsonl_splits_by_id(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": _text(i)}) + "\n" for i in range(40)), encoding="utf-8")
    data = _prepare(tmp_path / "run", f"data.corpus={path}")
    assert data.summary["corpus"]["kind"] == "jsonl"
    got = sorted(i for split in data.splits.values() for i in split.ids)
    assert got == sorted(f"d{i}" for i in range(40))
    assert data.splits["test"].ids == [i for i in sorted(got) if corpus.split_of(i, 0.1, 0.1) == "test"]
