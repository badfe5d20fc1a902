"""Ensemble decoding cost: K = 8 AR experts (the tiny decoder) mixed at every step, relative to one expert.

Each expert is the tiny LLaMA-style decoder of ``common.TINY`` (own random initialization) used as a
cached AR posterior (``dfm.autoregressive.causal_posterior_fn`` over ``Decoder.decode_step``).
Decoding: ``dfm.samplers.sample_discrete`` with the ``autoregressive(127)`` schedule (127 tokens), greedy
(temperature 0), from the all-mask source, one jitted program per case. The ensemble is
``dfm.decentral.ensemble_posterior_fn`` (probability mixing, ``mix_log_probs``) with

- a fixed router (per-sequence weights ``[batch, K]``, e.g. centroid weights, THEORY S12) and
  ``top_k = 1, 2`` or full mixing (all 8),
- the Bayes-filter router (``BayesFilterRouter``, uniform priors, THEORY S9), full mixing,

and, for reference, the ensemble built from only the top-k experts of each sequence (what a
top-k ensemble costs when unselected experts are not run; batch 1, where one sequence selects).
Cost = decode time / decode time of one expert alone. Goal: top-k <= 1.15 x k.

Run: ``.venv/bin/python benchmarks/bench_ensemble.py`` (``--batch`` to change the batch, default 1).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "bench_ensemble"
K = 8
NEW_TOKENS = 127
GOAL = 1.15


def run(args) -> dict:
    import time

    import numpy as np

    common.configure_threads(args.threads)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dfm import autoregressive, paths, samplers, schedules
    from dfm.decentral.ensemble import ensemble_init_state, ensemble_posterior_fn
    from dfm.decentral.routers import BayesFilterRouter, FixedRouter
    from dfm.models import Decoder

    info = common.thread_info(args.threads)
    print("threads:", info, flush=True)
    repeats = 3 if args.quick else args.repeats
    t = common.TINY
    vocab, batch = t["vocab"], args.batch
    bos = vocab - 1
    config = common.tiny_config()
    experts = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(K)]
    graphdef = nnx.graphdef(experts[0])
    states = tuple(nnx.state(m) for m in experts)
    sched = schedules.autoregressive(NEW_TOKENS)
    x0 = paths.mask_source((batch, NEW_TOKENS), vocab)
    rng = np.random.default_rng(0)
    fixed_w = jnp.asarray(rng.dirichlet(np.ones(K), size=batch), jnp.float32)       # [batch, K]
    order = np.argsort(-np.asarray(fixed_w), axis=1)

    def make(expert_ids, router, top_k):
        ids = tuple(int(i) for i in expert_ids)

        # The router is closed over, not a jit argument: fixed (centroid) weights are then concrete at
        # trace time and ensemble_posterior_fn calls only the experts that carry weight after top-k.
        @jax.jit
        def decode(states):
            models = [nnx.merge(graphdef, states[i]) for i in ids]
            fns = [autoregressive.causal_posterior_fn(m.decode_step, bos) for m in models]
            caches = [m.init_cache(batch, NEW_TOKENS) for m in models]
            if router is None:                                   # one expert alone
                return samplers.sample_discrete(jax.random.key(0), fns[0], sched, x0, temperature=0.0,
                                                mask_id=vocab, state=caches[0])
            post = ensemble_posterior_fn(fns, router, mask_id=vocab, top_k=top_k)
            st = ensemble_init_state(router, caches, batch=batch, num_moving=1, vocab=vocab)
            return samplers.sample_discrete(jax.random.key(0), post, sched, x0, temperature=0.0, mask_id=vocab,
                                            state=st)

        return decode

    bayes = BayesFilterRouter.from_priors(np.full(K, 1.0 / K))
    cases = [("one expert", [0], None, None, 1)]
    for k in (1, 2):
        cases.append((f"top-{k} (fixed router)", range(K), FixedRouter(fixed_w), k, k))
    cases.append((f"full mixing (fixed router, {K})", range(K), FixedRouter(fixed_w), None, K))
    cases.append((f"Bayes filter (full, {K})", range(K), bayes, None, K))
    if batch == 1:
        for k in (1, 2):
            sel = order[0, :k]
            w = fixed_w[:, sel] / jnp.sum(fixed_w[:, sel], axis=1, keepdims=True)
            cases.append((f"top-{k} (only the selected experts run)", sel, FixedRouter(w), None, k))

    fns, compile_s, outs = {}, {}, {}
    for name, ids, router, top_k, _ in cases:
        f = make(ids, router, top_k)
        t0 = time.perf_counter()
        outs[name] = np.asarray(f(states))
        compile_s[name] = time.perf_counter() - t0
        fns[name] = (lambda f=f: f(states))
        print(f"compiled {name}: first call {compile_s[name]:.1f} s", flush=True)
    # same tokens: the top-k ensemble of all experts == the ensemble of only the selected ones
    checks = {}
    if batch == 1:
        for k in (1, 2):
            a, b = outs[f"top-{k} (fixed router)"], outs[f"top-{k} (only the selected experts run)"]
            checks[f"top{k}_all_vs_selected_token_agreement"] = float(np.mean(a == b))
        print("checks:", checks, flush=True)

    timings = common.time_interleaved(fns, repeats=max(3, repeats // 2), warmup=1)
    base = timings["one expert"]["median_s"]
    base_cpu = timings["one expert"]["cpu_median_s"]
    rows = []
    for name, ids, router, top_k, k_eff in cases:
        tm = timings[name]
        cost = tm["median_s"] / base
        goal = GOAL * k_eff
        row = {"case": name, "ms": 1e3 * tm["median_s"], "tok_s": batch * NEW_TOKENS / tm["median_s"],
               "cost_vs_one": cost, "cpu_cost_vs_one": tm["cpu_median_s"] / base_cpu,
               "goal": f"<= {goal:.2f}" if name != "one expert" else "1",
               "met": cost <= goal, "first_call_s": compile_s[name], "timing": tm}
        rows.append(row)
        print(f"{name:44s} {row['ms']:9.1f} ms  {row['tok_s']:7.0f} tok/s  cost x{cost:5.2f} "
              f"(cpu x{row['cpu_cost_vs_one']:5.2f}; goal {row['goal']})", flush=True)
    summary = [{k: r[k] for k in ("case", "ms", "tok_s", "cost_vs_one", "cpu_cost_vs_one", "goal", "met",
                                  "first_call_s")} for r in rows]
    common.print_rows(f"{NAME}, batch {batch}, threads={args.threads}", summary)
    return {"benchmark": NAME, "date_utc": common.utc_now(), "threads": info, "batch": batch, "experts": K,
            "new_tokens": NEW_TOKENS, "config": t, "checks": checks, "timings": rows, "summary": summary}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = common.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    args = p.parse_args(argv)
    if common.main_dispatch(__file__, args, argv):
        return
    common.write_json(args.out, run(args))


if __name__ == "__main__":
    main()
