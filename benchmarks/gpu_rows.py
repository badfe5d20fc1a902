"""The rows of ``benchmarks/bench_gpu.py``: one function per row name, each returning result dicts.

Every function takes the size dict ``C`` (``bench_gpu.CONFIGS``) and the parsed arguments and
returns a list of row dicts (``row``, ``case``, ``system``, timings). They import jax / torch
lazily, so that ``bench_gpu.py`` can set ``XLA_PYTHON_CLIENT_PREALLOCATE`` first and a row that
needs only torch does not initialise the JAX GPU client. Method (after
``/work/shared/tools/gpu_probe.py``): median wall time over ``repeats`` calls after one warm-up
call (``common.time_call``), each call blocked (``jax.block_until_ready`` / ``torch.cuda.synchronize``).
"""
from __future__ import annotations

import gc
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0
DFM_STEPS = 32                 # T of the masked schedule (experiments.text MaskedConfig.num_steps)
DFM_T_SAMPLING = "rate_stratified"  # experiments.text.modeling.MASKED_T_SAMPLING


# ----------------------------------------------------------------------------------------------
# environment, memory
# ----------------------------------------------------------------------------------------------
def env_info() -> dict:
    """Versions and device names of the libraries this process has imported."""
    info = {}
    if "jax" in sys.modules:
        import flax
        import jax

        dev = jax.devices()[0]
        info.update(jax=jax.__version__, flax=flax.__version__, jax_backend=jax.default_backend(),
                    jax_device=str(dev), device_kind=getattr(dev, "device_kind", ""))
    if "torch" in sys.modules:
        import torch

        info.update(torch=torch.__version__, torch_device=torch_device(),
                    torch_device_name=(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"))
        if "transformers" in sys.modules:
            info["transformers"] = sys.modules["transformers"].__version__
    return info


def jax_peak_gib():
    """``peak_bytes_in_use`` of the first JAX device in GiB (None where not reported, e.g. CPU).

    Cumulative over the process: run one row per process (the driver's default) for a clean value."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use", 0) / 2**30


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _torch_sync():
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


# ----------------------------------------------------------------------------------------------
# 1. matmul ceiling
# ----------------------------------------------------------------------------------------------
def matmul(C, args):
    """The practical bf16 matmul ceiling: ``jnp.dot`` and ``torch.matmul`` of two ``n x n`` matrices."""
    import jax
    import jax.numpy as jnp

    n, rows = C["matmul_n"], []
    ab = [jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2)]
    dot = jax.jit(jnp.dot)
    t = common.time_call(lambda: dot(*ab), repeats=args.repeats, warmup=1)
    rows.append({"row": "matmul", "case": f"jnp.dot bf16 {n}^3", "system": "ours", "ms": 1e3 * t["median_s"],
                 "tflops": 2 * n ** 3 / t["median_s"] / 1e12})
    ab.clear()
    try:
        import torch

        dev, sync = torch_device(), _torch_sync()
        ta = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        tb = torch.randn(n, n, device=dev, dtype=torch.bfloat16)

        def mm():
            out = ta @ tb
            sync()
            return out

        t = common.time_call(mm, repeats=args.repeats, warmup=1)
        rows.append({"row": "matmul", "case": f"torch.matmul bf16 {n}^3", "system": "HF",
                     "ms": 1e3 * t["median_s"], "tflops": 2 * n ** 3 / t["median_s"] / 1e12})
    except ImportError as e:
        rows.append({"row": "matmul", "case": "torch.matmul bf16", "system": "HF", "skipped": f"torch: {e}"})
    return rows


# ----------------------------------------------------------------------------------------------
# 2-7. training steps, ours
# ----------------------------------------------------------------------------------------------
def decoder_config(C, *, dtype="bfloat16", param_dtype="float32", **changes):
    from dfm.models import DecoderConfig

    return DecoderConfig(vocab_size=C["vocab"], hidden_size=C["hidden"], intermediate_size=C["inter"],
                         num_layers=C["layers"], num_heads=C["heads"], num_kv_heads=C["kv"], dtype=dtype,
                         param_dtype=param_dtype, tie_word_embeddings=False, **changes)


def train_data(C):
    import numpy as np

    return np.random.default_rng(0).integers(0, C["vocab"] - 1, (C["batch"], C["seq"])).astype(np.int32)


def ar_loss(bos):
    """Mean token NLL: ``ar_nll`` is the per-sequence sum (``[batch]``), hence ``mean / length``."""
    import jax.numpy as jnp

    from dfm import autoregressive, losses

    def loss_fn(m, x, key):
        del key
        return jnp.mean(losses.ar_nll(m(autoregressive.shift_right(x, bos)), x)) / x.shape[1], {}

    return loss_fn


def dfm_masked_loss(C):
    """The masked DFM loss per token as ``experiments.text.modeling.masked_loss_fn`` builds it:
    ``dfm.losses.dfm_loss`` on ``schedules.discretize(LinearScheduler(), seq, 32)``, mask id = vocab."""
    import jax.numpy as jnp

    from dfm import losses, schedules

    schedule = schedules.discretize(schedules.LinearScheduler(), C["seq"], DFM_STEPS)
    mask_id = C["vocab"]

    def loss_fn(m, x, key):
        loss = losses.dfm_loss(key, m, x, schedule, mask_id=mask_id, t_sampling=DFM_T_SAMPLING)
        return jnp.mean(loss) / x.shape[1], {}

    return loss_fn


def _train_ours(C, args, name, case, config, loss_fn, *, microbatches=None, note=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dfm.models import Decoder
    from dfm.models.attention import resolve_implementation
    from dfm.train import TrainConfig, make_optimizer, make_train_step

    extra = {}
    if microbatches is not None:
        if "microbatches" not in inspect.signature(make_train_step).parameters:
            return [{"row": name, "case": case, "system": "ours",
                     "skipped": "dfm.train.make_train_step has no `microbatches` argument in this checkout"}]
        extra["microbatches"] = microbatches
    B, S = C["batch"], C["seq"]
    fpt = common.train_flops_per_token(config, S)
    t0 = time.perf_counter()
    model = Decoder(config, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t0
    tx = make_optimizer(TrainConfig(steps=10_000, learning_rate=LR, weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                                    schedule="constant"))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = make_train_step(loss_fn, model, opt, **extra)
    x, key = jnp.asarray(train_data(C)), jax.random.key(0)
    t0 = time.perf_counter()
    loss = jax.block_until_ready(step(x, key)[0])
    first = time.perf_counter() - t0
    t = common.time_call(lambda: step(x, key)[0], repeats=args.repeats, warmup=0)
    loss = float(step(x, key)[0])
    step_s, tok = t["median_s"], B * S / t["median_s"]
    row = {"row": name, "case": case, "system": "ours", "step_ms": 1e3 * step_s, "tok_s": tok, "model_tflops": fpt * tok / 1e12,
               "compile_s": max(first - step_s, 0.0), "first_call_s": first, "init_s": init_s, "peak_gib": jax_peak_gib(),
               "loss": loss, "matmul_params": common.matmul_params(config), "flops_per_token": fpt,
               "attention": config.attention,
               "attention_resolved": resolve_implementation(config.attention, config.compute_dtype, config.head_size),
               "remat": config.remat, "scan_layers": config.scan_layers, "microbatches": microbatches or 1,
               "dtype": f"{config.dtype} compute, {config.param_dtype} params", "timing": t}
    if note:
        row["note"] = note
    return [row]


def train(C, args):
    return _train_ours(C, args, "train", "train ours (attention=auto)", decoder_config(C), ar_loss(C["vocab"] - 1))


def train_xla(C, args):
    return _train_ours(C, args, "train_xla", "train ours (attention=xla)", decoder_config(C, attention="xla"),
                       ar_loss(C["vocab"] - 1), note="materialised float32 scores")


def train_remat_dots(C, args):
    return _train_ours(C, args, "train_remat_dots", "train ours (remat=dots)", decoder_config(C, remat="dots"),
                       ar_loss(C["vocab"] - 1))


def train_remat_full(C, args):
    return _train_ours(C, args, "train_remat_full", "train ours (remat=full)", decoder_config(C, remat="full"),
                       ar_loss(C["vocab"] - 1))


def train_scan(C, args):
    return _train_ours(C, args, "train_scan", "train ours (scan_layers)", decoder_config(C, scan_layers=True),
                       ar_loss(C["vocab"] - 1))


def train_micro2(C, args):
    return _train_ours(C, args, "train_micro2", "train ours (microbatches=2)", decoder_config(C),
                       ar_loss(C["vocab"] - 1), microbatches=2,
                       note=f"same global batch {C['batch']}, {C['batch'] // 2} rows per microbatch")


def train_dfm(C, args):
    config = decoder_config(C).replace(causal=False, vocab_size=C["vocab"] + 1, output_size=C["vocab"])
    return _train_ours(C, args, "train_dfm", "DFM masked train ours (bidirectional)", config, dfm_masked_loss(C),
                       note=f"dfm.losses.dfm_loss, linear kappa T={DFM_STEPS}, t_sampling={DFM_T_SAMPLING}; "
                            "attention FLOPs exact (no causal mask)")


# ----------------------------------------------------------------------------------------------
# 8. training step, HF transformers (torch)
# ----------------------------------------------------------------------------------------------
def hf_model(C, dtype):
    """HF ``LlamaForCausalLM`` of the same shape (sdpa attention, untied), on the torch device."""
    import torch
    import transformers

    hc = transformers.LlamaConfig(vocab_size=C["vocab"], hidden_size=C["hidden"], intermediate_size=C["inter"],
                                  num_hidden_layers=C["layers"], num_attention_heads=C["heads"],
                                  num_key_value_heads=C["kv"], max_position_embeddings=max(C["seq"] + C["new"], 4096),
                                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                                  attention_bias=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(torch_device()):
        m = transformers.LlamaForCausalLM(hc)
    return m.to(dtype)


def _train_hf(C, args, name, compiled):
    import torch
    import torch.nn.functional as F

    dev, sync = torch_device(), _torch_sync()
    cuda = dev == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    B, S, V = C["batch"], C["seq"], C["vocab"]
    fpt = common.train_flops_per_token(decoder_config(C), S)
    m = hf_model(C, torch.float32)
    m.train()
    decay = [p for p in m.parameters() if p.ndim >= 2]
    no_decay = [p for p in m.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, fused=cuda)
    fwd = torch.compile(m) if compiled else m
    xt = torch.as_tensor(train_data(C), device=dev).long()
    inp = torch.cat([torch.full((B, 1), V - 1, device=dev, dtype=torch.long), xt[:, :-1]], 1)

    def tstep():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            logits = fwd(inp).logits
        loss = F.cross_entropy(logits.float().reshape(-1, V), xt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        opt.step()
        sync()
        return loss

    t0 = time.perf_counter()
    tstep()
    first = time.perf_counter() - t0
    t = common.time_call(tstep, repeats=args.repeats, warmup=0)
    step_s, tok = t["median_s"], B * S / t["median_s"]
    dtype = ("autocast bf16 compute, float32 params, fused AdamW" if cuda else
             "float32 (CPU: no autocast bf16, unfused AdamW)")
    return [{"row": name, "case": f"train HF {'torch.compile' if compiled else 'eager'} (sdpa)", "system": "HF",
             "step_ms": 1e3 * step_s, "tok_s": tok, "model_tflops": fpt * tok / 1e12,
             "compile_s": max(first - step_s, 0.0), "first_call_s": first,
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
             "loss": float(tstep().item()), "dtype": dtype, "timing": t}]


def train_hf(C, args):
    return _train_hf(C, args, "train_hf", compiled=False)


def train_hf_compile(C, args):
    return _train_hf(C, args, "train_hf_compile", compiled=True)


# ----------------------------------------------------------------------------------------------
# 9. greedy decoding
# ----------------------------------------------------------------------------------------------
def decode(C, args):
    """``dfm.models.greedy_generate``, bf16 weights, prompt = one BOS token, ``new`` tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dfm.models import Decoder, greedy_generate

    rows, N = [], C["new"]
    model = Decoder(decoder_config(C, dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    for db in C["dbatch"]:
        prompt = jnp.full((db, 1), C["vocab"] - 1, jnp.int32)
        t0 = time.perf_counter()
        first_tokens = np.asarray(greedy_generate(model, prompt, N))
        first = time.perf_counter() - t0
        t = common.time_call(lambda p=prompt: greedy_generate(model, p, N), repeats=args.decode_repeats, warmup=0)
        again = np.asarray(jax.block_until_ready(greedy_generate(model, prompt, N)))
        rows.append({"row": "decode", "case": f"decode ours b{db}", "system": "ours", "batch": db, "new_tokens": N,
                     "tok_s": db * N / t["median_s"], "ms_per_token": 1e3 * t["median_s"] / N,
                     "compile_s": max(first - t["median_s"], 0.0), "first_call_s": first, "peak_gib": jax_peak_gib(),
                     "tokens_repeat": bool(np.array_equal(first_tokens, again)), "dtype": "bfloat16 weights",
                     "timing": t})
        free_memory()
    return rows


def decode_hf(C, args):
    """HF ``generate(do_sample=False, use_cache=True)`` with exactly ``new`` tokens (no EOS stop)."""
    import torch

    dev, sync = torch_device(), _torch_sync()
    cuda = dev == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    rows, N = [], C["new"]
    m = hf_model(C, dtype)
    m.eval()
    for db in C["dbatch"]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        pt = torch.full((db, 1), C["vocab"] - 1, device=dev, dtype=torch.long)

        def gen(pt=pt):
            with torch.no_grad():
                out = m.generate(pt, max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True,
                                 pad_token_id=0, eos_token_id=None)
            sync()
            return out

        t0 = time.perf_counter()
        first_tokens = gen().cpu()
        first = time.perf_counter() - t0
        t = common.time_call(gen, repeats=args.decode_repeats, warmup=0)
        rows.append({"row": "decode_hf", "case": f"decode HF b{db}", "system": "HF", "batch": db, "new_tokens": N,
                     "tok_s": db * N / t["median_s"], "ms_per_token": 1e3 * t["median_s"] / N,
                     "first_call_s": first, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                     "tokens_repeat": bool(torch.equal(first_tokens, gen().cpu())),
                     "dtype": "bfloat16 weights" if cuda else "float32 (CPU)", "timing": t})
        free_memory()
    return rows


ROWS = {f.__name__: f for f in (matmul, train, train_xla, train_remat_dots, train_remat_full, train_scan,
                                train_micro2, train_dfm, train_hf, train_hf_compile, decode, decode_hf)}
TORCH_ROWS = ("train_hf", "train_hf_compile", "decode_hf")
