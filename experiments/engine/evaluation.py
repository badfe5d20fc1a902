"""The stages after training, for any `Task`: evaluate (score every system, write the report) and export.

Both are idempotent on the run directory: a finished evaluation prints its summary again, a
finished export is skipped. The evaluation needs every training stage of the run (skipped experts
left out); the export needs the evaluation (e.g. the router temperature fitted there).
"""
from __future__ import annotations

import time
from pathlib import Path

from experiments.engine.config import JobConfig
from experiments.engine.graph import RunOptions, StageError, training_stages
from experiments.engine.locks import stage_lock
from experiments.engine.rundir import RunDir, RunDirError, read_json
from experiments.engine.task import Task


def run_evaluate(task: Task, config: JobConfig, run: RunDir, data, options: RunOptions = RunOptions()) -> dict:
    """`Task.evaluate` (scores and report), then `Task.print_summary` (skipped, summary printed,
    when done).

    Raises:
      StageError: a training stage has not finished.
    """
    if run.is_done("evaluate"):
        try:
            rep = read_json(run.report_json)
            options.log("[evaluate] already finished, skipped")
            task.print_summary(rep)
            return rep
        except RunDirError as exc:
            options.log(f"[evaluate] the finished report cannot be read: {exc}; evaluating again")
            run.marker("evaluate").unlink(missing_ok=True)
    missing = [s for s in training_stages(config, task.stage1, options.skip_experts) if not run.is_done(s)]
    if missing:
        raise StageError(f"cannot evaluate: unfinished stages {', '.join(missing)}; run `dfm run` "
                         f"or `dfm train` for them")
    with stage_lock(run, "evaluate", options.log):
        t0 = time.perf_counter()
        rep = task.evaluate(config, run, data, skip_experts=options.skip_experts, progress=options.progress)
        run.mark_done("evaluate", {"wall_time_s": time.perf_counter() - t0,
                                   "skipped_experts": list(options.skip_experts)})
    task.print_summary(rep)
    return rep


def run_export(task: Task, config: JobConfig, run: RunDir, data, options: RunOptions = RunOptions()) -> dict | None:
    """`Task.export` after the evaluation (skipped when done; None for tasks without export).

    Raises:
      StageError: the evaluation has not finished.
    """
    if not task.has_export:
        return None
    if run.is_done("export"):
        info = run.stage_info("export")
        gone = [v for v in info.values() if isinstance(v, str) and v.startswith(str(run.root)) and not Path(v).exists()]
        if not gone:
            return info
        options.log(f"[export] the finished export's {', '.join(gone)} no longer exist(s); exporting again")
        run.marker("export").unlink(missing_ok=True)
    if not run.is_done("evaluate"):
        raise StageError("export needs the evaluation (its fitted router temperature): run `dfm evaluate`")
    with stage_lock(run, "export", options.log):
        t0 = time.perf_counter()
        info = task.export(config, run, data, skip_experts=options.skip_experts, log=options.log) | {
            "wall_time_s": time.perf_counter() - t0}
        run.mark_done("export", info)
    return info
