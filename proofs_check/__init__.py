"""proofs_check: verify every THEORY statement S1-S13 on many random cases, exactly, in float64.

Run ``python -m proofs_check [--cases N] [--seed S] [--json PATH] [--only S1,S5,S7.law]``. Each statement
is checked by exact enumeration with the numpy engine :mod:`dfm.tabular` (vocab 2-4, length 2-4,
dirichlet / sparse / peaked laws, random per-position schedules); S3 and S5 also by sympy on a
generic small case. Every row S1-S13 also evaluates the JAX library (float64, ``jax.enable_x64``) on
the same cases when jax and the other third-party dependencies are installed (``--no-library`` to skip;
an import error inside ``dfm`` itself is not a skip: the rows run and FAIL with it) and FAILs if it
disagrees with the enumeration by more than 1e-12 (method "enumeration + library" or "both + library"):

* S1, S2: ``dfm.velocities.validity_error``, ``continuity_residual``;
* S3: joint kernels from ``dfm.velocities.conditional_velocity`` mixed with the exact posterior,
  judged valid and generating by the library;
* S4: ``conditional_velocity`` and ``posterior_to_velocity`` on every state (random posteriors on
  unreachable states, against the formula);
* S5: ``dfm.losses.dfm_cross_entropy``, ``ar_nll``, and (c) the sampler's own kernel
  ``dfm.samplers.transition_probabilities`` under ``dfm.schedules.autoregressive``;
* S6, S7: the sampler's kernel on block schedules (law, KL = sum of TC) and as an Euler step;
  ``from_kappa(...).rates()`` (reveal-step laws), ``euler_rates``, ``discretize`` of the library's schedulers;
* S7.law (sampled): the laws of the draws of ``sample_discrete``, ``sample_euler``, ``sample_masked_path``,
  ``sample_path`` at every step (chi-square; the only statistical rows are S7.law and S9.decode);
* S8: ``dfm.decentral.mix_log_probs`` with the exact router, and ``ensemble_posterior_fn`` with a
  ``CallableRouter`` inside ``dfm.samplers.sample_discrete`` (64 trajectories per case);
* S8.avail: ``available_weights``, ``mixture_token_log_probs(available=)`` and ``ensemble_posterior_fn(available=)``
  against the exact router / denoiser of the mixture of the available experts;
* S9: ``BayesFilterRouter`` (online, batch), ``mixture_token_log_probs``, and the Bayes-filter
  ensemble inside ``sample_discrete`` (64 trajectories per case);
* S9.decode: ``mixture_decode`` of exact cached experts (greedy path, and the law of sampled continuations);
* S10: ``router_objective``; S11: ``ar_nll`` and ``mixture_token_log_probs``;
* S12: ``CentroidRouter(Partition, T, top_k=1)``; S13: ``top_k``, ``centroid_weights``,
  ``mix_log_probs`` with truncated weights.

Library functions are jitted once per padded shape (see :mod:`proofs_check.library`); numpy's BLAS
runs on one thread. One table row per statement (plus the three library rows above); exit status 1 if any
row fails.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from proofs_check import library as lib
from proofs_check.available import check_available
from proofs_check.decode import check_decode
from proofs_check.report import Row, print_table, write_json
from proofs_check.s1_s3 import check_s1, check_s2, check_s3
from proofs_check.s4_s5 import check_s4, check_s5
from proofs_check.s6_s7 import check_s6, check_s7
from proofs_check.s8_s10 import check_s8, check_s9, check_s10
from proofs_check.s11_s13 import check_s11, check_s12, check_s13
from proofs_check.sampled import check_law

CHECKS = {
    "S1": check_s1, "S2": check_s2, "S3": check_s3, "S4": check_s4, "S5": check_s5, "S6": check_s6,
    "S7": check_s7, "S7.law": check_law, "S8": check_s8, "S8.avail": check_available, "S9": check_s9,
    "S9.decode": check_decode, "S10": check_s10, "S11": check_s11, "S12": check_s12, "S13": check_s13,
}
#: The rows that check a statement itself (S1-S13) and the rows that check the library's realization of one
#: (``S7.law``: the samplers' draws; ``S8.avail``: lost experts; ``S9.decode``: ``mixture_decode``).
STATEMENTS = tuple(sid for sid in CHECKS if "." not in sid)
DEFAULT_CASES = 1000


LIBRARY_ROWS = tuple(CHECKS)  # every row has a library cross-check


def row_seed(sid: str) -> list[int]:
    """The Generator seed of a row beside the run's seed: ``[n]`` for ``Sn``, ``[n, j]`` for its j-th sub-row
    (``S7.law`` -> ``[7, 1]``), so that adding a sub-row changes no other row's cases."""
    num, _, sub = sid[1:].partition(".")
    if not sub:
        return [int(num)]
    subs = [s for s in CHECKS if s.startswith(f"S{num}.")]
    return [int(num), subs.index(sid) + 1]


def canonical(sid: str) -> str:
    """The row id as spelled in CHECKS (``--only`` is case-insensitive: ``s7.law`` -> ``S7.law``)."""
    for key in CHECKS:
        if key.upper() == sid.strip().upper():
            return key
    return sid


def _one_blas_thread():
    """numpy's BLAS limited to one thread: the enumeration makes many small matrix products, for which BLAS
    threads only add synchronization (about 2x the wall time on a loaded 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_checks(cases: int = DEFAULT_CASES, seed: int = 0, only=None, library: bool | None = None) -> list[Row]:
    """Run the selected checks (all by default); each statement gets its own Generator from ``seed``.

    library: also compare the JAX library (``dfm.velocities``, ``dfm.losses``, ``dfm.samplers``,
    ``dfm.schedules``, ``dfm.decentral``) with the enumeration on every row; None means "if it imports".
    """
    ids = list(CHECKS) if not only else [canonical(i) for i in only]
    unknown = [i for i in ids if i not in CHECKS]
    if unknown:
        raise ValueError(f"only must name statements among {list(CHECKS)}, got {unknown}")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    note = ""
    if library is None or library:
        ok, reason = lib.available()
        if library and not ok:
            raise ValueError(f"library requested but the dfm modules do not import: {reason}")
        library, note = ok, ("" if ok else f"library cross-check skipped: {reason}")
    rows = []
    with _one_blas_thread():
        for sid in ids:
            rng = np.random.default_rng([seed] + row_seed(sid))
            start = time.process_time()
            with_library = library and sid in LIBRARY_ROWS
            row = CHECKS[sid](rng, cases, library=True) if with_library else CHECKS[sid](rng, cases)
            row.seconds = time.process_time() - start
            if note and sid in LIBRARY_ROWS:
                row.extra.append(note)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """Command line entry point; returns the exit status (0 all pass, 1 any FAIL)."""
    parser = argparse.ArgumentParser(prog="python -m proofs_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help="random cases per statement (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the numpy Generators")
    parser.add_argument("--json", default=None, help="write the rows as a JSON list to this path")
    parser.add_argument("--only", default=None, help="comma-separated row ids, e.g. S1,S5,S7.law (any case)")
    parser.add_argument("--no-library", action="store_true",
                        help="skip the JAX library cross-checks (enumeration only)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    start, wall = time.process_time(), time.perf_counter()
    try:
        rows = run_checks(args.cases, args.seed, only, library=False if args.no_library else None)
    except ValueError as err:
        parser.error(str(err))
    print_table(rows, time.process_time() - start, time.perf_counter() - wall)
    if args.json:
        write_json(rows, args.json)
    return 0 if all(r.passed for r in rows) else 1
