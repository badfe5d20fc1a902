"""Information quantities on finite distributions, in nats (``0 log 0 = 0``): entropy, KL, TV,
mutual information, total correlation, prefix marginals and next-token conditionals
(THEORY S6, S9, S11). Distributions over ``[vocab]^L`` are flat ``[D]`` arrays in C order."""
from __future__ import annotations

import numpy as np


def entropy(p, axis: int = -1) -> np.ndarray:
    """Shannon entropy ``-sum p log p`` along ``axis`` (nats)."""
    p = np.asarray(p, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def kl_divergence(p, q) -> float:
    """``KL(p || q) = sum p log(p / q)`` (nats); ``inf`` if ``p > 0`` where ``q = 0``."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if np.any((p > 0) & (q <= 0)):
        return float("inf")
    pos = p > 0
    return float(np.sum(p[pos] * (np.log(p[pos]) - np.log(q[pos]))))


def tv_distance(p, q) -> float:
    """Total variation ``0.5 * sum |p - q|``."""
    return float(0.5 * np.sum(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64))))


def mutual_information(joint) -> float:
    """``I(A; B)`` of a joint table ``[A, B]`` (= KL(joint || product of marginals))."""
    joint = np.asarray(joint, dtype=np.float64)
    prod = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    return kl_divergence(joint.reshape(-1), prod.reshape(-1))


def marginal(q, vocab: int, length: int, coords) -> np.ndarray:
    """Marginal of ``q [D]`` on ``coords`` (sorted as given), flat ``[vocab**len(coords)]``."""
    tensor = np.asarray(q, dtype=np.float64).reshape((vocab,) * length)
    coords = list(coords)
    drop = tuple(i for i in range(length) if i not in coords)
    marg = tensor.sum(axis=drop) if drop else tensor
    kept = sorted(coords)
    marg = np.transpose(marg, [kept.index(c) for c in coords]) if coords else marg
    return np.asarray(marg).reshape(-1)


def joint_entropy(q, vocab: int, length: int, coords) -> float:
    """``H(X^coords)`` under ``q``."""
    return float(entropy(marginal(q, vocab, length, coords)))


def conditional_total_correlation(q, vocab: int, length: int, block, given) -> float:
    """``E_{x^given ~ q}[TC_q(X^block | x^given)] = sum_{i in block} H(X^i | X^given) - H(X^block | X^given)``."""
    given = list(given)
    h_given = joint_entropy(q, vocab, length, given)
    singles = sum(joint_entropy(q, vocab, length, given + [i]) - h_given for i in block)
    return float(singles - (joint_entropy(q, vocab, length, given + list(block)) - h_given))


def block_total_correlation(q, vocab: int, length: int, blocks) -> float:
    """``sum_b E_{prefix ~ q}[TC_q(X^{block_b} | prefix)]`` where prefix = union of earlier blocks (THEORY S6)."""
    total, seen = 0.0, []
    for block in blocks:
        total += conditional_total_correlation(q, vocab, length, list(block), seen)
        seen = seen + list(block)
    return total


def prefix_marginals(q, vocab: int, length: int) -> list[np.ndarray]:
    """``[q(x^{<t}) for t = 0..L]`` (``x^{<t}`` = the first t positions, 0-indexed): element t is ``[vocab**t]``
    (t = 0: ``[1.0]``)."""
    return [marginal(q, vocab, length, range(t)) if t else np.ones(1) for t in range(length + 1)]


def next_token_conditionals(q, vocab: int, length: int) -> list[np.ndarray]:
    """``[q(x^t | x^{<t}) for t = 0..L-1]``: element t is ``[vocab**t, vocab]``; rows of zero-probability
    prefixes are zeros."""
    pm = prefix_marginals(q, vocab, length)
    out = []
    for t in range(length):
        joint = pm[t + 1].reshape(vocab**t, vocab)
        den = pm[t][:, None]
        out.append(np.where(den > 0, joint / np.where(den > 0, den, 1.0), 0.0))
    return out


def chain_rule_mutual_information(weights, experts, vocab: int, length: int) -> np.ndarray:
    """``I(X^t; K | X^{<t})`` for t = 0..L-1, ``[L]``, for ``K ~ weights [K]``, ``X | K=k ~ experts[k] [K, D]``."""
    w = np.asarray(weights, dtype=np.float64)
    qs = np.asarray(experts, dtype=np.float64)
    joint = w[:, None] * qs
    terms = []
    for t in range(length):
        # I(X^t; K | X^{<t}) = H(K, X^{<t}) + H(X^{<t+1}) - H(X^{<t}) - H(K, X^{<t+1})  (x^{<t}: first t positions)
        kt = np.stack([marginal(j, vocab, length, range(t)) if t else j.sum(keepdims=True) for j in joint])
        kt1 = np.stack([marginal(j, vocab, length, range(t + 1)) for j in joint])
        terms.append(entropy(kt.reshape(-1)) + entropy(kt1.sum(0)) - entropy(kt.sum(0)) - entropy(kt1.reshape(-1)))
    return np.array(terms)
