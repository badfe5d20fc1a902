"""The `dfm` console script: the main experiment's stages on a run directory.

    dfm partition              corpus, tokenizer, token ids, k-means and random partitions
    dfm train --base           stage 1: shared base model on all train data
    dfm train --dense          stage 2: dense baseline, continued from the base
    dfm train --expert K       stage 2: expert K on its cluster only, continued from the base
    dfm train --random-expert K   control: expert K of the random partition
    dfm train --router         learned router (masked schedule only)
    dfm evaluate               score every system on the held-out tokens; report + plots
    dfm run                    all stages in order, in this process

A config with ``task = "mllm"`` (e.g. ``--config mllm-digits``) runs the multimodal job instead
(`experiments.mllm`): LLaVA-style experts partitioned by image features; there ``--base`` is the
stage-1 alignment and ``partition`` also runs stage 1 (the partition uses its image features).

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
        prog="dfm", description="Dense vs decentralized experts: the Python stdlib docs (text) or, with a task = \"mllm\" config, LLaVA-style experts on images.")
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

    from experiments.config import ConfigError  # lazy: keeps `dfm --help` fast

    try:
        job = _multimodal_job(args) if _is_multimodal(args.config) else _text_job(args)
    except ConfigError as exc:
        print(f"dfm: error: config: {exc}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        print(f"dfm: error: {exc}", file=sys.stderr)
        return 2

    from dfm.sharding import initialize
    from experiments.mllm.data import DataError
    from experiments.mllm.formats import FormatError
    from experiments.rundir import RunDirError
    from experiments.stages import StageError

    try:
        initialize()  # multi-host launchers (SLURM, Cloud TPU, Kubernetes); a no-op on one process
    except ValueError as exc:
        print(f"dfm: error: distributed launch: {exc}", file=sys.stderr)
        return 2
    try:
        job()
    except (RunDirError, StageError, DataError, FormatError) as exc:
        print(f"dfm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dfm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


class _UsageError(ValueError):
    """A flag that does not apply to the chosen job (exit status 2)."""


def _context(stages, config, args):
    from dfm.sharding import is_main_process

    return stages.open_context(config, args.out, progress=not args.quiet and is_main_process())


def _text_job(args):
    """The text job (`experiments.stages`): returns the command as a zero-argument callable."""
    from experiments import stages
    from experiments.config import load_config

    config = load_config(args.config)
    if args.schedule is not None and args.schedule != config.schedule:
        config = config.replace(schedule=args.schedule, name=f"{config.name}-{args.schedule}")

    def job():
        ctx = _context(stages, config, args)
        if args.command == "partition":
            stages.run_partition(ctx)
        elif args.command == "train":
            if args.base:
                stage = "base"
            elif args.dense:
                stage = "dense"
            elif args.expert is not None:
                stage = stages.expert_stage(ctx, args.expert)
            elif args.random_expert is not None:
                stage = stages.expert_stage(ctx, args.random_expert, random=True)
            else:
                stage = "router"
            stages.run_train(ctx, stage, stop_after=args.stop_after)
        elif args.command == "evaluate":
            stages.run_evaluate(ctx)
        else:
            stages.run_all(ctx)
    return job


def _is_multimodal(name_or_path: str) -> bool:
    """True when the config file says ``task = "mllm"`` (the multimodal job)."""
    import tomllib

    from experiments.config import ConfigError, resolve_path
    from experiments.mllm.config import is_multimodal

    path = resolve_path(name_or_path)
    try:
        return is_multimodal(tomllib.loads(path.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _multimodal_job(args):
    """The multimodal job (`experiments.mllm.stages`) for a ``task = "mllm"`` config.

    `partition` = data + stage 1 + k-means; `train --base` = stage 1; `--dense`, `--expert K`,
    `--random-expert K` as for the text job; `--router` and `--schedule` do not apply (_UsageError).
    """
    from experiments.config import resolve_path
    from experiments.mllm import config as mconfig
    from experiments.mllm import stages
    from experiments.stages import StageError

    config = mconfig.load(resolve_path(args.config))
    if args.schedule not in (None, "ar"):
        raise _UsageError("--schedule: the multimodal job is autoregressive (LLaVA); drop --schedule")
    if args.command == "train" and args.router:
        raise _UsageError("--router: the multimodal job routes by image features (no learned router)")

    def job():
        ctx = _context(stages, config, args)
        if args.command == "partition":
            stages.data_summary(ctx)
            stages.run_train(ctx, "stage1")
            stages.run_partition(ctx)
        elif args.command == "train":
            k = args.expert if args.expert is not None else args.random_expert
            if k is not None and not 0 <= k < config.partition.num_clusters:
                raise StageError(f"expert index {k} out of range: K={config.partition.num_clusters}")
            stage = ("stage1" if args.base else "dense" if args.dense else
                     f"expert-{k}" if args.expert is not None else f"random-{k}")
            stages.run_train(ctx, stage, stop_after=args.stop_after)
        elif args.command == "evaluate":
            stages.run_evaluate(ctx)
        else:
            stages.run_all(ctx)
    return job


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
