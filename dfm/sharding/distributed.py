"""Multi-process launch: one entry point on one machine, under SLURM, Cloud TPU and Kubernetes.

`initialize()` reads the environment (`detect_cluster`), calls `jax.distributed.initialize`
only when more than one process takes part, and does nothing on a single process. It must run
before the first JAX computation of the program (`jax.distributed.initialize` requires it).

Detection order (the first that matches wins):

1. `DFM_DISTRIBUTED=0`: never initialize (single process, whatever else is set).
2. explicit: `JAX_COORDINATOR_ADDRESS` (`host:port`), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
   (a plain shell loop over machines; also Kubernetes when `JOB_COMPLETION_INDEX` gives the id).
3. SLURM: `SLURM_JOB_ID`, `SLURM_NTASKS` > 1, `SLURM_PROCID`, `SLURM_LOCALID`,
   `SLURM_STEP_NODELIST` (one task per node or per GPU under `srun`); jax's own SLURM cluster
   derives the coordinator (first node of the step) and the ids.
4. Cloud TPU (GKE / xpk, multi-host TPU VMs): `TPU_WORKER_HOSTNAMES` (or
   `TPU_PROCESS_ADDRESSES`) listing more than one host, or `MEGASCALE_COORDINATOR_ADDRESS`
   (multislice); jax's TPU cluster reads the rest (worker id, metadata server).
5. `DFM_DISTRIBUTED=1`: initialize with jax's auto-detection anyway (e.g. a TPU VM pod slice
   launched with `gcloud compute tpus tpu-vm ssh --worker=all`, where the ids come from the
   metadata server rather than the environment).
6. otherwise: single process, nothing to do.

A SLURM array job of one task per expert (`SLURM_NTASKS=1`) is therefore single-process: each
decentralized expert trains alone, with no communication (docs/scale_out.md).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class ClusterSpec:
    """How this process takes part in a (possibly) multi-process run.

    Attributes:
      kind: "single", "explicit", "kubernetes", "slurm", "cloud_tpu" or "auto".
      coordinator_address: `host:port` of process 0's coordinator, or None (jax derives it).
      num_processes: number of processes, or None (jax derives it).
      process_id: this process's id in `[0, num_processes)`, or None (jax derives it).
      detection_method: jax `cluster_detection_method` to force ("slurm"), or None.
    """

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detection_method: str | None = None

    @property
    def multi_process(self) -> bool:
        """True when `jax.distributed.initialize` must be called."""
        return self.kind != "single"


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise ValueError(f"{name}: expected an integer environment variable, got {env[name]!r}") from err


def detect_cluster(environ: Mapping[str, str] | None = None) -> ClusterSpec:
    """Classify the launch environment (see the module docstring for the order).

    Args:
      environ: the environment to read (default `os.environ`); pure function of it.
    Returns:
      A `ClusterSpec`; `kind == "single"` means no `jax.distributed` initialization.
    Raises:
      ValueError: naming the variable, for a malformed explicit setup (non-integer counts, a
        process id outside `[0, num_processes)`, a partial set of the three `JAX_*` variables).
    """
    env = os.environ if environ is None else environ
    force = env.get("DFM_DISTRIBUTED", "").strip()
    if force not in ("", "0", "1"):
        raise ValueError(f"DFM_DISTRIBUTED: must be 0, 1 or unset, got {force!r}")
    if force == "0":
        return ClusterSpec("single")
    explicit = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES")
    if any(name in env for name in explicit):
        missing = [name for name in explicit if name not in env]
        if missing:
            raise ValueError(f"{missing[0]}: must be set together with {[n for n in explicit if n in env]}")
        num = _int_env(env, "JAX_NUM_PROCESSES")
        if num < 1:
            raise ValueError(f"JAX_NUM_PROCESSES: must be >= 1, got {num}")
        if "JAX_PROCESS_ID" in env:
            kind, pid = "explicit", _int_env(env, "JAX_PROCESS_ID")
        elif "JOB_COMPLETION_INDEX" in env:      # Kubernetes Indexed Job / JobSet
            kind, pid = "kubernetes", _int_env(env, "JOB_COMPLETION_INDEX")
        else:
            raise ValueError("JAX_PROCESS_ID: must be set with JAX_COORDINATOR_ADDRESS "
                             "(or run as a Kubernetes Indexed Job, which sets JOB_COMPLETION_INDEX)")
        if not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID: must lie in [0, {num}), got {pid}")
        if num == 1:
            return ClusterSpec("single")
        return ClusterSpec(kind, env["JAX_COORDINATOR_ADDRESS"], num, pid)
    slurm = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")
    if all(name in env for name in slurm) and _int_env(env, "SLURM_NTASKS") > 1:
        return ClusterSpec("slurm", detection_method="slurm")
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return ClusterSpec("cloud_tpu")
    if force == "1":
        return ClusterSpec("auto")
    return ClusterSpec("single")


def initialize(environ: Mapping[str, str] | None = None, *, timeout_s: int = 300) -> ClusterSpec:
    """Guarded `jax.distributed.initialize`: a no-op on a single process or if already initialized.

    Args:
      environ: environment to detect from (default `os.environ`).
      timeout_s: seconds to wait for all processes to reach the coordinator.
    Returns:
      The detected `ClusterSpec`.
    Raises:
      ValueError: from `detect_cluster`.
      RuntimeError: from jax when the coordinator cannot be reached in `timeout_s`.
    """
    spec = detect_cluster(environ)
    if not spec.multi_process or jax.distributed.is_initialized():
        return spec
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
        process_id=spec.process_id, cluster_detection_method=spec.detection_method,
        initialization_timeout=timeout_s)
    return spec


def is_main_process() -> bool:
    """True on process 0 (or a single process): the one that logs and writes reports."""
    return jax.process_index() == 0
