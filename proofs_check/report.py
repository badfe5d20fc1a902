"""Result rows of proofs_check: error accounting, the rich table and the JSON file."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

TOLERANCE = 1e-12


@dataclass
class Row:
    """One THEORY statement's verdict: ``max_error <= tolerance`` and no failed assertion."""

    id: str
    statement: str
    method: str
    cases: int
    max_error: float
    tolerance: float
    passed: bool
    failures: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data: dict = field(default_factory=dict)  # numbers behind the extra lines (rates, entropies, ...)

    def to_json(self) -> dict:
        out = asdict(self)
        out["max_error"] = self.max_error if math.isfinite(self.max_error) else str(self.max_error)
        return out


class Tracker:
    """Accumulates the max abs error of exact identities (and violations of inequalities, as
    ``max(0, lhs - rhs)``) and explicit failures of boolean assertions, per statement."""

    def __init__(self, tolerance: float = TOLERANCE):
        self.tolerance = tolerance
        self.max_error = 0.0
        self.where = ""
        self.failures: list[str] = []
        self.cases = 0

    def error(self, value, label: str) -> None:
        """Record an error value (array or scalar; NaN counts as infinite)."""
        arr = np.asarray(value, dtype=np.float64)
        if arr.size == 0:
            return
        val = float(arr.max())
        if val != val:  # NaN somewhere
            val = math.inf
        if val > self.max_error:
            self.max_error, self.where = val, label
        if val > self.tolerance and len(self.failures) < 5:
            self.failures.append(f"{label}: error {val:.3e} > {self.tolerance:.0e}")

    def diff(self, a, b, label: str) -> None:
        """Record ``max |a - b|`` (equal infinities count as equal)."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            self.fail(f"{label}: shape {a.shape} != {b.shape}")
            return
        with np.errstate(invalid="ignore"):
            d = np.abs(a - b)
        if not np.isfinite(d).all():
            both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
            d = np.where(both_inf, 0.0, np.where(np.isnan(d), np.inf, d))
        self.error(d, label)

    def require(self, condition: bool, label: str) -> None:
        """A boolean assertion; a False makes the statement FAIL."""
        if not condition:
            self.fail(label)

    def fail(self, label: str) -> None:
        if len(self.failures) < 5:
            self.failures.append(label)
        else:
            self.failures[-1] = f"{label} (and more)"

    @property
    def passed(self) -> bool:
        return not self.failures and self.max_error <= self.tolerance

    def row(self, sid: str, statement: str, method: str, extra=None, data=None) -> Row:
        return Row(
            id=sid, statement=statement, method=method, cases=self.cases, max_error=self.max_error,
            tolerance=self.tolerance, passed=self.passed, failures=list(self.failures), extra=list(extra or []),
            data=dict(data or {}),
        )


def print_table(rows: list[Row], total_seconds: float | None = None, wall_seconds: float | None = None,
                console=None) -> None:
    """Print one rich table row per statement, then the extra lines and the failures."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # pipes and CI logs: do not wrap the table at 80 columns
            console = Console(width=170)
    table = Table(title="proofs_check: THEORY S1-S13 and the library rows S7.law, S8.avail, S9.decode (float64)")
    for col in ("id", "statement", "method", "cases", "max abs error", "tolerance", "CPU s", "result"):
        table.add_column(col, justify="right" if col in ("cases", "max abs error", "tolerance", "CPU s") else "left")
    for r in rows:
        verdict = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.id, escape(r.statement), escape(r.method), str(r.cases), f"{r.max_error:.2e}", f"{r.tolerance:.0e}",
                      f"{r.seconds:.1f}", verdict)
    console.print(table)
    for r in rows:
        for line in r.extra:
            console.print(f"  {r.id}: {line}", highlight=False, markup=False)
    for r in rows:
        for line in r.failures:
            console.print(f"  [red]{r.id} FAIL[/red]: {escape(line)}", highlight=False)
    if total_seconds is not None:
        wall = f", wall {wall_seconds:.1f} s" if wall_seconds is not None else ""
        console.print(f"total CPU {total_seconds:.1f} s{wall}; {sum(r.passed for r in rows)}/{len(rows)} statements pass")


def write_json(rows: list[Row], path: str) -> None:
    """Write a JSON list with one object per statement (keys id, passed, max_error, cases, ...)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump([r.to_json() for r in rows], fh, indent=2)
