"""The `dfm` console script: the stages of a job (`experiments.engine`) on a run directory.

    dfm partition              data stage, (stage 1 when the partition needs it,) k-means and random partitions
    dfm train --base           stage 1: shared base model on all train data
    dfm train --dense          stage 2: dense baseline, continued from stage 1
    dfm train --expert K       stage 2: expert K on its cluster only, continued from stage 1
    dfm train --random-expert K   control: expert K of the random partition
    dfm train --router         learned router (text job, masked schedule only)
    dfm evaluate               score every system on the held-out data; report + plots
    dfm export                 the finished run's models as HF directories and a `dfm.DecentralizedModel` directory
    dfm run                    all stages in order, in this process
    dfm run --seeds N          the whole job for seeds 0..N-1 into OUT/seed-<s>/, then OUT/summary.json
    dfm sweep --clusters 1 2 4 8 --budgets 120 480 --seeds 3 [--sizes s m l]
                               the job over [size x] K x stage-2 steps x seeds, then OUT/sweep.{json,md},
                               regime.png (and sweep.png)

The config's ``task`` key picks the job (`experiments.registry`): the text job by default
(`experiments.text`), or with ``task = "mllm"`` (e.g. ``--config mllm-digits``) the multimodal job
(`experiments.mllm`): LLaVA-style experts partitioned by image features; there ``--base`` is the
stage-1 alignment and ``partition`` also runs stage 1 (the partition uses its image features).

Every command takes ``--config NAME|PATH`` (NAME = a file in experiments/configs/, default
"default"), ``--out DIR`` (default ``runs/<config-name>``, ``runs/<config-name>-masked`` when
``--schedule masked`` overrides an AR config), ``--schedule ar|masked`` and any number of
``KEY=VALUE`` overrides (``stage2.steps=200``, ``seed=3``, ``numerics.attention=xla``): TOML values
applied to the file before validation, so they are checked like the file, and the resolved config
is what the run directory pins. Commands are idempotent: finished stages are skipped, interrupted
training resumes from its last checkpoint.

    dfm config show NAME [KEY=VALUE ...]   the resolved config as TOML
    dfm config list                        the shipped configs
    dfm plan --config NAME --devices N [--device-memory 80GiB] [KEY=VALUE ...]
                                           memory per device of each training stage, built abstractly
    dfm data convert --from vqav2|gqa|textvqa|scienceqa|pope|mme|refcoco|chartqa|docvqa ... --out FILE
                                           a benchmark's official files -> the multimodal job's eval JSONL
                                           (`experiments.mllm.convert`; docs/benchmarks.md)
    dfm --version

This module only parses arguments and dispatches; the job code (jax and the rest) is imported
lazily, so `dfm --help` and `dfm config list` import only the config machinery (stdlib only);
`dfm config show` resolves a config through its task (`experiments.registry`), which imports jax.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import dfm
from experiments.engine.config import (
    ConfigError,
    UsageError,
    available_configs,
    is_override,
    override_changes,
    parse_override,
    toml_value,
)
from experiments.mllm.convert.cli import add_parser as add_data_parser
from experiments.mllm.convert.cli import main as data_main

OVERRIDE_HELP = ("override a config value: SECTION.KEY=VALUE or KEY=VALUE, the value in TOML syntax "
                 "(200, 3e-4, false, \"text\"; a bare word is a string); repeatable")


def _version() -> str:
    """The installed package's version (``dfm.__version__`` when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("dfm")
    except metadata.PackageNotFoundError:
        return getattr(dfm, "__version__", "unknown")


def _epilog() -> str:
    return f"""shipped configs (--config NAME; experiments/configs/NAME.toml): {', '.join(available_configs())}

examples:
  dfm run --config tiny                          the whole job on the CI config (runs/tiny)
  dfm run --config default stage2.steps=400 --out runs/long
                                                 override a value (checked like the file)
  dfm config show tiny stage2.steps=7            print the resolved config as TOML
  dfm train --expert 1 --config tiny             one stage (resumes from its checkpoint)
  dfm evaluate --config tiny                     score the systems, write the report
  dfm COMMAND --help                             the options of a command

progress: runs/<name>/logs/<stage>/metrics.jsonl gets one line per logged step (loss, lr,
grad_norm, tokens_per_s); with tensorboard installed: tensorboard --logdir runs/<name>/logs"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="default", metavar="NAME|PATH",
                        help="config name (experiments/configs/NAME.toml) or path to a .toml file")
    common.add_argument("--out", default=None, metavar="DIR",
                        help="run directory (default runs/<config-name>)")
    common.add_argument("--schedule", choices=("ar", "masked"), default=None,
                        help="override the config's schedule: ar (causal LM) or masked (DFM denoiser)")
    common.add_argument("--quiet", action="store_true", help="no progress bars, no config changes printed")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)

    parser = argparse.ArgumentParser(
        prog="dfm", description="Dense vs decentralized experts: the Python stdlib docs (text) or, with a task = "
                                "\"mllm\" config, LLaVA-style experts on images.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dfm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("partition", parents=[common], help="data, tokenizer and partitions")
    train = sub.add_parser("train", parents=[common], help="train one stage")
    which = train.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", action="store_true", help="stage 1: the shared base model")
    which.add_argument("--dense", action="store_true", help="stage 2: the dense baseline")
    which.add_argument("--expert", type=int, metavar="K", help="stage 2: expert K (0-based)")
    which.add_argument("--random-expert", type=int, metavar="K", help="control: random-partition expert K")
    which.add_argument("--router", action="store_true", help="the learned router (masked schedule)")
    train.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    lost = argparse.ArgumentParser(add_help=False)
    lost.add_argument("--skip-expert", type=int, action="append", default=[], metavar="K",
                      help="leave cluster expert K out (e.g. its job failed for good): it is not trained, and "
                           "the ensembles renormalise their routers over the remaining experts (repeatable)")
    sub.add_parser("evaluate", parents=[common, lost], help="evaluate all systems, write the report")
    sub.add_parser("export", parents=[common, lost],
                   help="export a finished run's models (HF directories, the dfm.DecentralizedModel directory)",
                   description="The run's export stage after `dfm evaluate` (skipped when done): the text job writes "
                               "OUT/export/dense and OUT/export/decentralized, the multimodal job OUT/hf/<stage> and "
                               "OUT/decentralized (docs/checkpoints.md).")
    run = sub.add_parser("run", parents=[common, lost], help="all stages in order (default when no command)")
    run.add_argument("--seeds", type=_positive, default=None, metavar="N",
                     help="run the whole job for seeds 0..N-1 (seed and partition.seed) into OUT/seed-<s>/ and "
                          "write OUT/summary.json and summary.md: mean ± sd over seeds and intervals vs dense "
                          "(overrides the config's seeds = [...])")
    sweep = sub.add_parser("sweep", parents=[common],
                           help="the job over [size x] K x stage-2 steps x seeds; Δ vs dense per cell + plots",
                           description="Run the job for every size in --sizes (if given), K in --clusters, "
                                       "stage2.steps in --budgets and seed in 0..N-1 into "
                                       "OUT/seed-<s>/[<size>-]K<k>-steps<b>/ (stage 1 shared within a seed and "
                                       "size, dense within a seed, size and budget), then write OUT/sweep.json, "
                                       "sweep.md, regime.png and (without sizes) sweep.png "
                                       "(experiments.engine.sweep; default OUT runs/<config>-sweep).")
    sweep.add_argument("--clusters", type=_positive, nargs="+", required=True, metavar="K", help="numbers of experts")
    sweep.add_argument("--budgets", nargs="+", required=True, metavar="STEPS|SIZE=STEPS,...",
                       help="stage-2 steps (dense; the experts split them), for every size, or SIZE=S1,S2,... for one")
    sweep.add_argument("--sizes", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                       help="model sizes: s, m, l (experiments.engine.sweep.SIZES) or NAME:KEY=VALUE,... overrides")
    sweep.add_argument("--seeds", type=_positive, default=3, metavar="N", help="seeds 0..N-1 per cell (default 3)")
    config = sub.add_parser("config", help="show a resolved config, list the shipped ones")
    what = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = what.add_parser("show", help="print the resolved config (file + overrides) as TOML")
    show.add_argument("name", metavar="NAME|PATH", help="config name or path to a .toml file")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    show.add_argument("--schedule", choices=("ar", "masked"), default=None, help="as for the other commands")
    what.add_parser("list", help="the shipped configs (experiments/configs/*.toml)")
    plan = sub.add_parser("plan", help="memory per device of each training stage (nothing allocated)",
                          description="Build the config's model and optimizer abstractly, lay them out on the "
                                      "[mesh] for N devices with the logical-axis rules and print parameters, "
                                      "gradients, optimizer state, activations (an estimate) and the total per "
                                      "device, and whether it fits (docs/plan.md).")
    plan.add_argument("--config", default="default", metavar="NAME|PATH",
                      help="config name (experiments/configs/NAME.toml) or path to a .toml file")
    plan.add_argument("--devices", type=_positive, required=True, metavar="N", help="devices of one training job")
    plan.add_argument("--device-memory", default=None, metavar="SIZE",
                      help="memory of one device: 80GiB, 80GB, 80e9, ... (default: no fit verdict)")
    plan.add_argument("--vocab", type=_positive, default=None, metavar="V",
                      help="model vocabulary (default: the config's data.vocab_size, +1 <image> token for mllm)")
    plan.add_argument("--schedule", choices=("ar", "masked"), default=None, help="as for the other commands")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    add_data_parser(sub)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parse_known_args`, with the ``KEY=VALUE`` overrides that follow an option collected too
    (argparse takes one run of positionals only); any other unknown argument is an error."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not is_override(a)]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dfm` console script; returns the exit status.

    Exit status: 0 success, 1 a stage failed (missing prerequisite, unusable run directory or
    data, a full / over-quota / read-only disk: the message names the stage and the file), 2 bad
    command line or config (the message names the key/field), 75 (``EX_TEMPFAIL``) preempted:
    SIGTERM / SIGUSR1 arrived during training, the stage was checkpointed at the next step
    boundary (`dfm.train.preemption`); re-run the same command to resume, 130 interrupted (Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]
    args = _parse(parser, argv)
    if args.command == "config":
        return _config_command(args)
    if args.command == "plan":
        return _plan_command(args)
    if args.command == "data":
        return data_main(args)
    if args.out is not None and not args.out.strip():
        print("dfm: error: --out: an empty directory name would write the run into the current "
              "directory; give a directory", file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")   # no "PyTorch was not found" notice

    job = _load_job(args.config, args.schedule, args.overrides)
    if job is None:
        return 2
    task, config = job
    if args.command == "train" and args.router and "router" not in config.extra_stages:
        print(f"dfm: error: {_router_usage(task)}", file=sys.stderr)
        return 2
    if args.overrides and not args.quiet:
        for line in _changes(args, config):
            print(line)

    from dfm.io import mute_disk_fault_reports
    from dfm.sharding import initialize
    from experiments.engine.graph import StageError
    from experiments.engine.rundir import DiskFaultError, RunDirError, disk_fault_error
    from experiments.engine.task import DataError

    mute_disk_fault_reports()   # a full disk is reported once, below, not by each background writer

    try:
        initialize()  # multi-host launchers (SLURM, Cloud TPU, Kubernetes); a no-op on one process
    except ValueError as exc:
        print(f"dfm: error: distributed launch: {exc}", file=sys.stderr)
        return 2
    from dfm.train.preemption import EXIT_PREEMPTED, Preempted

    try:
        _run_command(args, task, config)
    except Preempted as exc:
        print(f"dfm: preempted: stage '{exc.desc}' checkpointed at step {exc.step} in {exc.checkpoint}; "
              "re-run the same command to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except (RunDirError, StageError, DataError) as exc:
        if isinstance(exc, DiskFaultError):
            _settle_aborted_writes()
        print(f"dfm: error: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"dfm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a disk fault outside a stage (the stages map their own)
        err = disk_fault_error(exc, f"dfm {args.command}")
        if err is None:
            raise
        _settle_aborted_writes()
        print(f"dfm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dfm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def _settle_aborted_writes() -> None:
    """After a disk fault: finalise the coroutines of the asynchronous writes it aborted (orbax) now,
    while the interpreter is whole; left to its shutdown, they print "Exception ignored" tracebacks."""
    import gc

    gc.collect()


def _load_job(name: str, schedule, overrides):
    """`experiments.registry.load_job(name, schedule, overrides)`, or None after printing its
    ConfigError / UsageError (the caller exits with status 2)."""
    from experiments.registry import load_job

    try:
        return load_job(name, schedule, overrides)
    except (ConfigError, UsageError) as exc:
        print(f"dfm: error: {'config: ' if isinstance(exc, ConfigError) else ''}{exc}", file=sys.stderr)
        return None


def _changes(args, config) -> list[str]:
    """One line per value in which the resolved config differs from the file (its overrides)."""
    from experiments.registry import load_job

    def text(v):
        try:
            return toml_value(v)
        except TypeError:
            return repr(v)

    try:
        _, shipped = load_job(args.config, args.schedule)
    except ConfigError:                      # the file alone is invalid: the overrides fix it
        return [f"[config] {'.'.join(k)} = {text(v)} (override)" for k, v in map(parse_override, args.overrides)]
    return [f"[config] {key} = {text(new)} (was {text(old)} in {args.config})"
            for key, old, new in override_changes(shipped.to_dict(), config.to_dict())]


def _config_command(args) -> int:
    """``dfm config show NAME [KEY=VALUE ...]`` / ``dfm config list``."""
    if args.config_command == "list":
        print("\n".join(available_configs()))
        return 0
    job = _load_job(args.name, args.schedule, args.overrides)
    if job is None:
        return 2
    sys.stdout.write(job[1].to_toml())
    return 0


def _plan_command(args) -> int:
    """``dfm plan --config NAME --devices N [--device-memory SIZE] [KEY=VALUE ...]`` (`experiments.engine.plan`)."""
    import json

    job = _load_job(args.config, args.schedule, args.overrides)
    if job is None:
        return 2
    task, config = job
    from experiments.engine import plan as planning

    try:
        memory = None if args.device_memory is None else planning.parse_size(args.device_memory)
        result = planning.plan(task, config, args.devices, memory, vocab=args.vocab)
    except ValueError as exc:
        print(f"dfm: error: plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=float) if args.json else planning.format_plan(result))
    return 0


def _router_usage(task) -> str:
    if task.name == "text":
        return ("--router: the learned router is part of the masked schedule; use --schedule masked "
                "(under AR the exact router is the Bayes filter, THEORY S9)")
    return f"--router: the {task.name} job routes by its partition features (no learned router)"


def _run_command(args, task, config) -> None:
    """Open the run directory and run the command's stages (`experiments.engine.pipeline`)."""
    from dfm.sharding import is_main_process
    from experiments.engine import evaluation, graph, pipeline, training

    skip = tuple(getattr(args, "skip_expert", ()))
    if args.command == "sweep":
        _run_sweep(args, task, config)
        return
    if args.command == "run":
        seeds = list(range(args.seeds)) if args.seeds else list(getattr(config, "seeds", ()) or ())
        if seeds:
            _run_seeds(args, task, config, seeds, skip)
            return
    options = graph.run_options(config, progress=not args.quiet and is_main_process(), skip_experts=skip)
    run = pipeline.open_run(config, args.out)
    if args.command == "run":
        pipeline.run_all(task, config, run, options)
        return
    data = pipeline.load_data(task, config, run, options)
    if args.command == "partition":
        pipeline.run_until_partition(task, config, run, data, options)
    elif args.command == "train":
        if args.base:
            stage = task.stage1
        elif args.dense:
            stage = "dense"
        elif args.expert is not None:
            stage = graph.expert_stage(config, args.expert)
        elif args.random_expert is not None:
            stage = graph.expert_stage(config, args.random_expert, random=True)
        else:
            stage = "router"
        training.run_train(task, config, run, data, stage, options, stop_after=args.stop_after)
    elif args.command == "evaluate":
        evaluation.run_evaluate(task, config, run, data, options)
    elif args.command == "export":
        info = evaluation.run_export(task, config, run, data, options)
        if info is None:
            raise graph.StageError(f"the {task.name} task has no export stage")
        paths = {k: v for k, v in info.items() if isinstance(v, str) and Path(v).exists()}
        options.log("[export] " + (", ".join(f"{k}: {v}" for k, v in paths.items()) or f"done ({run.root})"))


def _run_seeds(args, task, config, seeds: list[int], skip: tuple[int, ...]) -> None:
    """``dfm run --seeds N``: the whole job per seed into OUT/seed-<s>/, then OUT/summary.json
    (`experiments.engine.seeds`)."""
    from pathlib import Path

    from dfm.sharding import is_main_process
    from experiments.engine import graph, pipeline
    from experiments.engine import seeds as multi
    from experiments.registry import load_job

    out = Path(args.out) if args.out is not None else Path("runs") / config.name

    def run_one(seed: int, where: Path) -> dict:
        _, sub = load_job(args.config, args.schedule, [*args.overrides, *multi.seed_overrides(seed, config)])
        options = graph.run_options(sub, progress=not args.quiet and is_main_process(), skip_experts=skip)
        return pipeline.run_all(task, sub, pipeline.open_run(sub, where), options)

    summary = multi.run_seeds(seeds, out, run_one)
    if is_main_process():
        print(multi.summary_markdown(summary))
        print(f"[seeds] summary: {out / 'summary.json'}, {out / 'summary.md'}")


def _run_sweep(args, task, config) -> None:
    """``dfm sweep``: the job over K x budgets x seeds (`experiments.engine.sweep`)."""
    from pathlib import Path

    from dfm.sharding import is_main_process
    from experiments.engine import graph, pipeline
    from experiments.engine import sweep as grid
    from experiments.registry import load_job

    out = Path(args.out) if args.out is not None else Path("runs") / f"{config.name}-sweep"
    try:
        sizes = None if args.sizes is None else grid.parse_sizes(args.sizes)
        budgets = grid.parse_budgets(args.budgets, None if sizes is None else list(sizes))
    except ValueError as exc:
        raise UsageError(f"sweep: {exc}") from None
    cells = {}
    for seed in range(args.seeds):            # every cell's config validated before anything runs
        for size, size_overrides in (sizes or {None: ()}).items():
            for k in args.clusters:
                for budget in budgets[size]:
                    overrides = [*args.overrides, *size_overrides, *grid.cell_overrides(seed, k, budget, config)]
                    try:
                        cells[seed, k, budget, size] = load_job(args.config, args.schedule, overrides)[1]
                    except ConfigError as exc:
                        raise UsageError(f"sweep cell {grid.cell_name(k, budget, size)}: {exc}") from None

    def run_cell(seed: int, k: int, budget: int, where: Path, size: str | None = None) -> dict:
        cell = cells[seed, k, budget, size]
        options = graph.run_options(cell, progress=not args.quiet and is_main_process())
        return pipeline.run_all(task, cell, pipeline.open_run(cell, where), options)

    result = grid.run_sweep(args.clusters, budgets, list(range(args.seeds)), out, run_cell, task.stage1,
                            sizes=sizes)
    if is_main_process():
        print(grid.sweep_markdown(result))
        print(f"[sweep] {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'regime.png'}"
              + ("" if sizes else f", {out / 'sweep.png'}"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
