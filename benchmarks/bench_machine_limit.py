"""Machine limit: achieved FLOP/s of our decoder training step against a jitted 2048^3 ``jnp.dot``.

Our step: the tiny LLaMA-style decoder (``benchmarks/common.py`` ``TINY``: hidden 256, SwiGLU 1024,
4 layers, 4 heads, vocab 4096, untied embeddings, float32), batch 8 x sequence 256, AR loss
``dfm.losses.ar_nll(model(shift_right(x1)), x1)`` (mean per token), AdamW
(``dfm.train.make_optimizer``), one ``dfm.train.make_train_step`` call per step.

FLOPs are counted analytically (``common.train_flops_per_token``)::

    FLOPs/step = tokens * (6 N + 12 n_layers seq n_heads head_dim),   tokens = batch * seq,
    N = n_layers (4 h^2 + 3 h i) + h V        (matmul parameters; input embedding and norms excluded)

and the reference is the best rate of ``jax.jit(jnp.dot)`` on two 2048 x 2048 float32 matrices
(``2 * 2048^3`` FLOPs) on the same machine, same thread setting, timed alternately with the step
(medians; the best/best ratio is printed too). Goal: >= 65% of it. Default
thread settings (``--threads default``; ``--threads both`` also runs one thread).

Run: ``.venv/bin/python benchmarks/bench_machine_limit.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "bench_machine_limit"
GOAL = 0.65
DOT_N = 2048


def run(args) -> dict:
    common.configure_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dfm import autoregressive, losses
    from dfm.models import Decoder
    from dfm.train import TrainConfig, make_optimizer, make_train_step

    info = common.thread_info(args.threads)
    print("threads:", info, flush=True)
    repeats = 3 if args.quick else args.repeats

    # ---- reference: 2048^3 float32 dot
    a = jax.random.normal(jax.random.key(0), (DOT_N, DOT_N), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (DOT_N, DOT_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    _, dot_compile = common.compile_jitted(dot, a, b)
    dot_flops = 2.0 * DOT_N**3

    # ---- our training step
    t = common.TINY
    config = common.tiny_config()
    bos = t["vocab"] - 1
    model = Decoder(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(steps=10_000, learning_rate=1e-3,
                                                                weight_decay=0.01)), wrt=nnx.Param)

    def loss_fn(m, x1, key):
        del key
        nll = losses.ar_nll(m(autoregressive.shift_right(x1, bos)), x1)
        return jnp.mean(nll) / x1.shape[1], {}

    step = make_train_step(loss_fn, model, optimizer)
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.integers(0, t["vocab"], size=(t["batch"], t["seq"])), jnp.int32)
    key = jax.random.key(0)
    import time

    t0 = time.perf_counter()
    jax.block_until_ready(step(x1, key))
    first_s = time.perf_counter() - t0
    tokens = t["batch"] * t["seq"]
    flops = tokens * common.train_flops_per_token(config, t["seq"])

    # alternate dot and step so that both see the same load (the machine is shared)
    tm = common.time_interleaved({"dot": lambda: dot(a, b), "step": lambda: step(x1, key)[0]},
                                 repeats=repeats, warmup=1, number={"dot": 3, "step": 1})
    dot_t, step_t = tm["dot"], tm["step"]
    dot_rate, dot_best = dot_flops / dot_t["median_s"], dot_flops / dot_t["min_s"]
    rate, rate_best = flops / step_t["median_s"], flops / step_t["min_s"]
    frac, frac_best = rate / dot_rate, rate_best / dot_best
    print(f"dot {DOT_N}^3: median {dot_t['median_s'] * 1e3:.1f} ms = {dot_rate / 1e9:.1f} GFLOP/s "
          f"(best {dot_best / 1e9:.1f}; compile {dot_compile:.2f} s)", flush=True)
    print(f"train step: median {step_t['median_s'] * 1e3:.1f} ms ({tokens / step_t['median_s']:.0f} tok/s), "
          f"{flops / 1e9:.2f} GFLOP/step -> {rate / 1e9:.1f} GFLOP/s = {100 * frac:.1f}% of the dot "
          f"(best/best {100 * frac_best:.1f}%; first call incl. compile {first_s:.1f} s)", flush=True)

    summary = [
        {"case": f"jnp.dot {DOT_N}^3 float32", "ms": 1e3 * dot_t["median_s"], "GFLOP/s": dot_rate / 1e9,
         "best_GFLOP/s": dot_best / 1e9, "fraction_of_dot": 1.0, "best/best": 1.0, "goal": "reference",
         "met": True},
        {"case": "decoder train step (b8 x s256)", "ms": 1e3 * step_t["median_s"], "GFLOP/s": rate / 1e9,
         "best_GFLOP/s": rate_best / 1e9, "fraction_of_dot": frac, "best/best": frac_best,
         "goal": f">= {GOAL:.0%}", "met": frac >= GOAL},
    ]
    common.print_rows(f"{NAME}, threads={args.threads}", summary)
    return {"benchmark": NAME, "date_utc": common.utc_now(), "threads": info, "config": t,
            "flops_formula": "tokens * (6 N + 12 n_layers seq n_heads head_dim), N = matmul parameters",
            "matmul_params": common.matmul_params(config), "flops_per_step": flops,
            "dot": {"n": DOT_N, "compile_s": dot_compile, **dot_t, "flops_per_s": dot_rate,
                    "best_flops_per_s": dot_best},
            "train_step": {"first_call_s": first_s, **step_t, "tokens_per_s": tokens / step_t["median_s"],
                           "flops_per_s": rate, "fraction_of_dot": frac},
            "summary": summary}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = common.parser(NAME, __doc__.splitlines()[0], threads_default="default").parse_args(argv)
    if common.main_dispatch(__file__, args, argv):
        return
    common.write_json(args.out, run(args))


if __name__ == "__main__":
    main()
