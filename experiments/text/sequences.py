"""Token sequences: documents chunked into fixed-length sequences, and deterministic batches.

A document's token ids (its text, then EOS) are cut into consecutive chunks of `seq_len` tokens;
only full chunks are kept (the tail shorter than `seq_len` is dropped, in training and evaluation
alike, so no padding enters any loss). The model input of a chunk ``x1`` is ``[BOS, x1[:-1]]``
(`dfm.autoregressive.shift_right`) for the causal model, and the noised state ``x_t`` for the
masked denoiser. Each chunk inherits its document's cluster.
"""
from __future__ import annotations

import hashlib
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


def _stream_seed(seed: int, stream: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "big")


class EpochBatches:
    """Deterministic batches: batch `step` is a pure function of (seed, stream, step).

    Sequences are visited in a fresh permutation each epoch (sampling without replacement within
    an epoch), permutation e drawn from ``numpy.random.default_rng([stream seed, e])``. Resuming at
    any step therefore reproduces the uninterrupted run's batches exactly.

    Args:
      num: number of sequences (>= 1).
      batch_size: sequences per batch.
      seed: experiment seed; stream: a name separating the stages (e.g. "expert-2").

    Raises:
      ValueError: if `num` < 1 or `batch_size` < 1.
    """

    def __init__(self, num: int, batch_size: int, seed: int, stream: str):
        if num < 1:
            raise ValueError(f"num: no sequences to train on for stream {stream!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.num, self.batch_size = num, batch_size
        self._seed = _stream_seed(seed, stream)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self._seed, epoch]).permutation(self.num)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Sequence indices of batch `step`, ``[batch_size]`` int64."""
        g = step * self.batch_size + np.arange(self.batch_size)
        epochs, pos = np.divmod(g, self.num)
        return np.array([self._perm(int(e))[int(p)] for e, p in zip(epochs, pos)], dtype=np.int64)


def allocate_steps(total_steps: int, sizes: Sequence[int]) -> list[int]:
    """Split `total_steps` in proportion to `sizes` (largest remainder; each part >= 1).

    Used for compute matching: expert k gets ``steps_k`` with ``sum_k steps_k = total_steps``.

    Raises:
      ValueError: if `total_steps` < number of parts or a size is not positive.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.size == 0 or np.any(sizes <= 0):
        raise ValueError(f"sizes: must be positive, got {sizes.tolist()}")
    if total_steps < sizes.size:
        raise ValueError(f"total_steps: must be >= the number of experts ({sizes.size}), got {total_steps}")
    exact = total_steps * sizes / sizes.sum()
    base = np.floor(exact).astype(int)
    order = np.argsort(-(exact - base), kind="stable")
    base[order[: total_steps - base.sum()]] += 1
    while base.min() < 1:  # tiny clusters still get one step, taken from the largest share
        base[np.argmax(base)] -= 1
        base[np.argmin(base)] += 1
    return [int(b) for b in base]
