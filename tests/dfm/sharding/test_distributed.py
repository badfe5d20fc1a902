"""Tests for dfm.sharding.distributed: launch detection, and a real 2-process run on loopback.

The 2-process test starts two Python processes (this file run as a script), each with 2 simulated
CPU devices, a `jax.distributed` coordinator on 127.0.0.1 (free port), cross-process collectives
over gloo (jax's default CPU collectives), an FSDP mesh over the 4 global devices, and two
`dfm.train.train` steps fed by `jax.make_array_from_process_local_data`. Both processes must report
the same losses, equal to one process training on the whole batch.

The workers run with `JAX_PLATFORMS=cpu` and the one-process reference on this process's first CPU
device, so on a GPU machine the test compares CPU with CPU (as it does everywhere else).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 2
GLOBAL_BATCH, LENGTH, VOCAB = 8, 12, 64


# ----------------------------------------------------------------------------- shared by the workers
def _new_model(seed=0):
    from tiny_models import tiny_decoder

    from dfm.models import DecoderConfig

    config = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                           num_kv_heads=2)
    return tiny_decoder(config, seed)


def _lm_loss(model, batch, key):
    from tiny_models import lm_loss

    return lm_loss(model, batch, key)


def _global_batch(step):
    import numpy as np

    return np.random.default_rng(100 + step).integers(0, VOCAB, (GLOBAL_BATCH, LENGTH)).astype(np.int32)


def _train_config():
    from dfm.train import TrainConfig

    return TrainConfig(steps=STEPS, learning_rate=5e-3, log_every=1, seed=3)


def _worker(out_path: str) -> None:
    """One process of the 2-process run (reads JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID)."""
    from dfm.sharding import MeshConfig, initialize, is_main_process, make_mesh

    spec = initialize(timeout_s=60)                      # before any other JAX work
    import jax

    from dfm.train import train

    pid, count = jax.process_index(), jax.process_count()
    rows = GLOBAL_BATCH // count
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))     # FSDP over all 4 devices of both processes
    result = train(_new_model(), _lm_loss, lambda step: _global_batch(step)[pid * rows:(pid + 1) * rows],
                   _train_config(), progress=False, mesh=mesh)
    kernel = result.model.layers[0].mlp.gate_proj.kernel[...]
    report = {
        "kind": spec.kind, "process_index": pid, "process_count": count, "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(), "main": is_main_process(),
        "collectives": jax.config.jax_cpu_collectives_implementation,
        "kernel_spec": str(kernel.sharding.spec), "kernel_fully_addressable": kernel.is_fully_addressable,
        "history": [{k: row[k] for k in ("step", "loss", "nll", "grad_norm")} for row in result.history],
    }
    Path(out_path).write_text(json.dumps(report))
    jax.distributed.shutdown()


# ------------------------------------------------------------------------------------ detection
def test_detect_cluster_reads_each_launcher():
    from dfm.sharding import ClusterSpec, detect_cluster

    assert detect_cluster({}) == ClusterSpec("single")
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert detect_cluster(explicit) == ClusterSpec("explicit", "10.0.0.1:1234", 4, 2)
    assert detect_cluster({**explicit, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}).kind == "single"
    k8s = {"JAX_COORDINATOR_ADDRESS": "dfm-0.dfm:1234", "JAX_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "1"}
    assert detect_cluster(k8s) == ClusterSpec("kubernetes", "dfm-0.dfm:1234", 2, 1)
    slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "node[1-2]"}
    assert detect_cluster(slurm) == ClusterSpec("slurm", detection_method="slurm")
    assert detect_cluster({**slurm, "SLURM_NTASKS": "1"}).kind == "single"       # one array task = one expert
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4", "TPU_WORKER_ID": "0"}).kind == "cloud_tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"  # single-host TPU VM
    assert detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "c:8080"}).kind == "cloud_tpu"
    assert detect_cluster({"DFM_DISTRIBUTED": "1"}).kind == "auto"
    assert detect_cluster({**slurm, "DFM_DISTRIBUTED": "0"}).kind == "single"
    assert not ClusterSpec("single").multi_process and ClusterSpec("slurm").multi_process


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "^JAX_NUM_PROCESSES:"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "^JAX_PROCESS_ID: must be set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "^JAX_NUM_PROCESSES:"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"^JAX_PROCESS_ID: .*\[0, 2\)"),
    ({"DFM_DISTRIBUTED": "yes"}, "^DFM_DISTRIBUTED:"),
])
def test_detect_cluster_rejects_malformed_setups(env, message):
    from dfm.sharding import detect_cluster

    with pytest.raises(ValueError, match=message):
        detect_cluster(env)


def test_initialize_is_a_no_op_on_a_single_process():
    import jax

    from dfm.sharding import initialize, is_main_process

    assert initialize({}).kind == "single"
    assert not jax.distributed.is_initialized()
    assert is_main_process() and jax.process_count() == 1


# ------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_loopback_train_with_equal_losses(tmp_path):
    port = _free_port()
    repo = Path(__file__).resolve().parents[3]
    procs, outs = [], []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "DFM_"))}
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests"), env.get("PYTHONPATH", "")]))
        outs.append(tmp_path / f"process{pid}.json")
        procs.append(subprocess.Popen([sys.executable, __file__, str(outs[-1])], env=env, cwd=repo,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # meanwhile: the same two steps in this process, on one device, with the whole batch
    import jax.numpy as jnp
    from tiny_models import on_cpu

    from dfm.train import train

    with on_cpu():
        reference = train(_new_model(), _lm_loss, lambda step: jnp.asarray(_global_batch(step)), _train_config(),
                          progress=False)
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the 2-process run did not finish in 150 s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    reports = [json.loads(out.read_text()) for out in outs]
    print("2-process histories:", [rep["history"] for rep in reports], "one device:", reference.history)
    for pid, rep in enumerate(reports):
        assert rep["kind"] == "explicit" and rep["process_index"] == pid and rep["main"] == (pid == 0)
        assert (rep["process_count"], rep["device_count"], rep["local_device_count"]) == (2, 4, 2)
        assert rep["collectives"] == "gloo"
        assert rep["kernel_spec"] == "P('fsdp', None)" and not rep["kernel_fully_addressable"]
        assert [row["step"] for row in rep["history"]] == [1, 2]
    assert reports[0]["history"] == reports[1]["history"]          # one replicated loss, bit-identical
    for row, ref in zip(reports[0]["history"], reference.history, strict=True):
        for key in ("loss", "nll", "grad_norm"):
            assert abs(row[key] - ref[key]) <= 1e-5, (key, row[key], ref[key])
    assert reports[0]["history"][1]["loss"] != reports[0]["history"][0]["loss"]


if __name__ == "__main__":
    _worker(sys.argv[1])
