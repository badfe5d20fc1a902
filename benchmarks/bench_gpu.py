"""Ours (JAX, dfm) vs HF transformers (PyTorch) side by side in one run, on whatever accelerator is present.

Usage::

    .venv/bin/python benchmarks/bench_gpu.py --config 1b            # the table's config, on a GPU
    .venv/bin/python benchmarks/bench_gpu.py --config tiny          # CPU smoke run (CI; tens of seconds)
    .venv/bin/python benchmarks/bench_gpu.py --config 1b --compile --rows matmul,train,train_hf
    .venv/bin/python benchmarks/bench_gpu.py --config 1b --only train_scan   # one row, this process

Config ``1b`` (``CONFIGS``): LLaMA-style decoder, vocab 32000, hidden 2048, SwiGLU 5632, 16 layers,
16 heads (MHA), untied embeddings; training at batch 4 x 2048 tokens, AdamW (lr 1e-4, weight decay
0.01 on matrices, global-norm clip 1), bfloat16 compute with float32 parameters, loss
``dfm.losses.ar_nll`` as a mean per token; decoding with bfloat16 weights, 256 new tokens after
one BOS token, batch 1 and 64. ``tiny``: vocab 512, hidden 128, SwiGLU 256, 2 layers, 4 heads,
batch 2 x 64, 16 new tokens, decode batch 1 and 4. Both sides use the same config and batch on
the same device; their weights are independent random initialisations (this is a speed table;
``bench_ar_vs_hf_llama.py`` checks equality of outputs).

Rows (``--rows`` picks a subset, names as below; ``gpu_rows.py`` implements them):

- ``matmul``: the measured bf16 matmul ceiling, ``jnp.dot`` and ``torch.matmul`` of ``n x n``
  matrices (n = 8192; 512 for tiny), ``2 n^3 / t``.
- ``train`` (library default, ``attention="auto"`` = cuDNN flash attention on a GPU in bf16),
  ``train_xla`` (materialised scores), ``train_remat_dots`` / ``train_remat_full`` (peak memory
  is the point), ``train_scan`` (``scan_layers=True``; compile time is the point),
  ``train_micro2`` (``make_train_step(..., microbatches=2)`` at the same global batch; skipped
  with a note where the argument does not exist), ``train_dfm`` (a bidirectional decoder with
  ``vocab + 1`` inputs for the mask token, trained with ``dfm.losses.dfm_loss`` on a linear kappa
  schedule of 32 steps, as ``experiments.text.modeling.masked_loss_fn``): all through
  ``dfm.train.make_train_step``. Reported: step ms, tokens/s, model TFLOP/s, fraction of the
  measured ``jnp.dot`` ceiling and of the vendor's dense bf16 peak (``VENDOR_PEAK``: H100 / H200
  989 TFLOP/s, A100 312, else none), compile seconds (first call minus one step), peak GiB, loss.
- ``train_hf`` (and ``train_hf_compile`` with ``--compile``): ``LlamaForCausalLM`` (sdpa),
  ``torch.autocast`` bf16 with float32 parameters and fused AdamW on CUDA; on CPU float32, no
  autocast, unfused AdamW (the row says so).
- ``decode`` / ``decode_hf``: greedy decoding with a KV cache, ``dfm.models.greedy_generate`` vs
  HF ``generate(do_sample=False)`` with exactly N new tokens; tokens/s and ms per token (one
  token of every sequence); ``tokens_repeat`` = the tokens of two runs are identical.

Method (``/work/shared/tools/gpu_probe.py``): the median wall time of ``--repeats`` calls after
a warm-up call, each blocked (``jax.block_until_ready``, ``torch.cuda.synchronize``).
The first call (compile included) is the warm-up. Peak memory:
``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` and ``torch.cuda.max_memory_allocated()``
(reset before each torch row); None on CPU. JAX's peak is cumulative over a process, so where an
accelerator is visible the driver runs every row in a fresh subprocess (``--only NAME``), which
also frees all memory between rows; on CPU (no peak memory to isolate) it runs them in this
process, faster (``--isolate yes|no`` forces either; in-process on a GPU, JAX's allocator keeps
what earlier rows took, which can starve the torch rows at the 1b config). ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is
set before jax is imported, so JAX and torch can share the device within one process.

FLOPs (``common.train_flops_per_token``, as the probe): ``6 N + 12 L S H d`` per token, N = the
parameters that enter matmuls (all layers' projections and the ``lm_head``, not the input
embedding nor norm scales), L layers, S sequence length, H heads of width d. Model TFLOP/s =
that times tokens/s (no credit for recomputation under remat). Caveat: the attention term counts
causal attention at full ``S x S`` cost, as the probe did, although a causal kernel (cuDNN) skips
the masked half: for the causal rows it overstates useful work by ``6 L S H d`` per token (about 6.5%
at the 1b config); for the bidirectional DFM row it is exact. The HF rows use the same count.

Output: one JSON file (``--out``, default ``benchmarks/results/bench_gpu_<config>_<device>.json``)
with the environment (device names, jax / flax / torch / transformers versions, thread
settings), every row, the ratios ours / HF and the markdown summary (``markdown``), which is also
printed at the end. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import gpu_rows

NAME = "bench_gpu"
CONFIGS = {
    "1b": {"vocab": 32000, "hidden": 2048, "inter": 5632, "layers": 16, "heads": 16, "kv": 16, "seq": 2048,
           "batch": 4, "new": 256, "dbatch": (1, 64), "matmul_n": 8192, "repeats": 10, "row_timeout": 1800},
    "tiny": {"vocab": 512, "hidden": 128, "inter": 256, "layers": 2, "heads": 4, "kv": 4, "seq": 64,
             "batch": 2, "new": 16, "dbatch": (1, 4), "matmul_n": 512, "repeats": 3, "row_timeout": 300},
}
VENDOR_PEAK = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))   # dense bf16 FLOP/s
DEFAULT_ROWS = ("matmul", "train", "train_xla", "train_remat_dots", "train_remat_full", "train_scan",
                "train_micro2", "train_dfm", "train_hf", "decode", "decode_hf")


def vendor_peak(device_kind: str | None):
    """Dense bf16 peak FLOP/s of the device from ``VENDOR_PEAK`` (by substring), else None."""
    for key, peak in VENDOR_PEAK:
        if device_kind and key in device_kind:
            return peak
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/bench_gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=tuple(CONFIGS), default="1b")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_gpu_<config>_<device>.json)")
    p.add_argument("--compile", action="store_true", help="add the HF torch.compile training row")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(gpu_rows.ROWS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 10 for 1b, 3 for tiny)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one subprocess per row (yes), all in this process (no), or yes only where an "
                        "accelerator is visible (auto)")
    p.add_argument("--only", default=None, help="run this one row here (what the driver's subprocesses do)")
    p.add_argument("--row-out", type=Path, default=None, help="with --only: write its rows here as JSON")
    args = p.parse_args(argv)
    C = CONFIGS[args.config]
    args.repeats = C["repeats"] if args.repeats is None else args.repeats
    if args.repeats < 1:
        p.error("--repeats: must be >= 1")
    args.decode_repeats = max(1, min(args.repeats, 5))
    if args.only is not None:
        names = [args.only]
    elif args.rows:
        names = [n.strip() for n in args.rows.split(",") if n.strip()]
    else:
        names = list(DEFAULT_ROWS) + (["train_hf_compile"] if args.compile else [])
    unknown = [n for n in names if n not in gpu_rows.ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(gpu_rows.ROWS)}")
    args.names = names
    args.isolated = args.only is None and (args.isolate == "yes" or (args.isolate == "auto" and accelerator_visible()))
    return args


def accelerator_visible() -> bool:
    """An NVIDIA / TPU device node exists and ``JAX_PLATFORMS`` does not say ``cpu`` (jax not imported)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or any(Path("/dev").glob("accel[0-9]*"))


# ----------------------------------------------------------------------------------------------
# running rows: here (in-process) or one subprocess each
# ----------------------------------------------------------------------------------------------
def run_here(names, C, args, echo=True):
    """Run the rows in this process; a failing row becomes an error row. Returns ``(rows, env)``."""
    rows = []
    for name in names:
        try:
            out = gpu_rows.ROWS[name](C, args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            out = [{"row": name, "case": name, "error": traceback.format_exc()[-1500:]}]
        if echo:
            for r in out:
                print_row(r)
        rows.extend(out)
        gpu_rows.free_memory()
    return rows, gpu_rows.env_info()


def run_child(name, args):
    """Run one row in a fresh process (``--only``); returns ``(rows, env)``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--config", args.config,
               "--repeats", str(args.repeats), "--row-out", str(out)]
        print(f"\n--- {name} (subprocess) ---", flush=True)
        try:
            proc = subprocess.run(cmd, check=False, stderr=subprocess.PIPE, text=True, timeout=CONFIGS[args.config]["row_timeout"])
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr) or ""
        if rc != 0:
            sys.stderr.write(err[-4000:])
        if out.exists():
            res = json.loads(out.read_text())
            return res["rows"], res["env"]
        return [{"row": name, "case": name, "error": f"subprocess exit {rc}: {err[-1500:]}"}], {}


# ----------------------------------------------------------------------------------------------
# derived numbers, printing, summary
# ----------------------------------------------------------------------------------------------
def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def derive(rows, env):
    """Fractions of the measured ceilings and the vendor peak; ratios ours / HF. Returns a dict."""
    ceiling = {r["case"].split()[0]: r["tflops"] for r in rows if r.get("row") == "matmul" and finite(r.get("tflops"))}
    dot, torch_mm = ceiling.get("jnp.dot"), ceiling.get("torch.matmul")
    peak = vendor_peak(env.get("device_kind")) or vendor_peak(env.get("torch_device_name"))
    for r in rows:
        if finite(r.get("model_tflops")):
            r["of_dot_ceiling"] = r["model_tflops"] / dot if dot else None
            r["of_vendor_peak"] = r["model_tflops"] * 1e12 / peak if peak else None
            if r.get("system") == "HF":
                r["of_torch_matmul_ceiling"] = r["model_tflops"] / torch_mm if torch_mm else None
    by = {(r.get("row"), r.get("batch")): r for r in rows if "error" not in r and "skipped" not in r}
    ratios = {}

    def ratio(name, a, b, key):
        if a is not None and b is not None and finite(a.get(key)) and finite(b.get(key)) and b[key] > 0:
            ratios[name] = a[key] / b[key]

    for hf_row in ("train_hf", "train_hf_compile"):
        ratio(f"train tokens/s ours/{hf_row}", by.get(("train", None)), by.get((hf_row, None)), "tok_s")
        ratio(f"train peak GiB ours/{hf_row}", by.get(("train", None)), by.get((hf_row, None)), "peak_gib")
    for (row, b), r in by.items():
        if row == "decode":
            ratio(f"decode b{b} tokens/s ours/HF", r, by.get(("decode_hf", b)), "tok_s")
    return {"dot_ceiling_tflops": dot, "torch_matmul_ceiling_tflops": torch_mm, "vendor_peak_flops": peak, "ratios": ratios}


def _f(v, fmt="{:.4g}"):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def print_row(r):
    if "error" in r:
        line = f"ERROR: {r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}"
    elif "skipped" in r:
        line = f"skipped: {r['skipped']}"
    elif "step_ms" in r:
        line = (f"step {_f(r['step_ms'])} ms  {_f(r['tok_s'], '{:.0f}')} tok/s  {_f(r['model_tflops'])} TFLOP/s  "
                f"compile {_f(r.get('compile_s'), '{:.1f}')} s  peak {_f(r.get('peak_gib'), '{:.2f}')} GiB  "
                f"loss {_f(r.get('loss'))}")
    elif "ms_per_token" in r:
        line = (f"{_f(r['tok_s'], '{:.0f}')} tok/s  {_f(r['ms_per_token'])} ms/token  "
                f"peak {_f(r.get('peak_gib'), '{:.2f}')} GiB  tokens_repeat={r.get('tokens_repeat')}")
    else:
        line = f"{_f(r.get('tflops'))} TFLOP/s ({_f(r.get('ms'))} ms)"
    print(f"ROW {r.get('case', r.get('row')):42s} {line}", flush=True)


def markdown(rows, derived, env, config_name):
    pct = "{:.1%}"
    peak = derived["vendor_peak_flops"]
    head = (f"bench_gpu --config {config_name} on {env.get('device_kind') or env.get('torch_device_name', '?')}: "
            f"jnp.dot ceiling {_f(derived['dot_ceiling_tflops'])} TFLOP/s, torch.matmul "
            f"{_f(derived['torch_matmul_ceiling_tflops'])} TFLOP/s, vendor peak {_f(peak and peak / 1e12)} TFLOP/s")
    lines = [head, "",
             "| system | step ms | tokens/s | model TFLOP/s | of dot ceiling | of vendor peak | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("row", "").startswith("train"):
            if "step_ms" not in r:
                lines.append(f"| {r.get('case')} | {'skipped' if 'skipped' in r else 'error'} | | | | | |")
                continue
            lines.append(f"| {r['case']} | {_f(r['step_ms'], '{:.1f}')} | {_f(r['tok_s'], '{:.0f}')} | "
                         f"{_f(r['model_tflops'], '{:.3g}')} | {_f(r.get('of_dot_ceiling'), pct)} | "
                         f"{_f(r.get('of_vendor_peak'), pct)} | {_f(r.get('peak_gib'), '{:.2f}')} |")
    lines += ["", "| system | batch | tokens/s | ms/token | peak GiB | tokens repeat |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("row", "").startswith("decode"):
            if "ms_per_token" not in r:
                lines.append(f"| {r.get('case')} | error | | | | |")
                continue
            lines.append(f"| {r['case']} | {r['batch']} | {_f(r['tok_s'], '{:.0f}')} | "
                         f"{_f(r['ms_per_token'], '{:.2f}')} | {_f(r.get('peak_gib'), '{:.2f}')} | "
                         f"{r.get('tokens_repeat')} |")
    if derived["ratios"]:
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in derived["ratios"].items()]
    return "\n".join(lines)


def default_out(config_name, env):
    device = env.get("device_kind") or env.get("torch_device_name") or "unknown"
    return common.RESULTS_DIR / f"{NAME}_{config_name}_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"


def main(argv=None):
    # Before any jax import (rows import jax lazily): allocate on demand, so that JAX and torch can
    # share the device in one process; torch's idle OpenMP workers sleep (as common.configure_threads).
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    C = CONFIGS[args.config]
    if args.only is not None:                      # one row, in this process (a driver's child)
        rows, env = run_here(args.names, C, args, echo=args.row_out is None)
        result = {"rows": rows, "env": env}
        if args.row_out:
            args.row_out.write_text(json.dumps(result, default=common._json_default))
        else:
            print(json.dumps(result, default=common._json_default))
        return
    threads = common.thread_info("default")
    print(f"{NAME} --config {args.config}: rows {args.names}, repeats {args.repeats}, "
          f"{'one subprocess per row' if args.isolated else 'in-process'}\nthreads: {threads}", flush=True)
    rows, env = [], {}
    if not args.isolated:
        rows, env = run_here(args.names, C, args)
    else:
        for name in args.names:
            out, child_env = run_child(name, args)
            rows.extend(out)
            env.update(child_env)
            for r in out:
                print_row(r)
    print("env:", json.dumps(env), flush=True)
    derived = derive(rows, env)
    md = markdown(rows, derived, env, args.config)
    result = {"benchmark": NAME, "date_utc": common.utc_now(), "config_name": args.config,
              "config": {k: v for k, v in C.items() if k not in ("repeats", "row_timeout")},
              "repeats": args.repeats, "decode_repeats": args.decode_repeats, "isolated": args.isolated,
              "env": env, "threads": threads, **derived,
              "flops_per_token": "6 N + 12 L S H d (N = matmul params incl. lm_head; causal attention at full "
                                 "S x S cost, as the probe)",
              "rows": rows, "markdown": md}
    print("\n" + md, flush=True)
    common.write_json(args.out or default_out(args.config, env), result)


if __name__ == "__main__":
    main()
