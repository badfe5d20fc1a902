"""Token sequences: documents chunked into fixed-length sequences.

A document's token ids (its text, then EOS) are cut into consecutive chunks of `seq_len` tokens;
only full chunks are kept (the tail shorter than `seq_len` is dropped, in training and evaluation
alike, so no padding enters any loss). The model input of a chunk ``x1`` is ``[BOS, x1[:-1]]``
(`dfm.autoregressive.shift_right`) for the causal model, and the noised state ``x_t`` for the
masked denoiser. Each chunk inherits its document's cluster.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sequences:
    """Full-length chunks of the documents of one split.

    Attributes:
      tokens: ``[num_sequences, seq_len]`` int32 token ids.
      doc: ``[num_sequences]`` int32 index of the source document (in the split's document list).
      chunk: ``[num_sequences]`` int32 index of the chunk within its document (0 = first).
    """

    tokens: np.ndarray
    doc: np.ndarray
    chunk: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, mask_or_index) -> "Sequences":
        """The sequences at a boolean mask or index array."""
        return Sequences(self.tokens[mask_or_index], self.doc[mask_or_index], self.chunk[mask_or_index])


def chunk_documents(doc_tokens: Sequence[np.ndarray], seq_len: int) -> Sequences:
    """Cut each document into ``len // seq_len`` full chunks, in document order.

    Args:
      doc_tokens: one int array per document.
      seq_len: chunk length (>= 1).

    Raises:
      ValueError: if `seq_len` < 1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    rows, docs, chunks = [], [], []
    for i, toks in enumerate(doc_tokens):
        n = len(toks) // seq_len
        if n:
            rows.append(np.asarray(toks[: n * seq_len], dtype=np.int32).reshape(n, seq_len))
            docs.append(np.full(n, i, dtype=np.int32))
            chunks.append(np.arange(n, dtype=np.int32))
    if not rows:
        empty = np.zeros((0,), np.int32)
        return Sequences(np.zeros((0, seq_len), np.int32), empty, empty)
    return Sequences(np.concatenate(rows), np.concatenate(docs), np.concatenate(chunks))


def pack_tokens(doc_tokens: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents: ``(flat [total] int32, offsets [num_docs + 1] int64)``."""
    lengths = np.array([len(t) for t in doc_tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([np.asarray(t, np.int32) for t in doc_tokens]) if len(doc_tokens) else np.zeros(0, np.int32)
    return flat.astype(np.int32), offsets


def unpack_tokens(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Inverse of `pack_tokens`."""
    return [flat[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]
