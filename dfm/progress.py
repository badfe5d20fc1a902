"""Progress reporting that suits where it goes: a tqdm bar on a terminal, and in a log file (stderr
not a terminal) one line every ~10% of the work instead of thousands of carriage-return redraws.
"""
from __future__ import annotations

import sys
import time


class LineProgress:
    """The subset of tqdm's interface the project uses (`update`, `set_postfix`, `close`), printing
    ``<desc>: <n>/<total> (<pct>%) <postfix> <seconds>s`` to stderr at every further 10% (and at the end)."""

    def __init__(self, total: int | None, desc: str = "", initial: int = 0, every: float = 0.1):
        self.total, self.desc, self.n = total, desc, initial
        self.every = every
        self.postfix = ""
        self.start = time.perf_counter()
        self._next = self._threshold(initial)

    def _threshold(self, n: int) -> int:
        if not self.total:
            return 1 << 62
        step = max(1, int(self.total * self.every))
        return (n // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and (self.n >= self._next or self.n >= self.total):
            self._print()
            self._next = self._threshold(self.n)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def _print(self) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total}{pct} {self.postfix} {time.perf_counter() - self.start:.1f}s".rstrip(),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int | None = None, *, desc: str = "", disable: bool = False, initial: int = 0,
                 leave: bool = False):
    """A tqdm bar when stderr is a terminal, a `LineProgress` otherwise, or a silent one (`disable`).

    Args:
      total: units of work; desc: label; initial: units already done (a resumed stage);
      leave: keep the tqdm bar on screen when it closes.
    """
    if disable:
        return LineProgress(None, desc, initial)   # total None: never prints
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=leave)
    return LineProgress(total, desc, initial)
