"""`dfm plan`: the memory one training step needs per device, worked out before renting devices.

The model and its optimizer are built abstractly (`nnx.eval_shape`: shapes and dtypes, nothing
allocated), every parameter and optimizer-state leaf is laid out on the config's `[mesh]` for N
devices with the logical-axis rules (`dfm.sharding.rules.logical_to_spec`, the same forgiving
resolution training uses: a dimension its mesh axes do not divide is replicated), and the bytes
per device are summed:

- parameters: every `nnx.Param` leaf in its `param_dtype` (exact);
- gradients: the trainable parameters in their dtype (exact; frozen prefixes of the stage's
  ``train`` setting get none), plus one float32 accumulator of every parameter when
  ``numerics.microbatches > 1`` (`dfm.train.steps.value_and_grads`);
- optimizer state: the leaves of `nnx.Optimizer(model, make_optimizer(...), wrt=nnx.Param)`
  (AdamW's mu and nu like the trainable parameters; frozen parts have none) (exact);
- activations: an ESTIMATE (below).

Activations, per device and per decoder layer, for ``b`` sequences per device per microbatch
(stage batch / (data x fsdp) / microbatches: `dfm.train.steps.value_and_grads` runs the
microbatches one after another, so one microbatch's activations are alive at a time), ``s``
tokens, width ``h``, ``a`` heads, ``c`` bytes per compute-dtype value (2 for bfloat16, 4 for
float32):

- remat "none": Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), eq. 1 without its score term: ``34 s b h`` bytes for 16-bit
  activations, scaled by ``c / 2``; plus, unless the attention kernel is a flash kernel
  (``attention = "cudnn"``, or "auto" with bfloat16 compute), ``16 a s^2 b``: XLA's attention
  keeps the scores, their softmax and both their gradients in float32, four ``[b, a, s, s]``
  float32 buffers (their ``5 a s^2 b`` assumes 16-bit scores; measured with
  ``memory_analysis()``: 16-19 bytes per score, benchmarks/tiled_loss_memory.py);
- remat "full": the block input, ``c s b h`` per layer, plus one layer's "none" activations
  (the block being recomputed in the backward pass; their Section 4.1);
- remat "dots" (`dots_with_no_batch_dims_saveable`): the block input and the outputs of the
  weight matmuls (q, k, v, o, gate, up, down): ``c s b (4 h + 2 kv_dim + 2 i)`` per layer, plus one
  layer's "none" activations for the recomputed elementwise ops;
- the logits and their gradient in float32, ``2 x 4 b s V``, plus the float32 gradient of the
  output projection, ``4 V h``, split over the tensor axis when V divides. With the tiled loss
  (``numerics.loss_chunk = N > 0``, `dfm.train.tiled_loss`) only one chunk's logits exist at a
  time: ``2 x 4 b min(N, s) V``;
- the multimodal job's vision tower (no remat) when it is trained: eq. 1 with its own sizes
  (one image per sequence); a frozen tower keeps nothing for the backward pass.

The rows are summed: it assumes no overlap between the logits and the recomputed layer, which
XLA sometimes finds (then the estimate errs high). On the reduced InternVL2.5-1B decoder (1 layer,
8192 tokens, vocabulary 151,674, XLA attention) it is within 15% of the compiled program's
temporaries (``jax.jit(...).lower(...).compile().memory_analysis()``), plain and tiled loss:
benchmarks/tiled_loss_memory.py. Treat it as a guide; the parameter, gradient and optimizer rows
are exact layouts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dfm.sharding import MESH_AXES, MeshConfig, logical_to_spec, make_mesh
from dfm.train.optim import TrainConfig, frozen_mask, make_optimizer, path_name

RULE_OF_THUMB_BYTES = 16   # float32 parameter + gradient + AdamW mu + nu

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | float) -> int:
    """Bytes of a size such as ``80GiB``, ``80GB``, ``80e9``, ``141 GB`` or ``1024``.

    Decimal units (KB, MB, GB, TB; K, M, G, T) are powers of 1000, binary ones (KiB, ..., TiB)
    powers of 1024; case does not matter.

    Raises:
      ValueError: not a positive size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"device memory: expected a size such as 80GiB, 80GB or 80e9, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"device memory: must be > 0, got {text!r}")
    return size


def format_bytes(n: float) -> str:
    """``12.34 GiB`` style (binary units)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Dims:
    """Sizes the activation estimate needs (of the decoder, and of a vision tower if any)."""

    seq_len: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    vision: dict | None = None   # {"seq_len", "hidden", "layers", "heads"}


def model_factory(task, config, vocab: int | None = None):
    """``(factory, dims)``: a zero-argument builder of the config's freshly initialized model and
    the sizes of `Dims`, from the task (`Task.plan_model`). The vocabulary comes from the
    tokenizer at run time; here it is the config's (see the task's `plan_model`) unless `vocab` is
    given (e.g. a pretrained model's vocabulary)."""
    return task.plan_model(config, vocab)


def kv_dim(dc) -> int:
    head_dim = dc.head_dim or dc.hidden_size // dc.num_heads
    return (dc.num_kv_heads or dc.num_heads) * head_dim


def training_stages(task, config) -> list[str]:
    """Names of the config sections of the task's training stages (stage 1, stage 2)."""
    return [task.stage1, "stage2"]


# --------------------------------------------------------------------------------------- layout
def mesh_sizes(mesh_section, devices: int) -> dict[str, int]:
    """``{"data", "fsdp", "tensor": size}`` of the `[mesh]` section on `devices` devices (-1 filled).

    Raises:
      ValueError: the sizes do not fit the device count.
    """
    m = mesh_section
    return dict(zip(MESH_AXES, MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor).shape(devices)))


def _leaf_layout(var, sizes: dict[str, int], mesh, rules) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
    """``(global shape, dtype, per-device shard shape)`` of one abstract variable."""
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    spec = logical_to_spec(tuple(names), shape, sizes, rules) if names else PartitionSpec()
    if mesh is not None:
        return shape, dtype, tuple(NamedSharding(mesh, spec).shard_shape(shape))
    shard = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        split = math.prod(sizes[a] for a in axes)
        shard.append(dim // split)
    return shape, dtype, tuple(shard)


@dataclass
class Tally:
    """Counts and bytes (global and per device) of a set of leaves."""

    count: int = 0
    bytes: int = 0
    device_bytes: int = 0
    leaves: list = field(default_factory=list)

    def add(self, path: str, shape, dtype, shard) -> None:
        n, k = int(np.prod(shape, dtype=np.int64)), int(np.prod(shard, dtype=np.int64))
        self.count += n
        self.bytes += n * dtype.itemsize
        self.device_bytes += k * dtype.itemsize
        self.leaves.append({"path": path, "shape": list(shape), "dtype": dtype.name, "shard": list(shard)})


def _tally(state, sizes, mesh, rules, keep=lambda path: True) -> Tally:
    out = Tally()
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        name = path_name(path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        if not hasattr(value, "shape"):   # optax.MaskedNode: a frozen parameter's missing moment
            continue
        if keep(name):
            out.add(name, *_leaf_layout(var, sizes, mesh, rules))
    return out


# --------------------------------------------------------------------------------------- activations
def _flash(numerics) -> bool:
    return numerics.attention == "cudnn" or (numerics.attention == "auto" and numerics.dtype == "bfloat16")


ATTENTION_SCORE_BYTES = 16   # XLA attention: float32 scores, softmax and their two gradients per score
LOGIT_BYTES = 8              # float32 logits and their gradient per logit


def _layer_none(s: int, b: int, h: int, a: int, c: int, flash: bool) -> float:
    """One layer's activations without remat: Korthikanti et al. 2022 eq. 1's ``34 s b h`` (16-bit,
    scaled to `c` bytes) plus XLA's float32 attention scores unless `flash` (module docstring)."""
    return 34 * s * b * h * c / 2 + (0 if flash else ATTENTION_SCORE_BYTES * a * s * s * b)


def loss_chunk(numerics) -> int:
    """Positions per chunk of the tiled loss (`dfm.train.tiled_loss`): ``numerics.loss_chunk``
    (0: the plain loss, whole logits)."""
    return int(numerics.loss_chunk)


def activation_bytes(dims: Dims, numerics, batch_per_device: int, vocab_split: int,
                     tower_trained: bool) -> dict[str, float]:
    """Estimated activation bytes per device of one microbatch (module docstring).

    `batch_per_device`: sequences per device in one microbatch. Returns ``{"decoder", "logits",
    "vision"}`` in bytes; "logits" counts one chunk's when ``numerics.loss_chunk > 0``.
    """
    s, b, h, a, L = dims.seq_len, batch_per_device, dims.hidden, dims.heads, dims.layers
    c = 2 if numerics.dtype == "bfloat16" else 4
    flash = _flash(numerics)
    one = _layer_none(s, b, h, a, c, flash)
    if numerics.remat == "none":
        decoder = L * one
    elif numerics.remat == "full":
        decoder = L * c * s * b * h + one
    else:   # "dots"
        decoder = L * c * s * b * (4 * h + 2 * dims.kv_dim + 2 * dims.intermediate) + one
    chunk = loss_chunk(numerics)
    positions = min(chunk, s) if chunk > 0 else s
    logits = (LOGIT_BYTES * b * positions * dims.vocab + 4 * dims.vocab * h) / vocab_split
    vision = 0.0
    if dims.vision and tower_trained:
        v = dims.vision
        vision = v["layers"] * _layer_none(v["seq_len"], b, v["hidden"], v["heads"], c, flash)
    return {"decoder": decoder, "logits": logits, "vision": vision}


# --------------------------------------------------------------------------------------- the plan
def plan(task, config, devices: int, device_memory: int | None = None, *, vocab: int | None = None,
         stages: list[str] | None = None, rules=None) -> dict:
    """The per-device memory of every training stage of `config` on `devices` devices.

    Args:
      task, config: from `experiments.registry.load_job`.
      devices: N, the devices of one training job.
      device_memory: bytes of one device (None: no fit verdict).
      vocab: vocabulary of the model (default: from the config, see `model_factory`).
      stages: config sections of the stages to plan (default: stage 1 and stage 2).
      rules: logical-axis rules (default `dfm.sharding.DEFAULT_RULES`).

    Returns:
      A JSON-ready dict: ``mesh``, ``parameters`` (count), per-stage rows in bytes per device
      (``stages[name]``: parameters, gradients, optimizer, activations, total, fits, headroom), the
      16-bytes-per-parameter rule of thumb, and notes.

    Raises:
      ValueError: a mesh that does not fit `devices`.
    """
    sizes = mesh_sizes(config.mesh, devices)
    cpu = jax.devices("cpu")
    mesh = (make_mesh(MeshConfig(**sizes), devices=cpu[:devices]) if devices <= len(cpu) else None)
    factory, dims = model_factory(task, config, vocab)
    model = nnx.eval_shape(factory)
    params_state = nnx.state(model, nnx.Param)
    params = _tally(params_state, sizes, mesh, rules)
    batch_shards = sizes["data"] * sizes["fsdp"]
    vocab_split = sizes["tensor"] if dims.vocab % sizes["tensor"] == 0 else 1
    numerics = config.numerics
    out = {"task": task.name, "config": config.name, "devices": devices, "mesh": sizes,
           "mesh_built": mesh is not None, "device_memory": device_memory, "parameters": params.count,
           "parameter_bytes": params.bytes, "stages": {},
           "rule_of_thumb": {"bytes_per_parameter": RULE_OF_THUMB_BYTES,
                             "total": RULE_OF_THUMB_BYTES * params.count,
                             "per_device": RULE_OF_THUMB_BYTES * params.count / devices},
           "numerics": {"dtype": numerics.dtype, "param_dtype": numerics.param_dtype, "remat": numerics.remat,
                        "microbatches": numerics.microbatches, "attention": numerics.attention,
                        "loss_chunk": loss_chunk(numerics)}}
    for stage in stages or training_stages(task, config):
        sc = getattr(config, stage)
        frozen = tuple(sc.frozen)
        tc = TrainConfig(steps=1, weight_decay=sc.weight_decay, frozen=frozen)
        opt = nnx.eval_shape(lambda tc=tc: nnx.Optimizer(factory(), make_optimizer(tc, lr_argument=True),
                                                     wrt=nnx.Param))
        opt_state = _tally(nnx.state(opt, nnx.OptState), sizes, mesh, rules)
        mask = {name for name, is_frozen in _named(frozen_mask(_plain(params_state), frozen)) if is_frozen}
        trainable = _tally(params_state, sizes, mesh, rules, keep=lambda p, mask=mask: p not in mask)
        grads = trainable.device_bytes
        if numerics.microbatches > 1:
            grads += sum(int(np.prod(leaf["shard"])) * 4 for leaf in params.leaves)
        if sc.batch_size % batch_shards:
            raise ValueError(f"{stage}.batch_size: {sc.batch_size} is not divisible by the batch mesh axes "
                             f"data x fsdp = {batch_shards}")
        per_device = sc.batch_size // batch_shards // numerics.microbatches
        tower_trained = task.name == "mllm" and "vision_tower" not in frozen
        act = activation_bytes(dims, numerics, max(per_device, 1), vocab_split, tower_trained)
        activations = sum(act.values())
        total = params.device_bytes + grads + opt_state.device_bytes + activations
        row = {"train": getattr(sc, "train", "all"), "frozen": list(frozen), "trainable": trainable.count,
               "batch_size": sc.batch_size, "sequences_per_device": per_device,
               "parameters": params.device_bytes, "gradients": grads, "optimizer": opt_state.device_bytes,
               "optimizer_global": opt_state.bytes, "activations": activations,
               "activations_detail": act, "total": total}
        if device_memory is not None:
            row["fits"] = bool(total <= device_memory)
            row["headroom"] = device_memory - total
        out["stages"][stage] = row
    out["seq_len"] = dims.seq_len
    out["parameter_leaves"] = params.leaves
    if device_memory is not None:
        out["fits"] = all(r["fits"] for r in out["stages"].values())
    return out


def _plain(state):
    return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def _named(tree):
    return [(path_name(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


# --------------------------------------------------------------------------------------- output
def format_plan(p: dict) -> str:
    """The plan as a plain-text (markdown) table, one column per stage."""
    stages = list(p["stages"])
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    n = {"loss_chunk": 0, **p["numerics"]}
    lines = [(f"plan: config {p['config']} (task {p['task']}) on {p['devices']} devices, mesh {mesh}"
             f"{'' if p['mesh_built'] else ' (layout computed from the PartitionSpecs; no mesh built)'}"),
             (f"parameters: {p['parameters']:,} ({p['parameters'] / 1e9:.3f} B), "
             f"{format_bytes(p['parameter_bytes'])} in {n['param_dtype']}; compute {n['dtype']}, remat "
             f"{n['remat']}, microbatches {n['microbatches']}, seq_len {p['seq_len']}, loss "
             f"{'tiled (chunk ' + str(n['loss_chunk']) + ')' if n['loss_chunk'] else 'plain (whole logits)'}"), ""]
    header = "| per device | " + " | ".join(f"{s} (train {p['stages'][s]['train']})" for s in stages) + " |"
    lines += [header, "|---|" + "---:|" * len(stages)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(p["stages"][s]) for s in stages) + " |")

    row("batch / sequences per device and microbatch",
        lambda r: f"{r['batch_size']} / {r['sequences_per_device']}")
    row("trainable parameters", lambda r: f"{r['trainable']:,}")
    row("parameters", lambda r: format_bytes(r["parameters"]))
    row("gradients", lambda r: format_bytes(r["gradients"]))
    row("optimizer state (AdamW mu, nu)", lambda r: format_bytes(r["optimizer"]))
    row("activations (estimate)", lambda r: format_bytes(r["activations"]))
    row("  decoder layers", lambda r: format_bytes(r["activations_detail"]["decoder"]))
    logits = (f"  logits (f32 + gradient, chunks of {n['loss_chunk']})" if n["loss_chunk"]
              else "  logits (f32 + gradient)")
    row(logits, lambda r: format_bytes(r["activations_detail"]["logits"]))
    row("  vision tower", lambda r: format_bytes(r["activations_detail"]["vision"]))
    row("**total**", lambda r: f"**{format_bytes(r['total'])}**")
    if p["device_memory"] is not None:
        row("device memory", lambda r: format_bytes(p["device_memory"]))
        row("fits", lambda r: ("yes" if r["fits"] else "NO") + f" (headroom {format_bytes(r['headroom'])})")
    t = p["rule_of_thumb"]
    lines += ["", (f"rule of thumb ({t['bytes_per_parameter']} B/parameter: f32 parameter + gradient + AdamW mu, nu): "
              f"{t['total'] / 1e9:.1f} GB total = {format_bytes(t['total'])}, "
              f"{format_bytes(t['per_device'])} per device if evenly sharded (no activations)"),
              ("parameters, gradients and optimizer state are exact layouts; activations are an estimate "
              "(Korthikanti et al. 2022 eq. 1 with the remat policy, float32 logits; see docs/plan.md)")]
    return "\n".join(lines)
