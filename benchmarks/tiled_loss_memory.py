"""Memory of one training step's loss + gradient, plain vs vocabulary-tiled cross-entropy (not a test).

Compiles ``jax.jit(jax.value_and_grad(loss)).lower(...).compile()`` (nothing runs, nothing is
allocated: the parameters and the batch are ``jax.ShapeDtypeStruct``s) and reads XLA's
``memory_analysis()``: ``temp_size_in_bytes`` (the program's temporaries: activations, logits,
intermediate gradients), ``argument_size_in_bytes`` (float32 parameters + batch) and
``output_size_in_bytes`` (loss + float32 gradients). Two programs per shape:

- ``model``: a reduced InternVL2.5-1B language model (Qwen2.5-0.5B's text config, read from
  experiments/configs/internvl2.5-1b.toml: hidden 896, intermediate 4864, 14 heads, 2 KV heads,
  q/k/v biases, tied embeddings, vocabulary 151,674; ``--layers`` blocks, default 1) with the
  config's numerics (bfloat16 compute, float32 parameters, full remat, scanned layers) and XLA
  attention (what a CPU runs; on a GPU "auto" would take cuDNN flash attention), the loss
  ``dfm.train.tiled_loss.causal_lm_loss`` with ``tiled=False`` (logits -> optax cross-entropy,
  the jobs' current loss) or ``tiled=True, chunk=N``; gradients w.r.t. every parameter;
- ``head``: the loss alone, from bfloat16 hidden states ``[b, s, 896]`` and the bfloat16 tied
  table ``[151674, 896]`` (gradients w.r.t. both): what the tiled loss changes, without the
  attention's ``[b, 14, s, s]`` float32 buffers that dominate the ``model`` rows on CPU.

For the ``model`` rows it also prints `dfm plan`'s activation estimate of the same reduced config
(``experiments.engine.plan.activation_bytes``, attention "xla", ``loss_chunk`` = the row's chunk)
and its error relative to ``temp_size_in_bytes``.

Run (CPU, about 1-2 minutes): ``.venv/bin/python benchmarks/tiled_loss_memory.py [--out FILE]
[--layers 1] [--shapes 1x8192,8x1024] [--chunks 1024,256]``. Writes JSON to ``--out``
(default benchmarks/results/tiled_loss_memory.json).
"""
from __future__ import annotations

import argparse
import sys
import time
import tomllib
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import RESULTS_DIR, utc_now, write_json  # noqa: E402
from dfm.models import Decoder, DecoderConfig  # noqa: E402
from dfm.train.tiled_loss import causal_lm_loss, tiled_nll  # noqa: E402
from experiments.engine.plan import Dims, activation_bytes, format_bytes  # noqa: E402

CONFIG = ROOT / "experiments" / "configs" / "internvl2.5-1b.toml"
GIB = 2 ** 30


def reduced_config(layers: int) -> DecoderConfig:
    """The InternVL2.5-1B text decoder of `CONFIG` with `layers` blocks (a TOML file read as data)."""
    cfg = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    t, n = cfg["text"], cfg["numerics"]
    return DecoderConfig(
        vocab_size=cfg["data"]["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=layers, num_heads=t["num_heads"], num_kv_heads=t["num_kv_heads"],
        attention_bias=t["attention_bias"], tie_word_embeddings=t["tie_word_embeddings"], rope_theta=t["rope_theta"],
        dtype=n["dtype"], param_dtype=n["param_dtype"], remat=n["remat"], scan_layers=n["scan_layers"],
        attention="xla")


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
            "total": m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes}


def model_row(config: DecoderConfig, b: int, s: int, chunk: int) -> dict:
    """Compile the loss + gradient of the reduced decoder; ``chunk = 0`` is the plain loss."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, s), jnp.bool_)

    def loss(p, tokens, targets, m):
        kw = dict(tiled=True, chunk=chunk) if chunk else dict(tiled=False)
        return causal_lm_loss(nnx.merge(graphdef, p, rest), tokens, targets, m, **kw)[0]

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, ids, ids, mask).compile()
    row = {"program": "model", "batch": b, "length": s, "loss": f"tiled {chunk}" if chunk else "plain",
           **analysis(compiled), "compile_s": round(time.perf_counter() - t0, 1)}
    dims = Dims(seq_len=s, hidden=config.hidden_size, intermediate=config.intermediate_size,
                layers=config.num_layers, heads=config.num_heads, kv_dim=config.kv_heads * config.head_size,
                vocab=config.num_outputs)
    numerics = types.SimpleNamespace(dtype=config.dtype, remat=config.remat, attention=config.attention,
                                     loss_chunk=chunk)
    estimate = activation_bytes(dims, numerics, b, 1, False)
    row["plan"] = sum(estimate.values())
    row["plan_detail"] = estimate
    row["plan_error"] = row["plan"] / row["temp"] - 1
    return row


def head_row(config: DecoderConfig, b: int, s: int, chunk: int) -> dict:
    """Compile the loss alone from bfloat16 hidden states and the bfloat16 table; ``chunk = 0``: plain."""
    v, d, dtype = config.num_outputs, config.hidden_size, config.compute_dtype
    hidden = jax.ShapeDtypeStruct((b, s, d), dtype)
    table = jax.ShapeDtypeStruct((v, d), dtype)
    ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, s), jnp.float32)

    def loss(h, w, targets, m):
        if chunk:
            return tiled_nll(h, w, targets, m, chunk=chunk, layout="vocab_hidden")
        logits = jnp.einsum("bsd,vd->bsv", h, w, preferred_element_type=jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, table, ids, mask).compile()
    return {"program": "head", "batch": b, "length": s, "loss": f"tiled {chunk}" if chunk else "plain",
            **analysis(compiled), "compile_s": round(time.perf_counter() - t0, 1)}


def print_table(rows: list[dict]) -> None:
    head = ("| program | batch x length | loss | temp | arguments | outputs | total | plan estimate | plan error |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|")
    print(head)
    for r in rows:
        plan = (format_bytes(r["plan"]), f"{100 * r['plan_error']:+.1f}%") if "plan" in r else ("", "")
        print(f"| {r['program']} | {r['batch']} x {r['length']} | {r['loss']} | {format_bytes(r['temp'])} | "
              f"{format_bytes(r['arguments'])} | {format_bytes(r['outputs'])} | {format_bytes(r['total'])} | "
              f"{plan[0]} | {plan[1]} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder blocks of the reduced model (default 1)")
    ap.add_argument("--shapes", default="1x8192,8x1024", help="comma-separated BATCHxLENGTH (default 1x8192,8x1024)")
    ap.add_argument("--chunks", default="1024,256", help="tiled-loss chunks, positions per row (default 1024,256)")
    ap.add_argument("--no-head", action="store_true", help="skip the loss-only rows")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "tiled_loss_memory.json")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    chunks = [0] + [int(c) for c in args.chunks.split(",")]
    config = reduced_config(args.layers)
    print(f"reduced InternVL2.5-1B decoder: {args.layers} layer(s), hidden {config.hidden_size}, vocab "
          f"{config.num_outputs}, {config.dtype} compute, remat {config.remat}, attention {config.attention}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
    rows = []
    for b, s in shapes:
        for chunk in chunks:
            rows.append(model_row(config, b, s, chunk))
            print(f"  model {b}x{s} {rows[-1]['loss']}: temp {rows[-1]['temp'] / GIB:.2f} GiB "
                  f"(compile {rows[-1]['compile_s']} s)", flush=True)
        if not args.no_head:
            for chunk in chunks:
                rows.append(head_row(config, b, s, chunk))
                print(f"  head  {b}x{s} {rows[-1]['loss']}: temp {rows[-1]['temp'] / GIB:.2f} GiB", flush=True)
    print()
    print_table(rows)
    plan_rows = [r for r in rows if "plan" in r]
    worst = max(plan_rows, key=lambda r: abs(r["plan_error"]))
    errors = ", ".join(f"{100 * r['plan_error']:+.1f}%" for r in plan_rows)
    print(f"\nplan vs compiled temporaries (model rows): {errors}; worst {100 * worst['plan_error']:+.1f}% "
          f"({worst['batch']}x{worst['length']} {worst['loss']})")
    write_json(args.out, {"benchmark": "tiled_loss_memory", "date": utc_now(), "jax": jax.__version__,
                          "platform": jax.devices()[0].platform, "config": str(CONFIG.relative_to(ROOT)),
                          "layers": args.layers, "vocab": config.num_outputs, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
