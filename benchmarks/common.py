"""Shared helpers of the benchmark scripts: thread settings, timing, JSON results.

Benchmarks are scripts, not tests: nothing here asserts a time. Every script

- runs ours (JAX) and the peer (PyTorch) on identical inputs in one process,
- under two thread settings, each in its own subprocess (``--threads both``, the default):
  ``1`` (one thread each: ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
  intra_op_parallelism_threads=1`` set *before* jax is imported, ``torch.set_num_threads(1)``,
  and the process pinned to one CPU, see ``configure_threads``) and ``default`` (the libraries'
  default thread counts; ``OMP_WAIT_POLICY=PASSIVE`` so that torch's idle workers sleep),
- reports compile time separately (``jit(f).lower(...).compile()``), warms up, calls
  ``jax.block_until_ready`` on every timed result, and reports the median over repeats,
- writes one JSON file (``--out``, default ``benchmarks/results/<name>.json``).

This module must not import jax or torch at import time (the thread flags must be set first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
THREAD_MODES = ("1", "default")


# ----------------------------------------------------------------------------------------------
# command line and thread settings
# ----------------------------------------------------------------------------------------------
def parser(name: str, description: str, *, threads_default: str = "both") -> argparse.ArgumentParser:
    """The common command line: ``--threads {1,default,both}``, ``--out``, ``--repeats``, ``--quick``."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--threads", choices=(*THREAD_MODES, "both"), default=threads_default,
                   help="thread setting: 1 (one thread each), default, or both (two subprocesses)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON result path")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller problems (smoke run)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the (untimed) correctness checks; --threads both runs them in the first mode only")
    return p


def configure_threads(mode: str) -> None:
    """Set the thread environment for ``mode`` ("1" or "default"). Call before importing jax/torch.

    Mode "1" sets ``XLA_FLAGS`` (``ONE_THREAD_XLA_FLAGS``) and the BLAS/OpenMP variables, and pins
    the process to one CPU (``os.sched_setaffinity``, as ``taskset -c``): with jax 0.10 the XLA
    flags alone do not stop XLA:CPU's YNNPACK matmuls from using every core (measured: a 2048^3 dot
    ran at 2 CPU-seconds per wall-second with the flags set).
    """
    if mode not in THREAD_MODES:
        raise ValueError(f"mode: must be one of {THREAD_MODES}, got {mode!r}")
    if mode == "1":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ONE_THREAD_XLA_FLAGS).strip()
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    else:
        # Default thread counts, but torch's OpenMP workers sleep instead of spinning when idle: with
        # jax's thread pool in the same process on 2 shared cores, spinning made the peer 30-400x
        # slower (e.g. 31 s instead of 1.1 s for 256 sampling steps). Override by setting it yourself.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def configure_torch(mode: str) -> None:
    """``torch.set_num_threads(1)`` (and one interop thread) for mode "1"; defaults otherwise."""
    import torch

    if mode == "1":
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass


def thread_info(mode: str) -> dict[str, Any]:
    """What the thread setting actually is in this process (printed and stored in the JSON)."""
    info: dict[str, Any] = {
        "mode": mode,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    if "jax" in sys.modules:
        import jax

        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        info["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return info


def run_modes(script: str, argv: list[str], modes, out: Path) -> dict[str, Any]:
    """Run ``script`` once per thread mode in a fresh subprocess; merge their JSON into ``out``.

    Returns ``{"runs": {mode: result}, ...}``. A failing child raises ``RuntimeError``.
    """
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(modes):
            child_out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, script, *_strip(argv, ("--threads", "--out")), "--threads", mode,
                   "--out", str(child_out)]
            if i > 0 and "--no-check" not in cmd:
                cmd.append("--no-check")
            print(f"\n=== {Path(script).name}: threads={mode} ===", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(script).name} --threads {mode} failed with exit code {proc.returncode}")
            runs[mode] = json.loads(child_out.read_text())
    merged = {"benchmark": Path(script).stem, "date_utc": utc_now(), "runs": runs}
    write_json(out, merged)
    return merged


def _strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def block(x):
    """``jax.block_until_ready`` on a pytree when jax is loaded (torch CPU results are ready)."""
    if "jax" in sys.modules:
        import jax

        return jax.block_until_ready(x)
    return x


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, number: int = 1) -> dict[str, Any]:
    """Median wall time of ``fn()`` (blocked until ready) over ``repeats`` timings of ``number`` calls.

    Returns ``{"median_s", "min_s", "max_s", "cpu_median_s", "repeats", "number"}``; times are per
    call, in seconds. ``cpu_median_s`` is the process CPU time (all threads): with one thread it is
    the work done, nearly unaffected by other processes sharing the cores (wall time is not).
    """
    if repeats < 1 or number < 1:
        raise ValueError(f"repeats/number: must be >= 1, got {repeats}, {number}")
    for _ in range(warmup):
        block(fn())
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(number):
            out = fn()
        block(out)
        times.append((time.perf_counter() - t0) / number)
        cpu.append((time.process_time() - c0) / number)
    return _stats(times, cpu, repeats, number)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 2,
                     number: int | dict[str, int] = 1) -> dict[str, dict[str, Any]]:
    """Like ``time_call`` for several functions, alternating them repeat by repeat.

    The machine is shared, so the load drifts; alternating ours and the peer in each repeat
    exposes both to the same load and keeps their ratio meaningful. ``number`` may differ per name.
    """
    nums = number if isinstance(number, dict) else {name: number for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(nums[name]):
                out = fn()
            block(out)
            times[name].append((time.perf_counter() - t0) / nums[name])
            cpu[name].append((time.process_time() - c0) / nums[name])
    return {name: _stats(times[name], cpu[name], repeats, nums[name]) for name in fns}


def _stats(wall: list[float], cpu: list[float], repeats: int, number: int) -> dict[str, Any]:
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall),
            "cpu_median_s": statistics.median(cpu), "repeats": repeats, "number": number}


def compile_jitted(jitted, *args, **kwargs):
    """``(compiled, seconds)``: ahead-of-time ``jitted.lower(*args).compile()``, timed."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


def ratio(peer_s: float, ours_s: float) -> float:
    """Speed-up of ours over the peer (peer time / our time)."""
    return peer_s / ours_s if ours_s > 0 else float("inf")


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    """A plain aligned table: one dict per row, same keys."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def main_dispatch(script: str, args, argv: list[str]) -> bool:
    """If ``args.threads == "both"``, run both modes in subprocesses and return True (caller exits)."""
    if args.threads != "both":
        return False
    merged = run_modes(script, argv, THREAD_MODES, args.out)
    summary = merged["runs"]
    for mode, res in summary.items():
        if "summary" in res:
            print_rows(f"summary, threads={mode}", res["summary"])
    return True


# ----------------------------------------------------------------------------------------------
# the tiny LLaMA-style decoder shared by the AR, ensemble and machine-limit benchmarks
# ----------------------------------------------------------------------------------------------
TINY = {"vocab": 4096, "hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "seq": 256, "batch": 8,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def tiny_config(**changes):
    """``dfm.models.DecoderConfig`` of the tiny decoder (``TINY``; untied embeddings, MHA, float32)."""
    from dfm.models import DecoderConfig

    t = {**TINY, **changes}
    return DecoderConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                         num_layers=t["layers"], num_heads=t["heads"], rope_theta=t["rope_theta"],
                         rms_norm_eps=t["rms_norm_eps"], tie_word_embeddings=False)


def hf_llama(config):
    """HF ``LlamaForCausalLM`` with the same hyper-parameters as ``config`` (sdpa attention)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=4 * TINY["seq"],
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False,
        attention_bias=False)
    return transformers.LlamaForCausalLM(hf_config)


def copy_hf_into(hf, model) -> None:
    """Copy an HF ``LlamaForCausalLM``'s weights into our ``Decoder`` (``dfm.models.hf``)."""
    from dfm.models.hf import assign_hf_weights

    assign_hf_weights(model, {k: v.detach().numpy() for k, v in hf.state_dict().items()})


def matmul_params(config) -> int:
    """Parameters that enter matmuls (all but the input embedding and the norm scales)."""
    h, i, c = config.hidden_size, config.intermediate_size, config
    d = c.head_size
    per_layer = h * c.num_heads * d * 2 + h * c.kv_heads * d * 2 + 3 * h * i
    return c.num_layers * per_layer + h * c.num_outputs


def train_flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: ``6 N + 12 n_layers seq (n_heads head_dim)`` (PaLM appendix B).

    ``N = matmul_params`` (forward 2N, backward 4N); the attention term counts ``Q K^T`` and
    ``P V`` (2 * 2 * seq * n_heads * head_dim forward per layer, x3 with the backward) over the full
    ``seq x seq`` score matrix, as the implementation computes it (the causal mask zeroes half).
    """
    return 6.0 * matmul_params(config) + 12.0 * config.num_layers * seq * config.num_heads * config.head_size


def decode_flops_per_token(config, context: int) -> float:
    """Forward FLOPs of one cached decode step: ``2 N + 4 n_layers context n_heads head_dim``."""
    return 2.0 * matmul_params(config) + 4.0 * config.num_layers * context * config.num_heads * config.head_size
