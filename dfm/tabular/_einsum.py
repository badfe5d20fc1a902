"""np.einsum with the contraction path cached per (subscripts, shapes): the engine calls the
same few contractions thousands of times on small arrays, where path search would dominate."""
from __future__ import annotations

import numpy as np

_PATHS: dict = {}


def einsum(*operands_and_sublists):
    """``np.einsum`` in sublist form (``op0, sub0, op1, sub1, ..., out``) with a cached path."""
    ops = operands_and_sublists[0:-1:2]
    subs = operands_and_sublists[1:-1:2]
    out = operands_and_sublists[-1]
    key = (tuple(tuple(s) for s in subs), tuple(out), tuple(np.shape(o) for o in ops))
    path = _PATHS.get(key)
    if path is None:
        path = np.einsum_path(*operands_and_sublists, optimize="greedy")[0]
        _PATHS[key] = path
    return np.einsum(*operands_and_sublists, optimize=path)
