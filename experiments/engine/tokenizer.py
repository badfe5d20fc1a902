"""Byte-level BPE tokenizer trained on the train split, saved as an HF fast tokenizer.

`train_tokenizer` uses HF `tokenizers` (GPT-2-style byte-level pre-tokenizer and decoder, so every
string round-trips) and wraps the result in `transformers.PreTrainedTokenizerFast` with BOS, EOS
and PAD special tokens (ids 0, 1, 2); `save_pretrained` writes it so that
``transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")`` loads it back.

A job may instead use a pretrained checkpoint's tokenizer (`load_pretrained_tokenizer`); then
`special_token_ids` gives the BOS / EOS / PAD ids it reads sequences with.

Long documents: training and encoding never hold a whole long document's pre-tokens, tokens and
offsets at once. A document over `PIECE_CHARS` characters is cut into pieces at single spaces
between two non-space characters (`byte_level_pieces`); the GPT-2 byte-level pre-tokenizer (no
normalizer) never joins text across such a point (the space always opens the next pre-token and no
pre-token ends in it), so the pieces give the same pre-tokens, hence the same trained merges and
the same ids, as the whole document (`tests/integration/test_data_edges.py`). Pretrained tokenizers (other
normalizers / pre-tokenizers, e.g. a leading-space convention) are encoded one document at a time,
whole.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from dfm.io import atomic_dir
from experiments.engine.rundir import load_file
from experiments.engine.task import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
#: documents longer than this many characters are tokenized in pieces (module doc)
PIECE_CHARS = 1 << 20
_SAFE_SPLIT = re.compile(r"(?<=\S) (?=\S)")      # a single space between two non-space characters
_BATCH_CHARS = 1 << 22                            # characters per encode call: bounds the Rust-side buffers


def byte_level_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut at safe points (module doc) into pieces of at most about `max_chars` characters;
    ``"".join(pieces) == text``. A stretch with no safe point (no single space between words) stays
    in one piece, however long."""
    if len(text) <= max_chars:
        return [text]
    out, start = [], 0
    while len(text) - start > max_chars:
        m = (_SAFE_SPLIT.search(text, start + max_chars // 2, start + max_chars)
             or _SAFE_SPLIT.search(text, start + max_chars))
        if m is None:
            break
        out.append(text[start:m.start()])
        start = m.start()
    out.append(text[start:])
    return out


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from byte_level_pieces(text)


def _splits_exactly(tokenizer) -> bool:
    """Whether `tokenizer` pre-tokenizes like `train_tokenizer`'s (GPT-2 byte-level regex, no prefix
    space, no normalizer), so `byte_level_pieces` keeps its ids."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    return (backend.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `texts`.

    Args:
      texts: training documents.
      vocab_size: final vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
      a `transformers.PreTrainedTokenizerFast` with ``bos_token``, ``eos_token``, ``pad_token``.

    Raises:
      ValueError: if `vocab_size` < 256 + 3 (the byte alphabet and the special tokens).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``tokenizer.save_pretrained`` into a temporary sibling (``.<name>.tmp*``), then an atomic
    rename to `directory` (an existing `directory` is replaced; `dfm.io.atomic_dir`).

    Raises:
      OSError: the disk is full, over quota or read-only (naming `directory`); nothing is left
        under its name.
    """
    with atomic_dir(directory) as tmp:
        tokenizer.save_pretrained(str(tmp))


def load_tokenizer(directory: Path):
    """``transformers.AutoTokenizer.from_pretrained(directory)`` (a PreTrainedTokenizerFast).

    Raises:
      RunDirError: the directory is missing or holds no readable tokenizer (naming it).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return load_file(Path(directory), lambda d: AutoTokenizer.from_pretrained(str(d)), "tokenizer")


def encode_documents(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text followed by EOS, int32 arrays (no BOS: the model input adds it); the
    ids of ``tokenizer(text, add_special_tokens=False)``, computed in bounded batches of pieces
    (module doc) so that memory does not grow with the longest document."""
    eos = np.asarray([tokenizer.eos_token_id], np.int32)
    if _splits_exactly(tokenizer):
        backend = tokenizer.backend_tokenizer
        encode = lambda batch: [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]  # noqa: E731
        split = byte_level_pieces
    else:
        encode = lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]  # noqa: E731
        split = lambda text: [text]  # noqa: E731
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    batch, owners, size = [], [], 0
    for i, text in enumerate(texts):
        for piece in split(text):
            batch.append(piece)
            owners.append(i)
            size += len(piece)
            if size >= _BATCH_CHARS:
                for owner, ids in zip(owners, encode(batch)):
                    parts[owner].append(np.asarray(ids, np.int32))
                batch, owners, size = [], [], 0
    for owner, ids in zip(owners, encode(batch) if batch else []):
        parts[owner].append(np.asarray(ids, np.int32))
    return [np.concatenate([*p, eos]) for p in parts]


PRETRAINED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_pretrained_tokenizer(directory: Path):
    """The tokenizer of a local HF checkpoint directory: ``transformers.AutoTokenizer.from_pretrained``
    (``tokenizer.json`` / ``tokenizer_config.json``), so its ids are transformers' ids for the same text.

    Raises:
      DataError: the directory is missing, holds none of `PRETRAINED_TOKENIZER_FILES`, or
        transformers cannot build a tokenizer from it (naming it).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such tokenizer directory")
    if not any((directory / name).is_file() for name in PRETRAINED_TOKENIZER_FILES):
        raise DataError(f"{directory}: no tokenizer files (none of {', '.join(PRETRAINED_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{directory}: cannot load its tokenizer ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None


def special_token_ids(tokenizer) -> dict[str, int]:
    """``{"bos_id", "eos_id", "pad_id"}``: the ids the job reads a sequence with (input = BOS +
    tokens), ends each document with, and pads with.

    The tokenizer's own BOS / EOS / PAD where it declares them (a tokenizer of `train_tokenizer`:
    0, 1, 2). A tokenizer without a BOS token (Qwen2's: its documents are separated by
    ``<|endoftext|>``, its EOS) uses its EOS id as BOS; one without PAD uses EOS.

    Raises:
      DataError: the tokenizer has no EOS token (documents could not be ended).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: no eos_token; the job ends "
                        f"every document with EOS")
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    return {"bos_id": int(eos if bos is None else bos), "eos_id": int(eos), "pad_id": int(eos if pad is None else pad)}
