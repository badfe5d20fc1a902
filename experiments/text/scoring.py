"""Scoring held-out sequences: per-token log-probabilities (AR) and the DFM loss (masked).

AR (THEORY S5): every model gives ``log p(x^j | x^{<j})`` of the observed token at each position
of each sequence. A mixture with fixed weights ``w [K]`` gives ``log sum_k w_k p_k(x^j | x^{<j})``;
only the observed token's probability is needed, so this is exactly
`dfm.decentral.mix_log_probs` evaluated at that token. The Bayes filter (THEORY S9) uses, at each
token, ``rho(k) ∝ w_k prod_{earlier tokens of the document} p_k`` (`BayesFilterRouter.posterior`)
over the document's tokens in order: its context chunk first, then the scored chunks. Each chunk
is an independent model input (no state crosses chunk boundaries), so this is the exact
posterior of the model "pick k, then draw the document's chunks from expert k".

Masked (THEORY S4, S5(e)): the DFM loss ``T * sum_i rate_t^i 1[x_t^i = m] (-log p_{1|t}(x_1^i | x_t))``
with ``t ~ U{0..T-1}``, ``x_t ~ p_t(. | x_1)`` is an unbiased estimate of the ELBO, an upper bound
on ``-log`` of the probability that the factorized sampler produces ``x_1``. Every system is
scored on the same draws (t, x_t) from fixed keys; ensembles mix the experts' denoisers in
probability space (`mix_log_probs`, THEORY S8) with per-sequence weights.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import logsumexp


def mix_token_log_probs(lp: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``log sum_k w_k exp(lp_k)`` per token.

    Args:
      lp: ``[K, n, L]`` the experts' log-probabilities of the observed tokens.
      weights: ``[n, K]`` router weights per sequence (rows sum to 1; zeros allowed).

    Returns:
      ``[n, L]`` float64.
    """
    with np.errstate(divide="ignore"):
        logw = np.log(np.asarray(weights, np.float64)).T[:, :, None]  # [K, n, 1]
    return logsumexp(logw + lp, axis=0)


def bayes_filter_doc(lp_doc: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Online Bayes-filter mixture over one document's tokens (THEORY S9).

    The weights are `dfm.decentral.BayesFilterRouter.posterior` of the exclusive prefix sums
    (shifted per token by their maximum over experts, which leaves the posterior unchanged and
    keeps float32 precise); the mixture is then computed in float64.

    Args:
      lp_doc: ``[K, T]`` each expert's log-probability of the document's tokens, in order.
      priors: ``[K]`` cluster shares w_k.

    Returns:
      ``(mix [T], rho [T, K])``: the mixture log-probability of each token and the router weights
      used for it (the posterior given the tokens before it).
    """
    from dfm.decentral import BayesFilterRouter

    router = BayesFilterRouter.from_priors(priors)
    prefix = (np.cumsum(lp_doc, axis=1) - lp_doc).T  # exclusive prefix sums [T, K]
    prefix = prefix - prefix.max(axis=1, keepdims=True)
    rho = np.asarray(router.posterior(jnp.asarray(prefix, jnp.float32)), np.float64)
    rho = rho / rho.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        logrho = np.log(rho)
    return logsumexp(logrho + lp_doc.T, axis=1), rho


@nnx.jit
def forward(model, x):
    """Jitted ``model(x)`` (logits)."""
    return model(x)


def _padded_batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad(a: np.ndarray, batch_size: int) -> np.ndarray:
    if len(a) == batch_size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), axis=0)])


def masked_draws(x1: np.ndarray, schedule, mask_id: int, num_draws: int, seed: int, batch_size: int):
    """Fixed noise draws for the masked ELBO: yields ``(start, stop, r, x1_b, x_t, t)`` per batch/draw.

    ``t [b]`` and ``x_t [b, L]`` come from ``fold_in(fold_in(PRNGKey(seed), start), r)``: the same
    for every system scored.
    """
    from dfm.paths import sample_masked_path

    base = jax.random.PRNGKey(seed)
    for start, stop in _padded_batches(len(x1), batch_size):
        xb = jnp.asarray(_pad(x1[start:stop], batch_size))
        for r in range(num_draws):
            key = jax.random.fold_in(jax.random.fold_in(base, start), r)
            kt, kx = jax.random.split(key)
            t = jax.random.randint(kt, (batch_size,), 0, schedule.num_steps)
            x_t = sample_masked_path(kx, xb, schedule.kappa[t], mask_id)
            yield start, stop, r, xb, x_t, t


def _elbo_terms(schedule, mask_id):
    from dfm.losses import dfm_cross_entropy

    @jax.jit
    def single(logits, x1, x_t, t):
        return schedule.num_steps * dfm_cross_entropy(logits, x1, x_t, schedule.rates()[t], mask_id=mask_id)

    @jax.jit
    def mixed(expert_logits, weights, x1, x_t, t):
        from dfm.decentral import mix_log_probs

        return single(mix_log_probs(expert_logits, weights), x1, x_t, t)

    return single, mixed


def masked_elbo(models: dict, x1: np.ndarray, schedule, mask_id: int, *, num_draws: int, seed: int,
                batch_size: int, ensembles: dict, progress=None) -> tuple[dict, dict, dict]:
    """DFM loss (ELBO estimate) per sequence for single models and ensembles, on shared draws.

    Args:
      models: name -> denoiser (`Decoder`, bidirectional).
      x1: ``[n, L]`` sequences.
      ensembles: name -> ``(expert names [K], weights)`` where weights is an ``[n, K]`` array of
        fixed per-sequence weights or a callable ``(x_t, t) -> [b, K]`` (learned router).
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
        for name, (experts, weights) in ensembles.items():
            t0 = time.perf_counter()
            if callable(weights):
                w = weights(x_t, t)
            else:
                w = jnp.asarray(_pad(weights[start:stop], len(xb)), jnp.float32)
            stacked = jnp.stack([logits[e] for e in experts])
            elbo[name][start:stop] += np.asarray(mixed(stacked, w, xb, x_t, t))[:b] / num_draws
            mean_w[name][start:stop] += np.asarray(w, np.float64)[:b] / num_draws
            seconds[name] += time.perf_counter() - t0
        if progress is not None:
            progress(1)
    return elbo, seconds, mean_w


def ar_log_probs(models: dict, x1: np.ndarray, bos_id: int, batch_size: int, progress=None) -> tuple[dict, dict]:
    """``{name: [n, L] log p(x^j | x^{<j})}`` and ``{name: seconds}`` for causal models."""
    from experiments.modeling import ar_token_log_probs

    out, seconds = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        out[name] = ar_token_log_probs(model, x1, bos_id, batch_size)
        seconds[name] = time.perf_counter() - t0
        if progress is not None:
            progress(1)
    return out, seconds
