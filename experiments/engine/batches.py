"""Deterministic batches and the compute-matched allocation of stage-2 steps (both tasks).

`EpochBatches`: batch `step` of a stage is a pure function of (seed, stage, step), so a resumed
stage sees exactly the batches of an uninterrupted one. `allocate_steps`: the K experts split the
dense model's `stage2.steps` in proportion to their clusters' training examples.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


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
      steps: the stage's number of optimizer steps when known (the engine passes it; tasks that
        lay out a whole stage ahead, e.g. packed sequences, read it), else None.

    Raises:
      ValueError: if `num` < 1 or `batch_size` < 1.
    """

    def __init__(self, num: int, batch_size: int, seed: int, stream: str, steps: int | None = None):
        if num < 1:
            raise ValueError(f"num: no sequences to train on for stream {stream!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.num, self.batch_size = num, batch_size
        self.stream, self.steps = stream, steps
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
