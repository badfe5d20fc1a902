"""Train-step throughput of the decoder on one device vs a device mesh (not a test).

Times `dfm.train.make_train_step` (AdamW, the step `dfm.train.train` runs) for a LLaMA-style
`dfm.models.Decoder` on:

- `1 device`: `mesh=None` (the unsharded `nnx.jit` step on device 0),
- `data=N`, `fsdp=N`, `tensor=N`, and a mixed mesh: the sharded step on all N devices.

Each row reports compile time (first call), the median step time over `--rounds` x `--steps`
timed steps (after a warm-up step; configurations are timed round-robin so that load changes
on a shared machine spread over all rows; `jax.block_until_ready` on every result), its
inter-quartile range, the median CPU time of the process per step (all threads; less sensitive
than wall time to other jobs on a shared machine), tokens/s and, when the peak
FLOP/s of the device is known, the model FLOP utilization
`MFU = (training FLOPs per step / step time) / (N * peak)` with the analytic count of
`train_flops_per_token` (6 x matmul parameters + attention scores, PaLM appendix B convention).

On CPU (this repository's CI, no accelerator) the N devices are simulated by
`--xla_force_host_platform_device_count=N` on the same cores, so the sharded rows measure the
*overhead* of partitioning and collectives, not a speed-up; MFU is not reported. On a GPU / TPU
host the real devices are used (`--devices` is then the number to use, default all) and MFU is
computed from `--peak-tflops` or the built-in table for the device kind.

Run: `python benchmarks/bench_sharding.py [--devices 8] [--steps 5] [--rounds 4] [--out FILE]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PEAK_TFLOPS = {  # dense bf16 tensor-core peak per device (vendor data sheets), TFLOP/s
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5e": 197.0,
    "TPU v5p": 459.0, "TPU v6e": 918.0,
}


def _args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/bench_sharding.py", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="devices to use (CPU: simulated count)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds over the configurations")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: table)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_sharding.json")
    return p.parse_args(argv)


def train_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: `6 * N_matmul + 12 * layers * seq_len * num_heads * head_dim`.

    `N_matmul` counts every matmul weight (q, k, v, o, gate, up, down per layer, and the output
    projection, tied or not); the embedding lookup is not a matmul. The second term is the
    attention scores and weighted sum (forward `4 * seq * d_attn` per token and layer, x3 for
    the backward), counted over the full square as in PaLM (Chowdhery et al. 2022, app. B).
    """
    c = config
    d_q, d_kv = c.num_heads * c.head_size, c.kv_heads * c.head_size
    per_layer = c.hidden_size * (2 * d_q + 2 * d_kv) + 3 * c.hidden_size * c.intermediate_size
    n_matmul = c.num_layers * per_layer + c.hidden_size * c.num_outputs
    return 6.0 * n_matmul + 12.0 * c.num_layers * seq_len * d_q


def _peak(device, override):
    if override is not None:
        return override * 1e12
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


def main(argv=None) -> dict:
    args = _args(argv)
    # must precede the jax import; only affects the host (CPU) platform
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from dfm.models import Decoder, DecoderConfig
    from dfm.sharding import MeshConfig, make_mesh
    from dfm.train import TrainConfig, make_optimizer, make_train_step

    devices = jax.devices()[: args.devices]
    n = len(devices)
    backend = jax.default_backend()
    config = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_layers=args.layers, num_heads=args.heads, dtype=args.dtype)
    tx = make_optimizer(TrainConfig(steps=1000, learning_rate=1e-3))
    data = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq_len + 1)).astype(np.int32)

    def loss_fn(model, batch, key):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}

    flops_step = train_flops_per_token(config, args.seq_len) * args.batch * args.seq_len
    peak = _peak(devices[0], args.peak_tflops) if backend != "cpu" else None
    meshes = [("1 device", None, 1), (f"data={n}", MeshConfig(data=n), n),
              (f"fsdp={n}", MeshConfig(data=1, fsdp=n), n), (f"tensor={n}", MeshConfig(data=1, tensor=n), n)]
    if n >= 4 and n % 4 == 0:
        meshes.append((f"mixed 2x2x{n // 4}", MeshConfig(data=2, fsdp=2, tensor=n // 4), n))
    runs = []   # compile every configuration first, then time them interleaved (round-robin)
    for label, mesh_config, used in meshes:
        if args.batch % (1 if mesh_config is None else mesh_config.shape(n)[0] * mesh_config.shape(n)[1]):
            continue
        model = Decoder(config, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        mesh = None if mesh_config is None else make_mesh(mesh_config, devices)
        step = make_train_step(loss_fn, model, optimizer, mesh=mesh)
        batch = data if mesh is not None else jnp.asarray(data)
        key = jax.random.PRNGKey(0)
        t0 = time.perf_counter()
        jax.block_until_ready(step(batch, key))
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(step(batch, key))
        runs.append((label, used, compile_s, lambda step=step, batch=batch, key=key: step(batch, key), [], []))
    # interleaving spreads slow phases of a shared machine over all rows instead of biasing one
    for _ in range(args.rounds):
        for *_, run, times, cpu_times in runs:
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    rows = []
    for label, used, compile_s, _, times, cpu_times in runs:
        step_s = statistics.median(times)
        rows.append({"mesh": label, "devices": used, "compile_s": compile_s, "step_ms": 1e3 * step_s,
                     "cpu_ms": 1e3 * statistics.median(cpu_times),
                     "step_ms_iqr": 1e3 * float(np.subtract(*np.percentile(times, [75, 25]))),
                     "tokens_per_s": args.batch * args.seq_len / step_s,
                     "tflops_per_s": flops_step / step_s / 1e12,
                     "mfu": None if peak is None else flops_step / step_s / (used * peak)})
    base = rows[0]["step_ms"]
    for row in rows:
        row["relative_to_1_device"] = row["step_ms"] / base
    result = {
        "benchmark": "bench_sharding", "backend": backend, "device_kind": devices[0].device_kind, "devices": n,
        "simulated_devices": backend == "cpu", "host": platform.node(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "model": {k: getattr(config, k) for k in
                                          ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                           "num_heads", "dtype")},
        "batch": args.batch, "seq_len": args.seq_len, "timed_steps": args.rounds * args.steps,
        "train_flops_per_step": flops_step,
        "peak_flops_per_device": peak, "rows": rows,
    }
    print(f"backend {backend} ({devices[0].device_kind}), {n} devices"
          f"{' simulated on ' + str(os.cpu_count()) + ' CPU cores' if backend == 'cpu' else ''}; "
          f"batch {args.batch} x {args.seq_len} tokens, {flops_step / 1e9:.2f} GFLOP per train step")
    header = (f"{'mesh':<16}{'compile s':>10}{'step ms':>10}{'IQR ms':>8}{'CPU ms':>8}{'tokens/s':>12}"
              f"{'x 1 dev':>9}{'MFU':>8}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['mesh']:<16}{r['compile_s']:>10.2f}{r['step_ms']:>10.2f}{r['step_ms_iqr']:>8.1f}{r['cpu_ms']:>8.1f}"
              f"{r['tokens_per_s']:>12.0f}{r['relative_to_1_device']:>9.2f}{mfu:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
