"""Preemption: SIGTERM / SIGUSR1 during training end it at the next step boundary, checkpointed.

Schedulers announce the end of a job with a signal some time before they kill it: SLURM sends
SIGTERM on preemption and, with ``--signal=TERM@120``, 120 s before the time limit; Kubernetes and
spot / preemptible VMs send SIGTERM. `dfm.train.train` (with a ``checkpoint_dir``, in the main
thread, on a single process) installs `preemption_signals` for its loop: the handlers only record the signal; after the
step in progress the loop saves a checkpoint of that step, waits for it to be written, and raises
`Preempted`. Because batches and keys are functions of the step, re-running the same call resumes
from that checkpoint to exactly the parameters of an uninterrupted run. The `dfm` command turns
`Preempted` into one line on stderr and exit status `EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of
``sysexits.h``: "try again later").

Only a signal whose handler is the default one (``SIG_DFL``) or this module's is taken over: a
handler the application installed, or ``SIG_IGN``, is left alone. The previous handlers are
restored when the loop ends, so outside training (data, partition, evaluation) the signals act as
before (the default ends the process; a stage that was cut short re-runs from its start). With
several processes (multi-host) `train` installs nothing: processes could see the signal at
different steps and disagree on the checkpoint's step; a killed multi-host run resumes from its
last periodic checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that request a checkpoint and a clean stop."""

EXIT_PREEMPTED = 75
"""Exit status of `dfm` after a preemption (``EX_TEMPFAIL``): re-run the same command to resume."""


class Preempted(Exception):
    """Training stopped at a step boundary because a preemption signal arrived.

    Attributes:
      desc: the label of the `train` call (the stage name in the jobs, e.g. "base").
      step: the completed steps, all of them held by the checkpoint.
      checkpoint: the checkpoint directory (it holds a checkpoint of `step`).
      signal: the signal's name ("SIGTERM", "SIGUSR1").
    """

    def __init__(self, desc: str, step: int, checkpoint: str | Path, signal_name: str):
        self.desc, self.step, self.checkpoint, self.signal = desc, step, Path(checkpoint), signal_name
        super().__init__(f"{desc}: {signal_name} received; checkpointed at step {step} in {self.checkpoint}")


class PreemptionFlag:
    """What the handlers recorded: `signal` is the name of the first preemption signal received
    since the handlers were installed, or None."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None


_FLAG: PreemptionFlag | None = None      # the flag of the outermost active `preemption_signals`


def _record(signum, frame) -> None:   # noqa: ARG001 - a signal handler's signature
    if _FLAG is not None and _FLAG.signal is None:
        _FLAG.signal = signal.Signals(signum).name


@contextlib.contextmanager
def preemption_signals(signals=PREEMPTION_SIGNALS) -> Iterator[PreemptionFlag]:
    """Record `signals` in a `PreemptionFlag` while the block runs, instead of their default action.

    Installs a handler that only sets the flag, for each signal whose current handler is
    ``SIG_DFL``; restores the previous handlers when the block ends (normally or not). Nested
    blocks share the outer block's flag. Outside the main thread (where Python cannot install
    signal handlers) nothing is installed and the flag is never set.

    Yields:
      the `PreemptionFlag` to check at safe points (e.g. after each training step).
    Raises:
      nothing of its own; the block's exceptions propagate.
    """
    global _FLAG
    if threading.current_thread() is not threading.main_thread():
        yield PreemptionFlag()
        return
    if _FLAG is not None:                       # nested: the outer block owns the handlers
        yield _FLAG
        return
    flag = PreemptionFlag()
    previous = {}
    _FLAG = flag
    try:
        for sig in signals:
            if signal.getsignal(sig) == signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _record)
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _FLAG = None
