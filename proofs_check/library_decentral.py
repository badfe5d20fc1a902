"""Library cross-checks of the decentralization code (THEORY S8-S13) against the enumeration, float64.

* S8: ``dfm.decentral.mix_log_probs`` of the experts' exact denoisers with the exact router,
* S9: ``BayesFilterRouter`` (online ``init`` / ``update`` / ``weights`` and batch ``posterior``) and the
  teacher-forced scorer ``mixture_token_log_probs``,
* S10: ``router_objective`` on all enumerated ``(x_t, k)`` pairs weighted by ``P(X_t = x, K = k)``,
* S11: ``dfm.losses.ar_nll`` of the exact experts and ``mixture_token_log_probs`` with the Bayes filter,
* S12: ``CentroidRouter(Partition, T, top_k=1).route`` against the enumerated posterior ``rho_t(k | c, x)``,
  ``dfm.decentral.partition.assign`` against numpy's nearest centroid, and
  ``mixture_token_log_probs(FixedRouter(...))`` against the exact conditional likelihood,
* S13: ``top_k``, ``centroid_weights`` against independent numpy references, and the TV bound with
  ``mix_log_probs`` of the library's truncated weights; ``fit_temperature_search`` (the centroid router's
  temperature: a maximum of the held-out mixture likelihood, its limits named at a bound).
Shapes are padded so that each function compiles a handful of times per run: experts to ``K_PAD`` (zero
weight / log prior ``-inf``), vocabularies and lengths to 4 (probability-0 tokens, positions that add
nothing), batches to power-of-two buckets.
"""
from __future__ import annotations

import numpy as np

from dfm import tabular as tb
from proofs_check.library import jit_once, pad_rows, float64_mode, bucket, maxdiff, worst

INF = float("inf")
K_PAD = 4  # S8-S12 draw K in 2..4 experts
V_PAD = 4  # vocab 2..4
L_PAD = 4  # length 2..4


def _log(p) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def _f64(*arrays) -> bool:
    return all(np.asarray(a).dtype == np.float64 for a in arrays)


def _uniform_dead(p) -> np.ndarray:
    """Rows ``[..., vocab]`` summing to 0 replaced by the uniform distribution (unreachable: weight 0)."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(p.sum(-1, keepdims=True) > 0, p, 1.0 / p.shape[-1])


# ------------------------------------------------------------------------------------------------------------
# S8: mix_log_probs
# ------------------------------------------------------------------------------------------------------------
def s8_mix_error(coord_k, rho, coord, alive) -> float:
    """``mix_log_probs(log p^k_{1|t}, rho_t)`` on every reachable state and coordinate vs the mixture's exact
    denoiser ``p_{1|t}`` (probabilities compared). coord_k ``[K, M, L, V]``, rho ``[M, K]``, coord ``[M, L, V]``."""
    from dfm.decentral import mix_log_probs

    k, _, length, vocab = coord_k.shape
    idx = np.flatnonzero(alive)
    rows = idx.size * length
    if rows == 0:
        return 0.0
    size = bucket(rows, (vocab + 1) ** L_PAD * L_PAD)  # one shape per vocab
    logits = np.zeros((K_PAD, size, vocab))
    logits[:k, :rows] = _log(_uniform_dead(coord_k[:, idx]).reshape(k, rows, vocab))
    weights = np.zeros((size, K_PAD))
    weights[:, 0] = 1.0
    weights[:rows, :] = 0.0
    weights[:rows, :k] = np.repeat(rho[idx], length, axis=0)
    with float64_mode():
        out = np.asarray(jit_once(mix_log_probs)(logits, weights))
    if not _f64(out):
        return INF
    return maxdiff(np.exp(out[:rows]), coord[idx].reshape(rows, vocab))


# ------------------------------------------------------------------------------------------------------------
# S9, S11: Bayes filter and teacher-forced mixture scoring
# ------------------------------------------------------------------------------------------------------------
def token_log_probs(experts, vocab: int, length: int):
    """``(lp [K, D, L], causal [K, D, L, V])``: each expert's ``log q_k(x1^j | x1^{<j})`` at every sequence x1 and
    position j, and its full next-token table there (rows of prefixes of probability 0: uniform)."""
    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    d = x1s.shape[0]
    causal = np.empty((len(experts), d, length, vocab))
    for k, e in enumerate(experts):
        nt = tb.next_token_conditionals(e, vocab, length)
        for j in range(length):
            pidx = x1s[:, :j] @ (vocab ** np.arange(j - 1, -1, -1)) if j else np.zeros(d, dtype=np.int64)
            causal[k, :, j] = _uniform_dead(nt[j][pidx])
    lp = _log(np.take_along_axis(causal, x1s[None, :, :, None], axis=-1)[..., 0])
    return lp, causal


def pad_experts(lp, size: int):
    """Token log-probs ``[K, D, L]`` padded to ``[K_PAD, size, L_PAD]`` (padding: 0, i.e. no evidence)."""
    k, d, length = lp.shape
    out = np.zeros((K_PAD, size, L_PAD))
    out[:k, :d, :length] = lp
    return out


def _bayes_router(w):
    """``BayesFilterRouter.from_priors(w)`` with K_PAD experts (padding: prior 0, log prior -inf), built under
    x64 (``from_priors`` makes a jax array: float32 outside ``jax.enable_x64``)."""
    from dfm.decentral import BayesFilterRouter

    with float64_mode():
        return BayesFilterRouter.from_priors(pad_rows(np.asarray(w, dtype=np.float64), K_PAD, 0.0))


def _scores(router, lp, valid):
    from dfm.decentral import mixture_token_log_probs

    out = mixture_token_log_probs(router, lp, valid=valid)
    return out.log_probs, out.weights


def _filter_forms(router, lp):
    """Online (``init``, then ``weights`` / ``update`` per token) and batch (``posterior`` of the prefix
    log-likelihoods) router weights before every position, ``[L, B, K]`` each."""
    import jax.numpy as jnp

    state = router.init(lp.shape[1])
    online, batch = [], []
    prefix = jnp.zeros(lp.shape[1:2] + lp.shape[:1], lp.dtype)
    for j in range(lp.shape[2]):
        online.append(router.weights(state))
        batch.append(router.posterior(prefix))
        state = router.update(state, lp[:, :, j])
        prefix = prefix + lp[:, :, j].T
    return jnp.stack(online), jnp.stack(batch)


def mixture_scores(router, lp_pad, valid):
    """Jitted ``mixture_token_log_probs`` (one compile per router type and padded shape)."""
    with float64_mode():
        log_probs, weights = jit_once(_scores)(router, lp_pad, valid)
        return np.asarray(log_probs), np.asarray(weights)


def s9_filter_error(w, lp, prefix_post, prefix_alive, next_lp, log_q) -> float:
    """S9 with the library on every sequence x1 and position j (prefix ``x1^{<j}`` of positive probability):
    ``BayesFilterRouter`` online and batch weights == ``w_k q_k(prefix) / sum``; ``mixture_token_log_probs``
    with ``from_priors(w)``: weights == the same posterior, log-probs == ``log q(x1^j | x1^{<j})``.

    lp ``[K, D, L]`` experts' token log-probs; prefix_post ``[D, L, K]``, prefix_alive ``[D, L]``, next_lp
    ``[D, L]`` from the enumeration; the log-probs summed over positions == ``log_q [D]`` = log q(x1) where
    q(x1) > 0."""
    k, d, length = lp.shape
    size = bucket(d)
    lp_pad = pad_experts(lp, size)
    valid = np.zeros((size, L_PAD), dtype=bool)
    valid[:d, :length] = True
    router = _bayes_router(w)
    log_probs, weights = mixture_scores(router, lp_pad, valid)
    with float64_mode():
        online, batch = (np.asarray(a) for a in jit_once(_filter_forms)(router, lp_pad))
    if not _f64(log_probs, weights, online, batch):
        return INF
    alive = prefix_alive
    on = np.swapaxes(online, 0, 1)[:d, :length][alive]
    ba = np.swapaxes(batch, 0, 1)[:d, :length][alive]
    return worst(maxdiff(on[:, :k], prefix_post[alive]), maxdiff(ba[:, :k], prefix_post[alive]),
                 maxdiff(weights[:d, :length][alive][:, :k], prefix_post[alive]),
                 maxdiff(on[:, k:]), maxdiff(ba[:, k:]),  # padded experts (prior 0): weight 0
                 maxdiff(log_probs[:d, :length][alive], next_lp[alive]),
                 maxdiff(log_probs[:d, :length].sum(1)[log_q > -np.inf], log_q[log_q > -np.inf]))


def _ar_nll(causal, x1):
    from dfm.losses import ar_nll

    return ar_nll(causal, x1)


def s11_errors(w, experts, q, vocab: int, length: int, h_q: float, h_k, mi: float) -> float:
    """S11 with the library: ``ar_nll`` of every exact expert averaged under its own q_k == H(q_k);
    ``mixture_token_log_probs`` with the Bayes filter over the exact experts' token log-probs, summed over
    positions and averaged under q, == H(q); their difference == I(X; K) of the enumeration."""
    lp, causal = token_log_probs(experts, vocab, length)
    k, d = lp.shape[:2]
    x1s = tb.enumerate_states(vocab, length, with_mask=False)
    size = bucket(d)
    # ar_nll on [K_PAD * size, L_PAD, V_PAD]: padded tokens have probability 0, padded positions log-prob 0
    logits = np.full((K_PAD, size, L_PAD, V_PAD), -np.inf)
    logits[..., 0] = 0.0
    logits[:k, :d, :length, :vocab] = _log(causal)
    tokens = np.zeros((K_PAD, size, L_PAD), dtype=np.int64)
    tokens[:, :d, :length] = x1s[None]
    with float64_mode():
        nll = np.asarray(jit_once(_ar_nll)(logits.reshape(-1, L_PAD, V_PAD), tokens.reshape(-1, L_PAD)))
    valid = np.zeros((size, L_PAD), dtype=bool)
    valid[:d, :length] = True
    log_probs, _ = mixture_scores(_bayes_router(w), pad_experts(lp, size), valid)
    if not _f64(nll, log_probs):
        return INF
    nll = nll.reshape(K_PAD, size)[:k, :d]
    losses = np.array([np.sum(e[e > 0] * nll[j][e > 0]) for j, e in enumerate(experts)])
    ens = -np.sum(log_probs[:d, :length], axis=1)
    ens_loss = float(np.sum(q[q > 0] * ens[q > 0]))
    return worst(maxdiff(losses, h_k), abs(ens_loss - h_q), abs(ens_loss - float(w @ losses) - mi))


# ------------------------------------------------------------------------------------------------------------
# S10: the router objective
# ------------------------------------------------------------------------------------------------------------
def _objectives(logits, labels, weights):
    import jax

    from dfm.decentral import router_objective

    return jax.vmap(router_objective, in_axes=(0, None, None))(logits, labels, weights)


def s10_errors(joint, routers, h_cond: float, losses, kls) -> float:
    """``router_objective(log r, k, P(X_t = x, K = k))`` on every enumerated pair with positive probability, for
    each router ``r [M, K]`` in ``routers`` (the exact rho first): == H(K | X_t) for rho, == the enumeration's
    ``losses`` for every router, and ``loss(r) - loss(rho)`` == ``kls`` (E_x KL(rho || r)) for the others."""
    x, k = np.nonzero(joint > 0)
    n = x.size
    size = bucket(n, (V_PAD + 1) ** L_PAD * K_PAD)  # one shape
    kk = joint.shape[1]
    logits = np.zeros((len(routers), size, K_PAD))  # padded rows: weight 0
    logits[:, :n, :] = -np.inf                       # padded experts: probability 0
    for j, r in enumerate(routers):
        logits[j, :n, :kk] = _log(r[x])
    labels = pad_rows(k, size, 0)
    weights = pad_rows(joint[x, k], size, 0.0)
    with float64_mode():
        out = np.asarray(jit_once(_objectives)(logits, labels, weights))
    if not _f64(out):
        return INF
    return worst(abs(out[0] - h_cond), maxdiff(out, losses), maxdiff(out[1:] - out[0], kls))


# ------------------------------------------------------------------------------------------------------------
# S12: centroid router and the exact posterior given the conditioning input
# ------------------------------------------------------------------------------------------------------------
S12_ROWS = 8  # S12 draws at most 5 conditioning inputs


def s12_errors(features, centroids, temperature: float, rho, alive, cond_lp, cond_next, cond_alive) -> float:
    """``CentroidRouter(Partition(centroids), T, top_k=1).route(features)`` == the enumerated posterior
    ``rho_t(k | c, x)`` (``rho [K, C, M]`` on ``alive [C, M]``, for each t the caller passes); and
    ``mixture_token_log_probs(FixedRouter(route weights))`` over the experts' conditional token log-probs
    ``cond_lp [K, C, D, L]`` == the exact conditional ``log q(x1^j | x1^{<j}, c)`` (``cond_next [C, D, L]``,
    compared where the prefix has positive probability, ``cond_alive``)."""
    from dfm.decentral import CentroidRouter, FixedRouter, Partition
    from dfm.decentral.partition import assign

    k, c, d, length = cond_lp.shape
    part = Partition(centroids, mean=None, config={}, sizes=np.ones(k, dtype=np.int64))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    h_ref = np.argmax(unit @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T, axis=1)
    if not np.array_equal(assign(part, features), h_ref):    # the partition function h: nearest centroid
        return INF
    rows_f = np.ones((S12_ROWS, features.shape[1]))  # padded to one batch size (the route is per row)
    rows_f[:c] = features
    with float64_mode():
        route = np.asarray(CentroidRouter(part, temperature=temperature, top_k=1).route(rows_f))[:c]
    if not _f64(route):
        return INF
    err = worst(*(maxdiff(np.where(a[None], r - route.T[:, :, None], 0.0)) for r, a in zip(rho, alive)))
    rows = c * d
    size = bucket(rows, 2048)
    table = np.zeros((size, K_PAD))
    table[:, 0] = 1.0
    table[:rows] = 0.0
    table[:rows, :k] = np.repeat(route, d, axis=0)
    lp = np.zeros((K_PAD, size, L_PAD))
    lp[:k, :rows, :length] = cond_lp.reshape(k, rows, length)
    valid = np.zeros((size, L_PAD), dtype=bool)
    valid[:rows, :length] = True
    log_probs, _ = mixture_scores(FixedRouter(table), lp, valid)
    if not _f64(log_probs):
        return INF
    return worst(err, maxdiff(log_probs[:rows, :length].reshape(c, d, length)[cond_alive], cond_next[cond_alive]))


# ------------------------------------------------------------------------------------------------------------
# S13: top-k, centroid weights, the TV bound
# ------------------------------------------------------------------------------------------------------------
S13_K = 6      # S13 draws K in 2..6
S13_SIZE = 24  # and distributions over at most 24 values


def _s13(rho, cosines, temperature, comp_logits, k):
    """``top_k`` and ``centroid_weights`` for every k = 1..S13_K (static, one compile), row ``k - 1`` selected;
    ``mix_log_probs`` of the components with rho and with the truncated weights."""
    import jax.numpy as jnp

    from dfm.decentral import centroid_weights, mix_log_probs, top_k

    trunc = jnp.stack([top_k(rho, j) for j in range(1, S13_K + 1)])[k - 1]
    cw = jnp.stack([centroid_weights(cosines, temperature, j) for j in range(1, S13_K + 1)])[k - 1]
    cw_all = centroid_weights(cosines, temperature)
    weights = jnp.concatenate([rho, trunc, rho, trunc], axis=0)  # rows: comps, comps, disjoint, disjoint
    return trunc, cw, cw_all, mix_log_probs(comp_logits, weights)


def softmax_top_k(cosines, temperature: float, k: int | None) -> np.ndarray:
    """Independent reference of the centroid weights: numpy softmax of ``cos / T``, then the k largest kept and
    renormalized (ties: lower index)."""
    z = cosines / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    w = e / e.sum(-1, keepdims=True)
    if k is None:
        return w
    order = np.argsort(-w, axis=-1, kind="stable")[..., :k]
    keep = np.zeros(w.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    kept = np.where(keep, w, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def s13_errors(rho, k: int, comps, disjoint, cosines, temperature: float, trunc_ref):
    """``(error, tv_minus_bound)``: ``top_k(rho, k)`` == ``trunc_ref`` (the engine's ``top_k_renormalize``);
    ``centroid_weights(cos, T, k)`` and ``(cos, T)`` == :func:`softmax_top_k`; ``mix_log_probs`` with rho and with
    the library's truncated weights == ``rho @ comps``, ``trunc @ comps`` (and for the disjoint experts); and
    the bound ``TV(mixture, library top-k mixture) <= 1 - rho(S)`` (S the library's kept set), reported as
    ``TV - (1 - rho(S))``."""
    n_k = rho.shape[0]
    logits = np.full((S13_K, 4, S13_SIZE), -np.inf)
    logits[:, :, 0] = 0.0
    for j, comp in enumerate((comps, comps, disjoint, disjoint)):
        logits[:n_k, j, :] = -np.inf
        logits[:n_k, j, :comp.shape[1]] = _log(comp)
    rho_pad = pad_rows(rho[None].T, S13_K, 0.0).T
    cos_pad = np.full((1, S13_K), -np.inf)
    cos_pad[0, :n_k] = cosines
    with float64_mode():
        out = jit_once(_s13)(rho_pad, cos_pad, np.float64(temperature), logits, np.int32(k))
        trunc, cw, cw_all, mixed = (np.asarray(a) for a in out)
    if not _f64(trunc, cw, cw_all, mixed):
        return INF, INF
    lib_trunc = trunc[0, :n_k]
    errs = [maxdiff(lib_trunc, trunc_ref), maxdiff(trunc[0, n_k:]), maxdiff(cw[0, n_k:]),
            maxdiff(cw[0, :n_k], softmax_top_k(cosines, temperature, k)),
            maxdiff(cw_all[0, :n_k], softmax_top_k(cosines, temperature, None))]
    probs = np.exp(mixed)
    tvb = -INF
    for j, comp in ((0, comps), (2, disjoint)):
        size = comp.shape[1]
        full, cut = rho @ comp, lib_trunc @ comp
        errs += [maxdiff(probs[j, :size], full), maxdiff(probs[j + 1, :size], cut), maxdiff(probs[j:j + 2, size:])]
        bound = 1.0 - rho[lib_trunc > 0].sum()
        tv = tb.tv_distance(full, probs[j + 1, :size])
        tvb = INF if np.isnan(tv) else max(tvb, tv - bound)
    return worst(*errs), tvb


def s13_temperature_error(seed: int) -> tuple[float, list[str]]:
    """``fit_temperature_search`` on two synthetic held-out sets (400 rows, K = 4, cosines on a 0.1 grid plus
    offsets 0, 0.01, 0.02, 0.03, so every gap is >= 0.01): labels drawn from ``softmax(cos / 0.1)`` with one-hot expert
    likelihoods (an interior maximum: L(T_fit) >= L on a 121-point log grid over [1e-3, 1e1], not at a bound),
    and likelihoods that favour the nearest centroid only (at the lower bound, the limit ``T -> 0`` named, L equal
    to the limit's). ``(error, lines)``: 0 when all hold, else ``inf``."""
    from dfm.decentral.temperature import LIMIT_ZERO, fit_temperature_search, mixture_log_likelihood

    rng = np.random.default_rng(seed)
    cos = np.round(rng.uniform(-1, 1, size=(400, 4)), 1) + 0.01 * np.arange(4)
    z = cos / 0.1
    rho = np.exp(z - z.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    labels = (rho.cumsum(1) > rng.random((400, 1))).argmax(1)
    ll = np.where(np.eye(4, dtype=bool)[labels], 0.0, -np.inf)
    fit = fit_temperature_search(cos, ll)
    grid = np.exp(np.linspace(np.log(1e-3), np.log(10.0), 121))
    best_grid = max(mixture_log_likelihood(cos, ll, t) for t in grid)
    ok = fit.at_bound is None and fit.log_likelihood >= best_grid - 1e-9 * abs(best_grid)
    ll_top1 = np.where(np.eye(4, dtype=bool)[cos.argmax(1)], np.log(0.9), np.log(1e-6))
    fit1 = fit_temperature_search(cos, ll_top1, top_k=2)
    ok &= fit1.at_bound == "lower" and fit1.limit == LIMIT_ZERO
    ok &= abs(fit1.log_likelihood - fit1.limit_log_likelihoods["zero"]) <= 1e-9 * abs(fit1.log_likelihood)
    lines = [f"interior case: {fit.describe()} (labels drawn at T = 0.1)", f"top-1 case: {fit1.describe()}"]
    return (0.0 if ok else INF), lines
