"""CPU smoke test of ``benchmarks/bench_gpu.py --config tiny`` (ours vs HF transformers): every row
runs and reports finite numbers, none fails, and our greedy decoding repeats its tokens. No timing
is asserted."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.peer]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
TRAIN_ROWS = ("train", "train_xla", "train_remat_dots", "train_remat_full", "train_scan", "train_micro2",
              "train_dfm", "train_hf")


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)     # conftest's 8 simulated devices: not wanted in the benchmark
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--out", str(out), *extra],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_config_runs_every_row(tmp_path):
    result = run_bench(tmp_path)
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    assert [r for r in rows if "skipped" in r] == []
    names = {r["row"] for r in rows}
    for name in ("matmul", *TRAIN_ROWS, "decode", "decode_hf"):
        assert name in names, name
    matmul = [r for r in rows if r["row"] == "matmul"]
    assert len(matmul) == 2 and all(positive(r["tflops"]) for r in matmul)
    for r in rows:
        if r["row"] in TRAIN_ROWS:
            assert positive(r["tok_s"]) and positive(r["model_tflops"]) and positive(r["of_dot_ceiling"]), r["case"]
            assert math.isfinite(r["loss"]), r["case"]
    decode = {(r["row"], r["batch"]): r for r in rows if r["row"].startswith("decode")}
    assert set(decode) == {(row, b) for row in ("decode", "decode_hf") for b in (1, 4)}
    for (row, _), r in decode.items():
        assert positive(r["tok_s"]) and positive(r["ms_per_token"]), r["case"]
        if row == "decode":
            assert r["tokens_repeat"] is True, r["case"]
    assert result["env"]["device_kind"] and result["env"]["transformers"] and result["env"]["torch"]
    assert "| system | step ms |" in result["markdown"]
    assert result["ratios"]


def test_isolated_rows_run_in_subprocesses(tmp_path):
    result = run_bench(tmp_path, "--rows", "matmul", "--isolate", "yes", "--repeats", "1")
    assert result["isolated"] is True
    assert [r["case"].split()[0] for r in result["rows"]] == ["jnp.dot", "torch.matmul"]
    assert all(positive(r["tflops"]) and "error" not in r for r in result["rows"])
    assert result["env"]["jax"] and result["env"]["torch"]
