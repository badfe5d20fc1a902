"""Enumeration of token sequences: mixed-radix indices, mask token = vocab.

A state is a sequence ``x = (x^1..x^N)`` with values in ``[0, vocab]`` where ``vocab`` is the mask
token (THEORY notation ``m = d``), or in ``[0, vocab)`` without a mask (uniform source).
States are enumerated in C order (first position most significant), so the data states
``[vocab]^length`` keep their relative order inside the masked enumeration.
"""
from __future__ import annotations

import functools

import numpy as np

from dfm.tabular._validate import check_vocab_length


def num_symbols(vocab: int, with_mask: bool = True) -> int:
    """Number of values a coordinate can take: ``vocab + 1`` with a mask, else ``vocab``."""
    return vocab + 1 if with_mask else vocab


@functools.lru_cache(maxsize=None)
def _states(vocab: int, length: int, with_mask: bool) -> np.ndarray:
    base = num_symbols(vocab, with_mask)
    states = np.indices((base,) * length, dtype=np.int64).reshape(length, -1).T.copy()
    states.setflags(write=False)
    return states


def enumerate_states(vocab: int, length: int, *, with_mask: bool = True) -> np.ndarray:
    """All states, shape ``[M, length]`` int64, ``M = (vocab + 1)**length`` (or ``vocab**length``).

    Row ``k`` is the mixed-radix digits of ``k`` (first position most significant); the result is
    cached per ``(vocab, length, with_mask)`` and read-only.

    Raises:
      ValueError: vocab or length not a positive integer.
    """
    check_vocab_length(vocab, length)
    return _states(int(vocab), int(length), bool(with_mask))


def state_index(states, vocab: int, with_mask: bool = True) -> np.ndarray:
    """Index of each state in :func:`enumerate_states` order; ``states`` ``[..., length]`` -> ``[...]``.

    Raises:
      ValueError: states not integer, or a value outside ``[0, vocab]`` (``[0, vocab)`` without mask).
    """
    check_vocab_length(vocab)
    arr = np.asarray(states)
    if arr.ndim < 1 or arr.shape[-1] < 1:
        raise ValueError(f"states must have shape [..., length], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"states must be integers, got dtype {arr.dtype}")
    base = num_symbols(vocab, with_mask)
    if np.any(arr < 0) or np.any(arr >= base):
        raise ValueError(f"states must take values in [0, {base - 1}], got range {arr.min()}..{arr.max()}")
    weights = base ** np.arange(arr.shape[-1] - 1, -1, -1, dtype=np.int64)
    return arr.astype(np.int64) @ weights


@functools.lru_cache(maxsize=None)
def _data_index(vocab: int, length: int) -> np.ndarray:
    idx = state_index(_states(vocab, length, False), vocab, with_mask=True)
    idx.setflags(write=False)
    return idx


def data_index(vocab: int, length: int) -> np.ndarray:
    """Positions of the data states ``[vocab]^length`` inside the masked enumeration, ``[vocab**length]``."""
    check_vocab_length(vocab, length)
    return _data_index(int(vocab), int(length))


def mask_index(vocab: int, length: int) -> int:
    """Index of the all-mask state in the masked enumeration (the last one)."""
    check_vocab_length(vocab, length)
    return (vocab + 1) ** length - 1


def embed_data(p, vocab: int, length: int) -> np.ndarray:
    """Embed a distribution over data states ``[vocab**length]`` into the masked state space ``[M]``."""
    arr = np.asarray(p, dtype=np.float64)
    if arr.shape[-1] != vocab**length:
        raise ValueError(f"p must have vocab**length = {vocab**length} entries, got shape {arr.shape}")
    out = np.zeros(arr.shape[:-1] + ((vocab + 1) ** length,))
    out[..., data_index(vocab, length)] = arr
    return out


def point_mass(index: int, size: int) -> np.ndarray:
    """The delta distribution ``[size]`` at ``index``."""
    if not 0 <= index < size:
        raise ValueError(f"index must be in [0, {size}), got {index}")
    out = np.zeros(size)
    out[index] = 1.0
    return out
