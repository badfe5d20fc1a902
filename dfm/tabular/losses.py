"""Exact discrete-time DFM loss, AR negative log-likelihood and sampler likelihood for a model
denoiser table on the masked state space (THEORY S5(d), S5(e), S11).

A model denoiser is a table ``model_post [M, L, vocab]`` (``p_theta(x1^i = v | x)``, any positive
distributions per row), or ``[T, M, L, vocab]`` when it depends on the step t.
"""
from __future__ import annotations

import numpy as np

from dfm.tabular import _validate as V
from dfm.tabular.kernels import factorized_kernel, sample_distribution
from dfm.tabular.paths import joint_path_at, rates_between
from dfm.tabular.states import data_index, enumerate_states, mask_index, point_mass, state_index


def _model_at(model_post, t: int, num_steps: int) -> np.ndarray:
    arr = np.asarray(model_post, dtype=np.float64)
    if arr.ndim == 4:
        if arr.shape[0] != num_steps:
            raise ValueError(f"model_post must have {num_steps} step tables, got shape {arr.shape}")
        return arr[t]
    if arr.ndim != 3:
        raise ValueError(f"model_post must have shape [M, L, vocab] or [T, M, L, vocab], got {arr.shape}")
    return arr


def dfm_loss(model_post, kappa, vocab: int) -> np.ndarray:
    """Weighted denoiser cross-entropy summed over steps, for every data point x1, ``[D]`` (THEORY S5(d)):

    ``L(x1) = sum_t E_{x ~ p_t(.|x1)} sum_i r_t^i 1[x^i = m] (-log p_theta(x1^i | x))`` (nats), masked source.
    Raises ValueError on a bad kappa or model shape; entries of -log 0 give inf.
    """
    kappa = V.check_kappa(kappa)
    num_steps, length = kappa.shape[0] - 1, kappa.shape[1]
    V.check_vocab_length(vocab, length)
    xs = enumerate_states(vocab, length, with_mask=True)
    d = vocab**length
    ones = np.ones((1, d))
    masked = xs == vocab  # [M, L]
    total = np.zeros(d)
    for t in range(num_steps):
        r = rates_between(kappa[t], kappa[t + 1])
        model = _model_at(model_post, t, num_steps)
        if model.shape != (xs.shape[0], length, vocab):
            raise ValueError(f"model_post tables must have shape [{xs.shape[0]}, {length}, {vocab}], got {model.shape}")
        cond = joint_path_at(kappa[t], ones, vocab, True)  # [M, D] = p_t(x | x1)
        live = np.flatnonzero(cond.any(1))
        with np.errstate(divide="ignore"):
            nll = -np.log(model[live])  # [m, L, V]
        # per-step loss at (x, x1): sum_i r_i 1[x^i = m] (-log p_theta(x1^i | x)), built on the [V]^L grid
        weights = r[None, :] * masked[live]  # [m, L]
        step = np.zeros((live.shape[0],) + (vocab,) * length)
        for i in range(length):
            if r[i] == 0.0:
                continue
            term = np.where(weights[:, i, None] > 0, weights[:, i, None] * nll[:, i, :], 0.0)  # [m, V]
            shape = [live.shape[0]] + [1] * length
            shape[1 + i] = vocab
            step = step + term.reshape(shape)
        c = cond[live]
        step = step.reshape(live.shape[0], d)
        with np.errstate(invalid="ignore"):
            total += np.sum(np.where(c > 0, c * step, 0.0), axis=0)
    return total


def sampler_distribution(model_post, kappa, vocab: int) -> np.ndarray:
    """Exact law ``[M]`` of the factorized sampler driven by the model, from the all-mask state (THEORY S5(e))."""
    kappa = V.check_kappa(kappa)
    num_steps, length = kappa.shape[0] - 1, kappa.shape[1]
    m = (vocab + 1) ** length
    kernels = (factorized_kernel(_model_at(model_post, t, num_steps), kappa, t, vocab) for t in range(num_steps))
    return sample_distribution(kernels, point_mass(mask_index(vocab, length), m))


def sampler_nll(model_post, kappa, vocab: int) -> np.ndarray:
    """``-log P(sampler produces x1)`` for every data point, ``[D]`` (inf where the probability is 0)."""
    length = np.asarray(kappa).shape[1]
    p = sampler_distribution(model_post, kappa, vocab)[data_index(vocab, length)]
    with np.errstate(divide="ignore"):
        return -np.log(p)


def ar_nll(model_post, vocab: int, length: int) -> np.ndarray:
    """AR negative log-likelihood ``-sum_t log p_theta(x1^t | x1^{<t})``, ``[D]``, reading the model at the
    AR states ``(x1^{<t}, m, .., m)`` (THEORY S5(d); 0-indexed, ``x1^{<t}`` the first t tokens).
    model_post ``[M, L, vocab]`` or ``[L, M, L, vocab]``."""
    V.check_vocab_length(vocab, length)
    x1s = enumerate_states(vocab, length, with_mask=False)
    total = np.zeros(x1s.shape[0])
    for t in range(length):
        states = np.where(np.arange(length)[None, :] < t, x1s, vocab)
        idx = state_index(states, vocab, with_mask=True)
        model = _model_at(model_post, t, length)
        with np.errstate(divide="ignore"):
            total -= np.log(model[idx, t, x1s[:, t]])
    return total
