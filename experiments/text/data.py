"""Data stage of the text job: corpus -> split -> tokenizer (trained on train) -> token ids.

Idempotent: `prepare_data` returns at once when ``data/summary.json`` exists (it is written last).
`load_data` then reads everything later stages need from the run directory into one `TextData`
(never the stdlib again), which the engine passes to every stage.
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
from experiments.engine.tokenizer import encode_documents, load_tokenizer, save_tokenizer, train_tokenizer
from experiments.text import corpus as corpus_mod
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


def prepare_data(config: ExperimentConfig, run: RunDir, log=print) -> dict:
    """Build corpus, split, tokenizer and token ids in `run` (skipped if already done).

    Returns:
      the data summary (also in ``data/summary.json``): per split the number of documents,
      characters, tokens and full sequences; vocabulary size; corpus fingerprint; Python version.
    """
    if run.data_summary.is_file():
        return read_json(run.data_summary)
    t0 = time.perf_counter()
    dc = config.data
    docs = corpus_mod.stdlib_documents(exclude_dirs=dc.exclude_dirs)
    splits = corpus_mod.split_documents(docs, dc.val_fraction, dc.test_fraction)
    for name in corpus_mod.SPLITS:
        if not splits[name]:
            raise DataError(f"data: the {name} split is empty; change data.val_fraction/test_fraction")
    lines = [json.dumps({"id": d.id, "split": corpus_mod.split_of(d.id, dc.val_fraction, dc.test_fraction),
                         "text": d.text}) for d in docs]
    atomic_write_text(run.corpus, "\n".join(lines) + "\n")
    log(f"[data] corpus: {len(docs)} documents, {sum(len(d.text) for d in docs):,} characters")
    if not (run.tokenizer / "tokenizer.json").is_file():
        tok = train_tokenizer((d.text for d in splits["train"]), dc.vocab_size)
        save_tokenizer(tok, run.tokenizer)
    tok = load_tokenizer(run.tokenizer)
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
    atomic_save_npz(run.tokens, **arrays)
    summary.update({
        "vocab_size": len(tok), "seq_len": dc.seq_len, "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
        "fingerprint": corpus_mod.fingerprint(docs), "python": platform.python_version(),
        "tokens_sha256": arrays_digest(arrays), "versions": software_versions(),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    atomic_write_json(run.data_summary, summary)
    log("[data] tokens: " + ", ".join(f"{k} {v:,}" for k, v in summary["tokens"].items())
        + f"; vocab {len(tok)}")
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


def load_data(config: ExperimentConfig, run: RunDir, log=print) -> TextData:
    """The data stage (if not done), then every split, its sequences and the tokenizer."""
    summary = prepare_data(config, run, log=log)
    splits = {name: load_split(run, name) for name in corpus_mod.SPLITS}
    seqs = {name: s.sequences(config.data.seq_len) for name, s in splits.items()}
    return TextData(summary, splits, seqs, load_tokenizer(run.tokenizer))
