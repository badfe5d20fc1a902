"""Data stage of the text job: corpus -> split -> tokenizer -> token ids.

The corpus is ``data.corpus`` (`experiments.text.sources`: the stdlib docs by default, or the
user's folder / JSONL file), split by a hash of each document id (`corpus.split_of`). The tokenizer
is a byte-level BPE trained on the train split, or, with ``model.init_from``, the checkpoint's own
(`experiments.engine.tokenizer.load_pretrained_tokenizer`: the ids are transformers' for the same
text) and the vocabulary size is then the checkpoint's embedding size.

Idempotent: `prepare_data` returns at once when ``data/summary.json`` exists (it is written last),
after checking that a path corpus has not changed since (`check_source_unchanged`). `load_data`
then reads everything later stages need from the run directory into one `TextData` (never the
corpus source again), which the engine passes to every stage.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

import numpy as np

from experiments.engine.rundir import (UNREADABLE_HINT, RunDir, RunDirError, atomic_save_npz, atomic_write_json,
                                       atomic_write_text, arrays_digest, load_npz, read_json, software_versions)
from experiments.engine.task import DataError
from experiments.engine.tokenizer import (encode_documents, load_pretrained_tokenizer, load_tokenizer, save_tokenizer,
                                          special_token_ids, train_tokenizer)
from experiments.text import corpus as corpus_mod
from experiments.text import modeling, sources
from experiments.text.config import ExperimentConfig
from experiments.text.sequences import Sequences, chunk_documents, pack_tokens, unpack_tokens


@dataclass(frozen=True)
class Split:
    """The documents of one split: ids, texts and token ids (text + EOS)."""

    ids: list[str]
    texts: list[str]
    tokens: list[np.ndarray]

    def sequences(self, seq_len: int) -> Sequences:
        """Full-length chunks (see `experiments.sequences.chunk_documents`)."""
        return chunk_documents(self.tokens, seq_len)


def check_source_unchanged(config: ExperimentConfig, summary: dict, log=print) -> None:
    """Refuse to reuse a finished data stage whose path corpus (a folder or JSONL file) now holds
    other documents: the run directory pins the config, hence the path, not the files behind it.

    A built-in corpus, or a summary without a ``corpus`` entry (written before sources existed),
    is not checked. The files' names, sizes and times (`sources.signature`) are compared first;
    only when they differ are the documents read again and their `corpus.fingerprint` compared. A
    path that no longer exists is only logged (the run keeps its own copy, ``data/corpus.jsonl``).

    Raises:
      DataError: the documents differ from those the data stage read (naming the path).
    """
    recorded = summary.get("corpus")
    if not isinstance(recorded, dict) or recorded.get("kind") in sources.BUILTIN:
        return
    path = sources.resolve_path(config.data.corpus)
    if not path.exists():
        log(f"[data] note: the corpus {path} no longer exists; the run uses its copy (data/corpus.jsonl)")
        return
    if str(path) == recorded.get("path") and sources.signature(path) == recorded.get("signature"):
        return
    now = corpus_mod.fingerprint(sources.load_documents(config.data.corpus))
    if now != summary.get("fingerprint"):
        raise DataError(f"data.corpus: {path} holds other documents than when this run's data stage read "
                        f"{recorded.get('path')} (corpus fingerprint {summary.get('fingerprint')} -> {now}); "
                        f"its tokenizer and models come from the old ones: use another --out for the new corpus")


def _tokenizer(config: ExperimentConfig, run: RunDir, train_texts, pretrained, log) -> tuple[object, dict]:
    """The run's tokenizer (made once, saved to ``<run>/tokenizer``, read back) and its vocab size:
    a BPE trained on `train_texts`, or the checkpoint's (`pretrained`: its `DecoderConfig`)."""
    init = modeling.init_from_path(config)
    if pretrained is None:
        if not (run.tokenizer / "tokenizer.json").is_file():
            save_tokenizer(train_tokenizer(train_texts, config.data.vocab_size), run.tokenizer)
        tok = load_tokenizer(run.tokenizer)
        return tok, {"vocab_size": len(tok)}
    p = pretrained
    log(f"[data] model.init_from {init}: {p.num_layers} layers, hidden {p.hidden_size}, {p.num_heads} heads "
        f"({p.kv_heads} kv), vocab {p.vocab_size}; the [model] sizes and data.vocab_size are ignored, the "
        f"tokenizer is the checkpoint's")
    if not (run.tokenizer / "tokenizer.json").is_file():
        save_tokenizer(load_pretrained_tokenizer(init), run.tokenizer)
    tok = load_tokenizer(run.tokenizer)
    return tok, {"vocab_size": p.vocab_size}


def prepare_data(config: ExperimentConfig, run: RunDir, log=print) -> dict:
    """Build corpus, split, tokenizer and token ids in `run` (skipped if already done).

    Returns:
      the data summary (also in ``data/summary.json``): per split the number of documents,
      characters, tokens and full sequences; vocabulary size (the checkpoint's with
      ``model.init_from``); BOS / EOS / PAD ids (`special_token_ids`); corpus fingerprint and
      source (`sources.describe`); the tokenizer's origin; Python version.

    Raises:
      DataError: an unusable corpus (`experiments.text.sources`) or checkpoint, an empty split, a
        token id outside the checkpoint's vocabulary, or a changed path corpus
        (`check_source_unchanged`).
    """
    if run.data_summary.is_file():
        summary = read_json(run.data_summary)
        check_source_unchanged(config, summary, log)
        return summary
    t0 = time.perf_counter()
    dc = config.data
    source = sources.describe(dc.corpus)
    pretrained = modeling.pretrained_decoder_config(config) if config.model.init_from else None
    docs = sources.load_documents(dc.corpus, exclude_dirs=dc.exclude_dirs)
    splits = corpus_mod.split_documents(docs, dc.val_fraction, dc.test_fraction)
    for name in corpus_mod.SPLITS:
        if not splits[name]:
            raise DataError(f"data: the {name} split is empty ({len(docs)} documents in {dc.corpus}); change "
                            f"data.val_fraction/test_fraction or add documents")
    lines = [json.dumps({"id": d.id, "split": corpus_mod.split_of(d.id, dc.val_fraction, dc.test_fraction),
                         "text": d.text}) for d in docs]
    atomic_write_text(run.corpus, "\n".join(lines) + "\n")
    log(f"[data] corpus {dc.corpus}: {len(docs)} documents, {sum(len(d.text) for d in docs):,} characters")
    tok, vocab = _tokenizer(config, run, (d.text for d in splits["train"]), pretrained, log)
    special = special_token_ids(tok)
    arrays = {}
    summary = {"documents": {}, "characters": {}, "tokens": {}, "sequences": {},
               "scored_tokens_max": {}}
    for name in corpus_mod.SPLITS:
        toks = encode_documents(tok, [d.text for d in splits[name]])
        flat, offsets = pack_tokens(toks)
        arrays[f"{name}_tokens"], arrays[f"{name}_offsets"] = flat, offsets
        arrays[f"{name}_ids"] = np.array([d.id for d in splits[name]])
        seqs = chunk_documents(toks, dc.seq_len)
        summary["documents"][name] = len(splits[name])
        summary["characters"][name] = sum(len(d.text) for d in splits[name])
        summary["tokens"][name] = int(flat.size)
        summary["sequences"][name] = len(seqs)
        summary["scored_tokens_max"][name] = int((seqs.chunk > 0).sum()) * dc.seq_len
    top = max([int(arrays[f"{n}_tokens"].max(initial=0)) for n in corpus_mod.SPLITS] + list(special.values()))
    if config.model.init_from and top >= vocab["vocab_size"]:
        raise DataError(f"model.init_from: token id {top} of its tokenizer is outside the model's vocabulary of "
                        f"{vocab['vocab_size']} (config.json vocab_size)")
    atomic_save_npz(run.tokens, **arrays)
    summary.update({
        **vocab, "seq_len": dc.seq_len, **special,
        "fingerprint": corpus_mod.fingerprint(docs), "python": platform.python_version(),
        "tokens_sha256": arrays_digest(arrays), "versions": software_versions(),
        "seconds": round(time.perf_counter() - t0, 2),
        "corpus": source,
        "tokenizer": {"kind": "pretrained", "init_from": str(modeling.init_from_path(config))}
        if config.model.init_from else {"kind": "bpe"},
    })
    atomic_write_json(run.data_summary, summary)
    log("[data] tokens: " + ", ".join(f"{k} {v:,}" for k, v in summary["tokens"].items())
        + f"; vocab {summary['vocab_size']}")
    return summary


def load_split(run: RunDir, split: str) -> Split:
    """Ids, texts and token ids of one split, read from the run directory.

    Raises:
      RunDirError: ``data/tokens.npz`` or ``data/corpus.jsonl`` missing, truncated or inconsistent
        (naming the file).
    """
    z = load_npz(run.tokens)
    try:
        ids = [str(x) for x in z[f"{split}_ids"]]
        tokens = unpack_tokens(z[f"{split}_tokens"], z[f"{split}_offsets"])
    except KeyError as exc:
        raise RunDirError(f"{run.tokens}: no array {exc} (not this job's token file); {UNREADABLE_HINT}") from None
    texts = {}
    try:
        with open(run.corpus, encoding="utf-8") as f:
            wanted = set(ids)
            for line in f:
                row = json.loads(line)
                if row["id"] in wanted:
                    texts[row["id"]] = row["text"]
        return Split(ids, [texts[i] for i in ids], tokens)
    except (OSError, ValueError, KeyError) as exc:
        raise RunDirError(f"{run.corpus}: unreadable or missing documents ({type(exc).__name__}: {exc}); "
                          f"{UNREADABLE_HINT}") from None


@dataclass(frozen=True)
class TextData:
    """Everything the stages read of the data stage, loaded once (`load_data`).

    Attributes:
      summary: ``data/summary.json`` (vocab size, special token ids, sizes per split).
      splits: ``{"train" | "val" | "test": Split}``.
      sequences: the splits' full chunks of ``data.seq_len`` tokens.
      tokenizer: the run's tokenizer.
    """

    summary: dict
    splits: dict[str, Split]
    sequences: dict[str, Sequences]
    tokenizer: object

    @property
    def vocab_size(self) -> int:
        return int(self.summary["vocab_size"])

    @property
    def bos_id(self) -> int:
        return int(self.summary["bos_id"])

    @property
    def num_train_examples(self) -> int:
        """Training examples (train sequences) of stage 1 and the dense model."""
        return len(self.sequences["train"])

    @property
    def num_train_units(self) -> int:
        """Train documents (what the partition clusters)."""
        return len(self.splits["train"].ids)


def load_data(config: ExperimentConfig, run: RunDir, log=print) -> TextData:
    """The data stage (if not done), then every split, its sequences and the tokenizer."""
    summary = prepare_data(config, run, log=log)
    splits = {name: load_split(run, name) for name in corpus_mod.SPLITS}
    seqs = {name: s.sequences(config.data.seq_len) for name, s in splits.items()}
    return TextData(summary, splits, seqs, load_tokenizer(run.tokenizer))
