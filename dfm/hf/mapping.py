"""Our NNX parameter paths <-> HF state-dict keys, per architecture, with the alternative prefixes.

Inside a module our names follow transformers' (`layers.0.self_attn.q_proj`, `encoder.layers.1.mlp.fc1`,
...); only the leaf differs: flax `kernel` / `scale` / `embedding` are torch `weight`, `bias` is
`bias`, and a bare parameter (`class_embedding`, `lambda_1`, `cls_token`) keeps its name. Layouts:
a Linear `kernel [in, out]` is the torch `weight [out, in]` transposed; a Conv `kernel [kh, kw,
in, out]` is the torch `weight [out, in, kh, kw]` permuted; everything else is stored as is (a
leading axis of size 1 that one side has and the other lacks is reshaped away).

The prefix in front depends on the architecture and on who wrote the file. A `Rule` maps the
start of our path to HF prefixes: the first is what `save_pretrained` of transformers 5 writes
(and what we export), the others are accepted on import. Llama / Qwen2: `DECODER_RULES` here;
CLIP, LLaVA, InternVL: `dfm.hf.vision_io` (in-memory names such as `model.language_model.` and the
hub's `language_model.model.`, `vision_tower.vision_model.`; transformers' `conversion_mapping.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Path = tuple  # an nnx flat-state path, e.g. ("layers", 0, "self_attn", "q_proj", "kernel")

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def leaf_key(path: Path) -> str:
    """The HF key of `path` relative to its module prefix, e.g. `("norm", "scale") -> "norm.weight"`."""
    *module, leaf = (str(p) for p in path)
    name = "weight" if leaf in _WEIGHT_LEAVES else leaf
    return ".".join([*module, name])


@dataclass(frozen=True)
class Rule:
    """Our paths starting with `ours` live under the HF key prefixes `hf` (first = canonical): the
    matched part of the path is replaced by the prefix, e.g. `Rule(("lm_head",), ("lm_head.",))`."""

    ours: tuple
    hf: tuple[str, ...]


def hf_candidates(rules: Sequence[Rule], path: Path) -> list[str]:
    """HF keys to try for `path`, canonical first (the rule with the longest matching `ours` wins).

    Raises ValueError when no rule matches (a bug in the rule table, naming the path).
    """
    best = None
    for rule in rules:
        n = len(rule.ours)
        if tuple(path[:n]) == rule.ours and (best is None or n > len(best.ours)):
            best = rule
    if best is None:
        raise ValueError(f"no HF key rule for parameter {'.'.join(map(str, path))}")
    rest = leaf_key(path[len(best.ours):])
    return [prefix + rest for prefix in best.hf]


def hf_key(rules: Sequence[Rule], path: Path) -> str:
    """The canonical HF key of `path` (what export writes)."""
    return hf_candidates(rules, path)[0]


def to_ours(path: Path, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Convert an HF tensor to the layout of our parameter `path` of `shape` (module doc).

    Raises ValueError naming both shapes when they do not fit.
    """
    if path[-1] == "kernel" and value.ndim == 2:
        value = value.T
    elif path[-1] == "kernel" and value.ndim == 4:
        value = np.transpose(value, (2, 3, 1, 0))
    if value.shape != tuple(shape):
        if _squeezed(value.shape) != _squeezed(shape):
            raise ValueError(f"shape {value.shape} (in our layout) does not match the parameter's {tuple(shape)}")
        value = value.reshape(shape)
    return value


def to_hf(path: Path, value: np.ndarray, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of `to_ours`: our parameter value -> the torch layout (reshaped to `hf_shape` if given)."""
    if path[-1] == "kernel" and value.ndim == 2:
        value = value.T
    elif path[-1] == "kernel" and value.ndim == 4:
        value = np.transpose(value, (3, 2, 0, 1))
    if hf_shape is not None and value.shape != tuple(hf_shape):
        value = value.reshape(hf_shape)
    return value


def _squeezed(shape) -> tuple:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


# ---------------------------------------------------------------------- rule tables
DECODER_RULES = (Rule((), ("model.",)), Rule(("lm_head",), ("lm_head.",)))
"""`LlamaForCausalLM` / `Qwen2ForCausalLM`: body under `model.`, head `lm_head.` (vision: `dfm.hf.vision_io`)."""
