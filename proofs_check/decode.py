"""Row S9.decode: ``dfm.decentral.mixture_decode`` continues a prompt with the exact mixture (THEORY S5, S8, S9).

Experts are exact cached causal models: NNX modules whose ``decode_step(tokens, position, cache)`` writes the
token into a cache of the history and returns ``log q_k(next | history)`` looked up in a table (the
``decode_step`` contract of ``dfm.models.Decoder``). A prompt ``x^{<P}`` with ``q(x^{<P}) > 0`` is "prefilled"
(the cache holds it, the start log-probs are ``log q_k(x^P | x^{<P})``) and the router is the Bayes filter
started at the posterior given the prompt, ``w_k q_k(x^{<P})`` normalized (as ``DecentralizedModel.generate``
does). By S9 the decoded continuation then has the law ``q(x^{P..} | x^{<P})`` of the mixture
``q = sum_k w_k q_k``, provided the filter is updated with every generated token. Checked:

* greedy (temperature 0): the decoded tokens equal the argmax path of the exact mixture's next-token
  conditionals (compared up to the first near tie of the exact path, top-2 gap < ``TIE``: the decoder
  mixes in float32);
* sampled (temperature 1): the empirical law of ``N`` continuations against ``q(. | prompt)`` by the chi-square
  test of :mod:`proofs_check.sampled` (FAIL below ``P_MIN``).

Fixed sizes (vocab 3, 3 experts, total length 3, prompt length 0 or 1), so the decoder compiles four times.
"""
from __future__ import annotations

import functools

import numpy as np

from dfm import tabular as tb
from proofs_check.cases import random_dist
from proofs_check.report import Tracker
from proofs_check.sampled import P_MIN, chi_square_pvalue

V, LENGTH, K = 3, 3, 3
N = 4096
TIE = 1e-4
MAX_CASES = 120


def history_tables(dist) -> np.ndarray:
    """``[(V + 1)^LENGTH, V]``: ``log q(next | history)`` at every history (positions not yet written hold the
    blank ``V``; the row of a history of length j predicts position j); uniform where the history has
    probability 0 or is complete."""
    conds = tb.next_token_conditionals(dist, V, LENGTH)
    hist = tb.enumerate_states(V, LENGTH)                       # digits 0..V, V = blank
    out = np.full((hist.shape[0], V), 1.0 / V)
    for idx, h in enumerate(hist):
        j = int(np.argmax(h == V)) if (h == V).any() else LENGTH
        if j == LENGTH or (h[j:] != V).any():
            continue
        pidx = int(h[:j] @ (V ** np.arange(j - 1, -1, -1))) if j else 0
        row = conds[j][pidx]
        if row.sum() > 0:
            out[idx] = row
    with np.errstate(divide="ignore"):
        return np.log(out)


@functools.lru_cache(maxsize=None)
def _expert_class():
    import jax.numpy as jnp
    from flax import nnx

    radix = (V + 1) ** np.arange(LENGTH - 1, -1, -1)

    class TableExpert(nnx.Module):
        """An exact causal expert: ``decode_step`` writes the token at ``position`` into the history cache
        ``[batch, LENGTH]`` (blank = V) and returns the table's next-token log-probs for that history."""

        def __init__(self, log_table):
            self.table = nnx.Variable(jnp.asarray(log_table, jnp.float32))

        def decode_step(self, tokens, position, cache):
            cache = cache.at[:, position].set(tokens.astype(cache.dtype))
            idx = jnp.sum(cache * jnp.asarray(radix, cache.dtype), axis=1)
            return self.table[...][idx], cache

    return TableExpert


def decode(tables, prompt, router_weights, temperature: float, seed: int) -> np.ndarray:
    """``mixture_decode`` of the ``TableExpert``s after the prompt, ``[N, LENGTH - P]``."""
    import jax
    import jax.numpy as jnp

    from dfm.decentral import BayesFilterRouter, mixture_decode

    cls = _expert_class()
    models = [cls(t) for t in tables]
    p = len(prompt)
    cache = np.full((N, LENGTH), V, np.int32)
    cache[:, :p] = prompt
    radix = (V + 1) ** np.arange(LENGTH - 1, -1, -1)
    first_idx = int(cache[0] @ radix)
    starts = [(jnp.asarray(cache), jnp.broadcast_to(jnp.asarray(t[first_idx], jnp.float32), (N, V))) for t in tables]
    router = BayesFilterRouter.from_priors(router_weights)
    out = mixture_decode(models, starts, p, LENGTH - p, router, temperature=temperature, key=jax.random.key(seed))
    return np.asarray(out)


def greedy_path(w, experts, prompt) -> tuple[list[int], int]:
    """The argmax path of the exact mixture ``sum_k w_k q_k`` after ``prompt`` (router ``w_k q_k(prefix)``
    normalized, ``w`` the priors) and how many of its steps are clear of ties."""
    path, clear = [], 0
    prefix = list(prompt)
    tied = False
    for j in range(len(prompt), LENGTH):
        pidx = int(np.asarray(prefix) @ (V ** np.arange(j - 1, -1, -1))) if j else 0
        pk = np.array([tb.prefix_marginals(e, V, LENGTH)[j][pidx] for e in experts])
        rho = w * pk / np.sum(w * pk) if np.sum(w * pk) > 0 else None
        if rho is None:
            break
        nxt = sum(rho[k] * tb.next_token_conditionals(experts[k], V, LENGTH)[j][pidx] for k in range(len(experts)))
        top = np.sort(nxt)[::-1]
        tied = tied or top[0] - top[1] < TIE
        tok = int(np.argmax(nxt))
        path.append(tok)
        clear += 0 if tied else 1
        prefix.append(tok)
    return path, clear


def check_decode(rng, cases: int, library: bool = False):
    """S9.decode: greedy path and sampled law of ``mixture_decode`` under the Bayes filter (module doc). Without
    ``library`` the row only builds the tables and checks the exact conditional law sums to 1."""
    tr = Tracker()
    lrng = rng.spawn(1)[0]
    used = min(cases, MAX_CASES)
    min_p, compared = 1.0, 0
    for c in range(used):
        w = rng.dirichlet(np.ones(K))
        experts = np.stack([random_dist(rng, V**LENGTH) for _ in range(K)])
        q = w @ experts
        p = c % 2
        prompt = []
        if p:
            first = tb.marginal(q, V, LENGTH, [0])
            prompt = [int(rng.choice(V, p=first / first.sum()))]
        pk = np.array([tb.prefix_marginals(e, V, LENGTH)[p][prompt[0] if p else 0] for e in experts])
        w_post = w * pk / np.sum(w * pk)
        cond = q.reshape((V,) * LENGTH)[tuple(prompt)].reshape(-1)
        cond = cond / cond.sum()                                  # q(continuation | prompt)
        label = f"case {c} (prompt {prompt})"
        tr.diff(cond.sum(), 1.0, f"{label}: conditional law")
        if library:
            seed = int(lrng.integers(2**31))
            try:
                tables = [history_tables(e) for e in experts]
                greedy = decode(tables, prompt, w_post, 0.0, seed)
                path, clear = greedy_path(w, experts, prompt)
                tr.require(bool((greedy == greedy[0]).all()), f"{label}: greedy rows differ")
                tr.require(list(greedy[0, :clear]) == path[:clear],
                           f"{label}: greedy {greedy[0].tolist()} != exact argmax path {path} (first {clear} steps)")
                compared += clear
                sampled = decode(tables, prompt, w_post, 1.0, seed + 1)
                idx = sampled @ (V ** np.arange(sampled.shape[1] - 1, -1, -1))
                pv = chi_square_pvalue(np.bincount(idx, minlength=cond.size), cond)
                min_p = min(min_p, pv)
                tr.require(pv >= P_MIN, f"{label}: sampled continuations: chi-square p-value {pv:.2e} < {P_MIN:.0e}")
            except Exception as exc:  # noqa: BLE001 - reported as a failure of the row
                tr.fail(f"{label}: library raised {type(exc).__name__}: {exc}")
        tr.cases += 1
    extra = []
    if cases > used:
        extra.append(f"{used} of the {cases} cases requested (the row's cap: {MAX_CASES})")
    if library:
        extra.append(f"library: dfm.decentral.mixture_decode with exact table experts (NNX, decode_step) and "
                     f"BayesFilterRouter.from_priors(w_k q_k(prompt)): greedy == the exact mixture's argmax path "
                     f"({compared} tokens compared), sampled continuations ({N} per case) ~ q(. | prompt): smallest "
                     f"chi-square p-value {min_p:.2e} (FAIL below {P_MIN:.0e})")
        method = "sampling + enumeration + library"
    else:
        extra.append("no library: only the exact conditional laws are built (the row needs the library)")
        method = "enumeration"
    return tr.row("S9.decode", "mixture_decode continues with q(. | prompt) (S5, S8, S9)", method, extra,
                  {"min_p_value": min_p, "greedy_tokens_compared": compared})
