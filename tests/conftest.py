"""Shared pytest configuration: 8 simulated CPU devices, a session XLA compile cache, the `gpu` marker, hypothesis.

`ci` (default) keeps property tests fast; run `pytest --hypothesis-profile=deep` for many more examples.

On a GPU machine (docs/accelerators.md) `jax.devices()` is the GPU(s) while the 8 simulated CPU
devices stay available as `jax.devices("cpu")`: the sharding tests build their meshes from those
(`tiny_models.cpu_devices`). Tests marked `gpu` run only when `jax.default_backend() == "gpu"`.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

# Simulate 8 CPU devices for the sharding tests; must be set before jax is first imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# `pytest -n N` on one GPU: without this each worker process would reserve 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One persistent XLA compilation cache for the session (the controller makes it; xdist workers and the jobs the
# tests start in subprocesses inherit it): the many tiny models of the suite compile once, not once per test.
# It changes no result (an entry is keyed by the program, the flags and the backend) and is removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="dfm-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests unless JAX's default backend is a GPU."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    import jax  # here, not at the top: XLA_FLAGS above must be set before jax initializes

    backend = jax.default_backend()
    if backend == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU backend (jax.default_backend() is {backend!r})")
    for item in marked:
        item.add_marker(skip)
