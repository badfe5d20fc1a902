"""Tiny decoders shared by the training, sharding and multi-process tests, and the backend helpers
those tests need to run on a GPU machine too.

`tiny_decoder` draws the default-init distribution (normal(0.02) weights, unit norm scales) from a
seeded numpy Generator into an abstract module, which avoids compiling `jax.random` once per
parameter shape. `cpu_devices(n)` gives the simulated CPU devices (conftest) for meshes whatever the
default backend; `bit_exact_reruns` / `assert_same_run` / `same_numbers` state what a resumed or
repeated run must reproduce (docs/accelerators.md). Importable from tests (pyproject's
`pythonpath = ["tests"]`) and from test files run as scripts (`tests/` on their PYTHONPATH).
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfm.models import Decoder


def tiny_decoder(config, seed: int = 0) -> Decoder:
    """A `Decoder(config)` with parameters drawn from `numpy.random.default_rng(seed)`."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.ones(var.shape) if path[-1] == "scale" else 0.02 * rng.standard_normal(var.shape)
        var.set_raw_value(jnp.asarray(value, var.dtype))
    return model


def lm_loss(model, batch, key):
    """Next-token NLL plus a small key-dependent term, so the per-step key matters for exact resume."""
    logits = model(batch[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    noise = 1e-3 * jax.random.normal(key, ()) * jnp.sum(model.norm.scale[...])
    return nll + noise, {"nll": nll, "tokens": batch[:, 1:].size}


# ------------------------------------------------------------------------------------ backends
def cpu_devices(n: int) -> list:
    """The first `n` CPU devices (conftest simulates 8), also when the default backend is a GPU.

    Skips the calling test when fewer exist (XLA_FLAGS set by hand without
    `--xla_force_host_platform_device_count`).
    """
    import pytest

    devices = jax.devices("cpu")
    if len(devices) < n:
        pytest.skip(f"needs {n} CPU devices, have {len(devices)} (XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={n}, set by tests/conftest.py unless XLA_FLAGS has it)")
    return devices[:n]


def on_cpu():
    """Context: computations on uncommitted arrays (and fresh arrays) run on the first CPU device."""
    return jax.default_device(jax.devices("cpu")[0])


_DETERMINISTIC = re.compile(r"--xla_gpu_deterministic_ops(=(true|1))?(\s|$)")
RESUME_RTOL, RESUME_ATOL = 1e-4, 5e-5


def bit_exact_reruns() -> bool:
    """True when the same jitted training step on the same data gives bit-identical results run
    after run: always off GPU; on a GPU only with `XLA_FLAGS=--xla_gpu_deterministic_ops=true`.

    Without that flag XLA:GPU reduces some sums (scatter-add of the embedding gradient, split
    reductions) with atomics in a varying order, so a resumed run agrees with an uninterrupted one
    to float rounding only (observed: parameters 4e-9 .. 6e-6 apart after a few steps).
    """
    if jax.default_backend() != "gpu":
        return True
    return bool(_DETERMINISTIC.search(os.environ.get("XLA_FLAGS", "")))


def assert_same_run(actual, desired, err_msg: str = "") -> None:
    """Arrays two runs of the same training must agree on: bit-identical where `bit_exact_reruns()`,
    else within rtol 1e-4 / atol 5e-5 (nondeterministic GPU reductions; parameters are ~2e-2 and
    Adam can turn a rounding-level gradient difference on a near-zero entry into a larger step)."""
    if bit_exact_reruns():
        np.testing.assert_array_equal(actual, desired, err_msg=err_msg)
    else:
        np.testing.assert_allclose(actual, desired, rtol=RESUME_RTOL, atol=RESUME_ATOL, err_msg=err_msg)


def same_numbers(a, b) -> bool:
    """`a == b` for numbers, or dicts / lists of them (losses, history rows): exact where
    `bit_exact_reruns()`, else within a relative 1e-4 (see `assert_same_run`)."""
    if bit_exact_reruns():
        return a == b
    import pytest

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=RESUME_RTOL)
    return a == b


# ----------------------------------------------------------------- vision towers (tests/dfm/models)
def build(cls, config, seed=0, scale=0.2):
    """`cls(config)` with every parameter drawn from a seeded numpy Generator (norm scales around 1),
    filled into an abstract module (no jax.random compile per shape)."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_raw_value(jnp.asarray(base + scale * rng.standard_normal(var.shape), var.dtype))
    return model


def load_hf(model, state_dict, key_of=lambda name: name):
    """Copy a torch `state_dict` into `model` by mechanical name mapping: our path joined with "."
    with `kernel` / `scale` / `embedding` -> `weight` (mapped by `key_of`); Linear kernels are the
    torch weights transposed, conv kernels `(out, in, kh, kw) -> (kh, kw, in, out)`.
    Returns the state-dict keys no parameter used."""
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *module, leaf = [str(p) for p in path]
        key = key_of(".".join(module + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf]))
        value = state_dict[key].detach().numpy()
        if leaf == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
        assert value.shape == tuple(var.shape), (key, value.shape, var.shape)
        var.set_raw_value(jnp.asarray(value, var.dtype))
        used.add(key)
    return set(state_dict) - used


def perturb(torch, module, seed=0, scale=0.1):
    """Add seeded noise to every torch parameter (HF inits norms to 1/0, cls/pos to 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def record_context_length(path, context: int) -> None:
    """Write ``max_position_embeddings = context`` into every expert's ``config.json`` of a
    `dfm.save_decentralized` directory, as transformers records a model's context (the export does not
    write it yet, so the API's context checks need it set by hand)."""
    import json
    from pathlib import Path

    for file in sorted(Path(path).glob("experts/expert_*/config.json")):
        file.write_text(json.dumps(json.loads(file.read_text()) | {"max_position_embeddings": context}))
