"""The reveal-order decomposition of the masked factorized sampler (THEORY S6, S7), computed exactly.

From the all-mask state, with the exact denoiser of a masked path (``p_{1|t}(. | x)`` = q conditioned on
the revealed tokens of x, whatever kappa) and rates that do not depend on the state (the discrete rates
``(kappa_{s+1} - kappa_s) / (1 - kappa_s)`` or the Euler rates ``min(1, h kappa' / (1 - kappa))``), each
position is revealed at a random step, independently of the others and of the tokens: position i at step
s with probability ``a[s, i] = prod_{s' < s} (1 - r[s', i]) r[s, i]`` (:func:`step_law`). The steps induce an
ordered partition ``pi = (B_1, .., B_m)`` of the positions (positions revealed at the same step form a
block, blocks in step order), and given pi the tokens are drawn block by block, each position of a block
independently from q's conditional given the earlier blocks. So the sampler's law on the data states is

    p_T = sum_pi P(pi) p_pi,      p_pi(x) = prod_b prod_{i in B_b} q(x^i | x^{B_1 .. B_{b-1}})

(:func:`decomposed_law`, with p_pi from q's marginals: :func:`block_law`), and ``p_pi = q`` when every block
is a single position (any-order AR, THEORY S5). Hence, with ``eps = P(some block has >= 2 positions)``
(:func:`collision_probability`) and ``p_T = (1 - eps) q + eps nu`` (nu the law given a collision):

    TV(p_T, q) <= eps <= sum_{i < j} sum_s a[s, i] a[s, j]   (:func:`pairwise_bound`),
    KL(q || p_T) <= chi2_S := sum_{q > 0} q^2 / p_T - 1 = eps (1 - nu(S)) + eps^2 sum_S (q - nu)^2 / p_T
                 <= eps (1 - nu(S)) + eps^2 (1 + 1 / q_min) / (1 - eps)          (:func:`kl_bounds`).

Everything here is numpy float64; the laws are restricted to the support S of q, where every state the
sampler visits on the way to x (q(x) > 0) is reachable and the denoiser is defined, so the result does not
depend on what a sampler does at unreachable states. A law ``p`` given on S only is taken to be a
probability on the data states: ``TV = (sum_S |p - q| + 1 - p(S)) / 2`` (:func:`tv_on_support`).
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from dfm import tabular as tb


def step_law(rates) -> np.ndarray:
    """``a [T, L]``: the probability that position i, masked at step 0, is revealed at step s, for rates
    ``[T, L]`` that do not depend on the state: ``a[s] = prod_{s' < s} (1 - r[s']) r[s]``."""
    r = np.asarray(rates, dtype=np.float64)
    survive = np.cumprod(np.vstack([np.ones((1, r.shape[1])), 1.0 - r[:-1]]), axis=0)
    return survive * r


@functools.lru_cache(maxsize=None)
def ordered_partitions(length: int) -> tuple:
    """All ordered set partitions ``((B_1, ..), ..)`` of ``range(length)`` (75 for length 4)."""
    def rec(rest):
        if not rest:
            yield ()
            return
        for size in range(1, len(rest) + 1):
            for first in itertools.combinations(rest, size):
                left = tuple(i for i in rest if i not in first)
                for tail in rec(left):
                    yield (first,) + tail
    return tuple(rec(tuple(range(length))))


def partition_probability(a, blocks) -> float:
    """``P(pi)`` for the ordered partition ``blocks``: the positions of ``B_b`` share one step ``s_b`` and
    ``s_1 < s_2 < ..`` (positions independent with step laws ``a [T, L]``); a dynamic programme over steps."""
    a = np.asarray(a, dtype=np.float64)
    f = None
    for block in blocks:
        g = np.prod(a[:, list(block)], axis=1)                 # [T]: all of B revealed at step s
        if f is None:
            f = g
        else:
            before = np.concatenate([[0.0], np.cumsum(f)[:-1]])  # sum_{s' < s} f[s']
            f = g * before
    return float(f.sum())


def block_law(q, vocab: int, length: int, blocks) -> np.ndarray:
    """``p_pi [D]``: ``prod_b prod_{i in B_b} q(x^i | x^{earlier blocks})`` at every data state, from q's
    marginals (an expression of the chain rule, independent of the kernel engine; 0 where q(earlier) = 0)."""
    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    out = np.ones(x1s.shape[0])
    seen: list[int] = []

    def at(coords):
        if not coords:
            return np.ones(x1s.shape[0])
        m = tb.marginal(q, vocab, length, coords)
        return m[x1s[:, coords] @ (vocab ** np.arange(len(coords) - 1, -1, -1))]

    for block in blocks:
        den = at(seen)
        for i in block:
            num = at(seen + [i])
            out = out * np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        seen = seen + list(block)
    return out


def decomposed_law(q, vocab: int, length: int, a):
    """``(law [D], eps, r_on_support_mass)``: ``sum_pi P(pi) p_pi``, the collision probability and the mass
    ``nu(S)`` of the collision part nu on the support S of q (``nu = (p - (1 - eps) q) / eps``; 1 when eps = 0)."""
    law = np.zeros(vocab**length)
    collide = np.zeros(vocab**length)
    eps = 0.0
    for blocks in ordered_partitions(length):
        p = partition_probability(a, blocks)
        if p == 0.0:
            continue
        part = p * block_law(q, vocab, length, blocks)
        law += part
        if max(len(b) for b in blocks) > 1:
            eps += p
            collide += part
    support = np.asarray(q) > 0
    nu_mass = float(collide[support].sum() / eps) if eps > 0 else 1.0
    return law, eps, nu_mass


def total_probability(a, length: int) -> float:
    """``sum_pi P(pi)``: 1 when every position is revealed by the last step."""
    return sum(partition_probability(a, blocks) for blocks in ordered_partitions(length))


def collision_probability(a, length: int) -> float:
    """``eps = P(two positions revealed at the same step)`` = 1 - P(every block a single position)."""
    singles = sum(partition_probability(a, blocks) for blocks in ordered_partitions(length)
                  if max(len(b) for b in blocks) == 1)
    return 1.0 - singles


def pairwise_bound(a) -> float:
    """``sum_{i < j} sum_s a[s, i] a[s, j]`` (a union bound on eps)."""
    a = np.asarray(a, dtype=np.float64)
    total = a.sum(1) ** 2 - (a**2).sum(1)      # per step: sum_{i != j} a_i a_j
    return float(0.5 * total.sum())


def tv_on_support(p_on_support, q_on_support) -> float:
    """TV between q and a probability ``p`` on the data states given by its values on S = supp(q)."""
    p, q = np.asarray(p_on_support, np.float64), np.asarray(q_on_support, np.float64)
    return float(0.5 * (np.abs(p - q).sum() + max(0.0, 1.0 - p.sum())))


def kl_bounds(q, law, eps: float, nu_mass: float):
    """``(KL(q || p), chi2_S, the chi2 identity's right side, the q_min bound)`` (module docstring), on S."""
    q = np.asarray(q, np.float64)
    s = q > 0
    qs, ps = q[s], np.asarray(law, np.float64)[s]
    with np.errstate(divide="ignore"):
        kl = float(np.sum(qs * (np.log(qs) - np.log(ps))))
        chi2 = float(np.sum(qs**2 / ps) - 1.0)
    if eps > 0:
        nu = (ps - (1.0 - eps) * qs) / eps
        with np.errstate(divide="ignore", invalid="ignore"):
            identity = eps * (1.0 - nu_mass) + eps**2 * float(np.sum((qs - nu) ** 2 / ps))
    else:
        identity = 0.0
    bound = eps * (1.0 - nu_mass) + (eps**2 * (1.0 + 1.0 / qs.min()) / (1.0 - eps) if eps < 1 else math.inf)
    return kl, chi2, identity, bound
