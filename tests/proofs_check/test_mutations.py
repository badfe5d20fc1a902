"""Mutation tests of proofs_check's library cross-checks: a deliberate bug in the library (dfm/) must make the
rows that check it FAIL (exit status 1).

Each test copies ``dfm/`` and ``proofs_check/`` into a temporary directory, applies one bug as a textual
replacement (the original snippet must be present: if the library code changes, the test fails loudly instead
of silently testing nothing) and runs ``python -m proofs_check --only <rows> --cases N --seed 0`` in a
subprocess with the copy as working directory and first on ``PYTHONPATH`` (the package is also installed
editable from the repository: the test checks that the copy is what gets imported). The unmutated copy must
pass the same rows. Where a mutation lists rows that must still PASS, the bug is caught by its own row only
(among those). One mutation is of proofs_check itself: THEORY S7's old, false statement put in place of the
proven per-step bound must make row S7 FAIL.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = 20
TIMEOUT = 300


def _posterior_to_velocity_without_gating(text: str) -> str:
    """Remove the mask gating line of ``posterior_to_velocity`` (not the one of ``conditional_velocity``); the
    ``if`` above it keeps a ``pass``."""
    head, sep, tail = text.partition("def posterior_to_velocity(")
    assert sep, "dfm/velocities.py: posterior_to_velocity not found"
    line = "        u = jnp.where((x_t == mask_id)[..., None], u, 0.0)\n"
    body, sep2, rest = tail.partition("\ndef ")
    assert body.count(line) == 1, "dfm/velocities.py: posterior_to_velocity's mask gating line changed"
    return head + sep + body.replace(line, "        pass  # mutation: no mask gating\n") + sep2 + rest


def _decoder_router_never_updates(text: str) -> str:
    """``mixture_decode`` replaces its router by the fixed weights of the router's initial state: the Bayes
    filter is never updated with the generated tokens."""
    line = "    batch, vocab = starts[0][1].shape\n"
    assert text.count(line) == 1, "dfm/decentral/decoding.py: _decode's first line changed"
    return text.replace(line, line + "    from dfm.decentral.routers import FixedRouter\n"
                        "    router = FixedRouter(router.weights(router.init(batch)))  # mutation: never updated\n")


# name: (file, original snippet, replacement (or a function of the file text), rows that must FAIL[, rows that
# must still PASS: the bug is caught by its own row and not by these])
MUTATIONS = {
    "top_k_keeps_smallest": (
        "dfm/decentral/routers.py", "_, idx = jax.lax.top_k(weights, k)", "_, idx = jax.lax.top_k(-weights, k)",
        ["S12", "S13"]),
    "bayes_filter_half_evidence": (
        "dfm/decentral/routers.py", "return jax.nn.log_softmax(state + lp, axis=-1)",
        "return jax.nn.log_softmax(state + 0.5 * lp, axis=-1)", ["S9", "S11"]),
    "centroid_weights_times_temperature": (
        "dfm/decentral/routers.py", "w = jax.nn.softmax(cosines / temperature, axis=-1)",
        "w = jax.nn.softmax(cosines * temperature, axis=-1)", ["S13"]),
    "mix_log_probs_mixes_logits": (
        "dfm/decentral/mixing.py", "return _weighted_logsumexp(w, jax.nn.log_softmax(expert_logits, axis=-1))",
        "return jax.nn.log_softmax(jnp.sum(w * expert_logits, axis=0), axis=-1)", ["S8", "S13"]),
    "sampler_always_jumps": (
        "dfm/samplers.py", "u = posterior_to_velocity(probs, x, rate, mask_id=mask_id)",
        "u = posterior_to_velocity(probs, x, jnp.ones_like(rate), mask_id=mask_id)", ["S5", "S6", "S7"]),
    "posterior_to_velocity_without_mask_gating": (
        "dfm/velocities.py", "u = jnp.where((x_t == mask_id)[..., None], u, 0.0)",
        _posterior_to_velocity_without_gating, ["S4", "S7"]),
    # THEORY S7's old statement "the two rates differ by O(h^2) per step": its bound, h^2 max|kappa''| / 2 without
    # the factor 1 / (1 - kappa(t_s)), put in place of the proven one. False for the cosine and t^2: S7 FAILs.
    "s7_old_claim_o_h2_per_step": (
        "proofs_check/schedulers.py", "bound = h**2 * sch.d2_max(t, t + h) / (2.0 * sch.survival(t))",
        "bound = h**2 * sch.d2_max(t, t + h) / 2.0  # mutation: the old claim, O(h^2) per step", ["S7"], ["S6"]),
    # a wrong rate inside the sampler's loop (each step uses the previous step's rates): only the law of the
    # drawn tokens shows it (the kernel rows call transition_probabilities directly; the ensemble rows check
    # the posterior at the visited states)
    "sampler_loop_rate_one_step_late": (
        "dfm/samplers.py", "    scanned = (keys, rates, times) if dense else (keys, rates, times, positions, valid)",
        "    late = jnp.concatenate([rates[:1], rates[:-1]], axis=0)  # mutation: the previous step's rates\n"
        "    scanned = (keys, late, times) if dense else (keys, late, times, positions, valid)",
        ["S7.law"], ["S5", "S6", "S7", "S8", "S9"]),
    # a lost-expert restriction that forgets to renormalise the router over the available experts
    "available_weights_not_renormalised": (
        "dfm/decentral/mixing.py", "return jax.nn.softmax(log_w, axis=-1), empty", "return jnp.exp(log_w), empty",
        ["S8.avail"], ["S8", "S9"]),
    # a mixture decoder whose router state never updates
    "mixture_decode_router_never_updates": (
        "dfm/decentral/decoding.py", "batch, vocab = starts[0][1].shape", _decoder_router_never_updates,
        ["S9.decode"], ["S9"]),
}


def _order(row: str) -> tuple:
    num, _, sub = row[1:].partition(".")
    return int(num), sub


ALL_ROWS = sorted({r for m in MUTATIONS.values() for rows in m[3:] for r in rows}, key=_order)


def _copy(tmp_path: pathlib.Path) -> pathlib.Path:
    dest = tmp_path / "copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("dfm", "proofs_check"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=ignore)
    return dest


def _env(copy: pathlib.Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _run(copy: pathlib.Path, rows: list[str], cases: int = CASES) -> subprocess.CompletedProcess:
    code = "import dfm, proofs_check; print(dfm.__file__, proofs_check.__file__)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True,
                           timeout=TIMEOUT, check=False)
    assert probe.returncode == 0, probe.stderr
    for line in probe.stdout.split():
        assert pathlib.Path(line).resolve().is_relative_to(copy.resolve()), f"imported {line}, not the copy {copy}"
    return subprocess.run([sys.executable, "-m", "proofs_check", "--only", ",".join(rows), "--cases", str(cases),
                           "--seed", "0"], cwd=copy, env=_env(copy), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def _verdicts(stdout: str) -> dict[str, str]:
    """Row id -> PASS / FAIL from the printed table."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^\W*(S\d+(?:\.[a-z]+)?)\s.*\b(PASS|FAIL)\b", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_library_bug_makes_its_rows_fail(name, tmp_path):
    path, original, replacement, rows, *rest = MUTATIONS[name]
    passing = rest[0] if rest else []
    copy = _copy(tmp_path)
    target = copy / path
    text = target.read_text()
    assert original in text, f"{path}: the snippet {original!r} is not in the library any more; update this test"
    target.write_text(replacement(text) if callable(replacement) else text.replace(original, replacement, 1))
    assert target.read_text() != text
    proc = _run(copy, rows + passing)
    verdicts = _verdicts(proc.stdout)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    for row in rows:
        assert verdicts.get(row) == "FAIL", (name, row, verdicts, proc.stdout[-3000:])
    for row in passing:
        assert verdicts.get(row) == "PASS", (name, row, "another row caught the bug", verdicts)


@pytest.mark.slow
def test_unmutated_copy_passes_the_same_rows(tmp_path):
    copy = _copy(tmp_path)
    proc = _run(copy, ALL_ROWS)
    verdicts = _verdicts(proc.stdout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert verdicts == dict.fromkeys(ALL_ROWS, "PASS"), verdicts
