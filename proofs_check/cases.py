"""Random cases for proofs_check: sizes, distributions (dirichlet / sparse / peaked), schedules,
sources. All randomness from one numpy Generator per statement."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dfm.tabular import random_coupling, random_distribution, random_kappa, random_kind

SIZES = [(v, n) for v in (2, 3, 4) for n in (2, 3, 4)]
SOURCES = ("mask", "uniform", "coupling")


def random_size(rng, max_states: int | None = None, with_mask: bool = True) -> tuple[int, int]:
    """(vocab, length) uniform over vocab 2-4, length 2-4, optionally with at most ``max_states`` states."""
    sizes = SIZES
    if max_states is not None:
        sizes = [(v, n) for v, n in SIZES if (v + with_mask) ** n <= max_states]
    return sizes[int(rng.integers(len(sizes)))]


def random_dist(rng, size: int) -> np.ndarray:
    """A distribution of a random kind (dirichlet, sparse with exact zeros, peaked)."""
    return random_distribution(rng, size, kind=random_kind(rng))


def random_positive_dist(rng, size: int, shape=()) -> np.ndarray:
    """Strictly positive distributions ``[*shape, size]`` (flat Dirichlet or peaked with a floor)."""
    if rng.uniform() < 0.5:
        return rng.dirichlet(np.ones(size), size=shape)
    p = rng.dirichlet(np.full(size, 0.2), size=shape) + 1e-3
    return p / p.sum(-1, keepdims=True)


def random_schedule(rng, length: int, max_steps: int = 5) -> np.ndarray:
    """kappa [T + 1, length]: random nondecreasing tables with exact 0/1 endpoints, T in 1..max_steps."""
    return random_kappa(rng, int(rng.integers(1, max_steps + 1)), length)


def ar_kappa(length: int) -> np.ndarray:
    """THEORY S5 autoregressive schedule: T = N, kappa[t, i] = 1[i < t] (0-indexed positions)."""
    t = np.arange(length + 1)[:, None]
    return (np.arange(length)[None, :] < t).astype(np.float64)


def block_kappa(blocks: list[list[int]], length: int) -> np.ndarray:
    """Deterministic schedule revealing ``blocks[s]`` at step s + 1 (T = len(blocks))."""
    kappa = np.zeros((len(blocks) + 1, length))
    for s, block in enumerate(blocks):
        kappa[s + 1:, block] = 1.0
    return kappa


def random_blocks(rng, length: int) -> list[list[int]]:
    """A random ordered partition of the positions (random order, random block sizes)."""
    order = rng.permutation(length) if rng.uniform() < 0.5 else np.arange(length)
    cuts = sorted(rng.choice(np.arange(1, length), size=int(rng.integers(0, length)), replace=False).tolist())
    bounds = [0] + cuts + [length]
    return [sorted(order[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class SourceCase:
    """A data law with a source: ``source`` in SOURCES, plus the keyword arguments for dfm.tabular."""

    vocab: int
    length: int
    q: np.ndarray
    source: str
    kwargs: dict

    @property
    def with_mask(self) -> bool:
        return self.source == "mask"


def random_source_case(rng, source: str, max_states: int | None = None) -> SourceCase:
    """Random (vocab, length, q) and source: all-mask, independent random source, or random coupling."""
    vocab, length = random_size(rng, max_states, with_mask=source == "mask")
    d = vocab**length
    q = random_dist(rng, d)
    if source == "mask":
        kwargs = {}
    elif source == "uniform":
        kwargs = {"source": np.full(d, 1.0 / d) if rng.uniform() < 0.5 else random_dist(rng, d)}
    else:
        kwargs = {"coupling": random_coupling(rng, q, kind=random_kind(rng))}
    return SourceCase(vocab, length, q, source, kwargs)


def random_mixture(rng, d: int):
    """(w [K], experts [K, D], q [D]) with K in 2..4, w Dirichlet, experts of random kinds."""
    k = int(rng.integers(2, 5))
    w = rng.dirichlet(np.ones(k))
    experts = np.stack([random_dist(rng, d) for _ in range(k)])
    return w, experts, w @ experts
