"""The `dfm` console script: the main experiment's stages on a run directory.

    dfm partition              corpus, tokenizer, token ids, k-means and random partitions
    dfm train --base           stage 1: shared base model on all train data
    dfm train --dense          stage 2: dense baseline, continued from the base
    dfm train --expert K       stage 2: expert K on its cluster only, continued from the base
    dfm train --random-expert K   control: expert K of the random partition
    dfm train --router         learned router (masked schedule only)
    dfm evaluate               score every system on the held-out tokens; report + plots
    dfm run                    all stages in order, in this process

Every command takes ``--config NAME|PATH`` (NAME = a file in experiments/configs/, default
"default"), ``--out DIR`` (default ``runs/<config-name>``, ``runs/<config-name>-masked`` when
``--schedule masked`` overrides an AR config) and ``--schedule ar|masked``. Commands are
idempotent: finished stages are skipped, interrupted training resumes from its last checkpoint.
This module only parses arguments and dispatches; the experiment code is imported lazily.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="default", metavar="NAME|PATH",
                        help="config name (experiments/configs/NAME.toml) or path to a .toml file")
    common.add_argument("--out", default=None, metavar="DIR",
                        help="run directory (default runs/<config-name>)")
    common.add_argument("--schedule", choices=("ar", "masked"), default=None,
                        help="override the config's schedule: ar (causal LM) or masked (DFM denoiser)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(
        prog="dfm", description="Dense vs decentralized experts on the Python stdlib documentation.")
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
    sub.add_parser("evaluate", parents=[common], help="evaluate all systems, write the report")
    sub.add_parser("run", parents=[common], help="all stages in order (default when no command)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dfm` console script; returns the exit status.

    Exit status: 0 success, 1 a stage failed (missing prerequisite, unusable run directory),
    2 bad command line or config (the message names the key/field).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)

    from experiments.config import ConfigError, load_config  # lazy: keeps `dfm --help` fast

    try:
        config = load_config(args.config)
        if args.schedule is not None and args.schedule != config.schedule:
            config = config.replace(schedule=args.schedule, name=f"{config.name}-{args.schedule}")
    except ConfigError as exc:
        print(f"dfm: error: config: {exc}", file=sys.stderr)
        return 2

    from dfm.sharding import initialize, is_main_process
    from experiments import stages
    from experiments.rundir import RunDirError

    try:
        initialize()  # multi-host launchers (SLURM, Cloud TPU, Kubernetes); a no-op on one process
    except ValueError as exc:
        print(f"dfm: error: distributed launch: {exc}", file=sys.stderr)
        return 2
    try:
        ctx = stages.open_context(config, args.out, progress=not args.quiet and is_main_process())
        if args.command == "partition":
            stages.run_partition(ctx)
        elif args.command == "train":
            if args.base:
                stages.run_train(ctx, "base", stop_after=args.stop_after)
            elif args.dense:
                stages.run_train(ctx, "dense", stop_after=args.stop_after)
            elif args.expert is not None:
                stages.run_train(ctx, stages.expert_stage(ctx, args.expert), stop_after=args.stop_after)
            elif args.random_expert is not None:
                stages.run_train(ctx, stages.expert_stage(ctx, args.random_expert, random=True),
                                 stop_after=args.stop_after)
            else:
                stages.run_train(ctx, "router", stop_after=args.stop_after)
        elif args.command == "evaluate":
            stages.run_evaluate(ctx)
        else:
            stages.run_all(ctx)
    except (RunDirError, stages.StageError) as exc:
        print(f"dfm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dfm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
