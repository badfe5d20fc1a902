"""Scoring held-out sequences with the text job's models: per-token log-probabilities (AR) and the
DFM loss (masked). Mixtures of experts are the library's (`dfm.decentral`), never computed here.

AR (THEORY S5): every model gives ``log p(x^j | x^{<j})`` of the observed token at each position
of each sequence (`ar_log_probs`: `dfm.inference.token_log_probs` of ``[BOS] + x1``, the library's
one teacher-forced scoring, shared with `dfm.DecentralizedModel`); ensembles are scored from these with
`dfm.decentral.mixture_token_log_probs` (fixed weights, S8; the Bayes filter, S9).

Masked (THEORY S4, S5(e)): the DFM loss ``T * sum_i rate_t^i 1[x_t^i = m] (-log p_{1|t}(x_1^i | x_t))``
with ``t ~ U{0..T-1}``, ``x_t ~ p_t(. | x_1)`` is an unbiased estimate of the ELBO, an upper bound
on ``-log`` of the probability that the factorized sampler produces ``x_1``. Every system is
scored on the same draws (t, x_t) from fixed keys; ensembles mix the experts' denoisers in
probability space (`dfm.decentral.mix_log_probs`, THEORY S8) with the weights of a router.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.decentral import mix_log_probs
from dfm.inference import token_log_probs
from dfm.losses import dfm_cross_entropy
from dfm.paths import sample_masked_path


@nnx.jit
def forward(model, x):
    """Jitted ``model(x)`` (logits)."""
    return model(x)


def _padded_batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def pad_rows(a: np.ndarray, batch_size: int) -> np.ndarray:
    """`a` with its last row repeated up to `batch_size` rows (one compiled shape per batch size)."""
    if len(a) == batch_size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), axis=0)])


def masked_draws(x1: np.ndarray, schedule, mask_id: int, num_draws: int, seed: int, batch_size: int):
    """Fixed noise draws for the masked ELBO: yields ``(start, stop, r, x1_b, x_t, t)`` per batch/draw.

    ``t [b]`` and ``x_t [b, L]`` come from ``fold_in(fold_in(PRNGKey(seed), start), r)``: the same
    for every system scored.
    """
    base = jax.random.PRNGKey(seed)
    for start, stop in _padded_batches(len(x1), batch_size):
        xb = jnp.asarray(pad_rows(x1[start:stop], batch_size))
        for r in range(num_draws):
            key = jax.random.fold_in(jax.random.fold_in(base, start), r)
            kt, kx = jax.random.split(key)
            t = jax.random.randint(kt, (batch_size,), 0, schedule.num_steps)
            x_t = sample_masked_path(kx, xb, schedule.kappa[t], mask_id)
            yield start, stop, r, xb, x_t, t


def _elbo_terms(schedule, mask_id):
    @jax.jit
    def single(logits, x1, x_t, t):
        return schedule.num_steps * dfm_cross_entropy(logits, x1, x_t, schedule.rates()[t], mask_id=mask_id)

    @jax.jit
    def mixed(expert_logits, weights, x1, x_t, t):
        return single(mix_log_probs(expert_logits, weights), x1, x_t, t)

    return single, mixed


def masked_elbo(models: dict, x1: np.ndarray, schedule, mask_id: int, *, num_draws: int, seed: int,
                batch_size: int, ensembles: dict, progress=None) -> tuple[dict, dict, dict]:
    """DFM loss (ELBO estimate) per sequence for single models and ensembles, on shared draws.

    Args:
      models: name -> denoiser (`Decoder`, bidirectional).
      x1: ``[n, L]`` sequences.
      ensembles: name -> ``(expert names [K], router_for)`` where ``router_for(start, stop, b)`` is
        the `dfm.decentral.Router` of sequences ``start..stop-1`` padded to a batch of ``b`` (e.g.
        ``FixedRouter`` of their fixed weights, or a learned router); its weights are
        ``router.weights(router.init(b), x_t, t)``.
      progress: optional callable(advance) for a progress bar.

    Returns:
      ``(elbo, seconds, mean_weights)``: elbo: name -> ``[n]`` nats per sequence (mean over
      draws); seconds: name -> wall time (ensembles: mixing only; add the experts' forward
      time); mean_weights: ensemble name -> ``[n, K]`` weights averaged over draws.
    """
    single, mixed = _elbo_terms(schedule, mask_id)
    n = len(x1)
    elbo = {name: np.zeros(n) for name in list(models) + list(ensembles)}
    seconds = {name: 0.0 for name in elbo}
    mean_w = {name: np.zeros((n, len(spec[0]))) for name, spec in ensembles.items()}
    for start, stop, r, xb, x_t, t in masked_draws(x1, schedule, mask_id, num_draws, seed, batch_size):
        b = stop - start
        logits = {}
        for name, model in models.items():
            t0 = time.perf_counter()
            logits[name] = forward(model, x_t)
            elbo[name][start:stop] += np.asarray(single(logits[name], xb, x_t, t))[:b] / num_draws
            seconds[name] += time.perf_counter() - t0
        for name, (experts, router_for) in ensembles.items():
            t0 = time.perf_counter()
            router = router_for(start, stop, len(xb))
            w = router.weights(router.init(len(xb)), x_t, t)
            stacked = jnp.stack([logits[e] for e in experts])
            elbo[name][start:stop] += np.asarray(mixed(stacked, w, xb, x_t, t))[:b] / num_draws
            mean_w[name][start:stop] += np.asarray(w, np.float64)[:b] / num_draws
            seconds[name] += time.perf_counter() - t0
        if progress is not None:
            progress(1)
    return elbo, seconds, mean_w


def ar_log_probs(models: dict, x1: np.ndarray, bos_id: int, batch_size: int, progress=None) -> tuple[dict, dict]:
    """``{name: [n, L] float64 log p(x^j | x^{<j})}`` (``x^{-1}`` = BOS) and ``{name: seconds}`` for
    causal models, `batch_size` sequences per forward pass (`dfm.inference.token_log_probs`)."""
    tokens = np.concatenate([np.full((len(x1), 1), bos_id, x1.dtype), x1], axis=1)
    out, seconds = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        out[name] = (token_log_probs(model, tokens, batch_size=batch_size) if len(x1)
                     else np.zeros((0, x1.shape[1])))
        seconds[name] = time.perf_counter() - t0
        if progress is not None:
            progress(1)
    return out, seconds
