"""The ``data convert`` command: a benchmark's official files -> the multimodal job's eval JSONL.

    dfm data convert --from vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images coco/val2014 --out vqav2_val.jsonl

`add_parser` registers the ``data`` command group (with its ``convert`` action) on the ``dfm``
parser's sub-parsers (`experiments.cli`); `main` runs it. The same command also runs as
``python -m experiments.mllm.convert.cli convert --from ...``.

Exit status: 0 converted, 1 an input file not in the official layout (the message names the file
and the record) or an unwritable output, 2 a bad command line (a flag the benchmark needs or does
not take).
"""
from __future__ import annotations

import argparse
import sys

from experiments.mllm.convert import CONVERTERS, INPUTS, convert


def _epilog() -> str:

    rows = [f"  {name:<10} metric {c.metric:<8} {c.files}" for name, c in CONVERTERS.items()]
    return ("benchmarks (official files; docs/benchmarks.md):\n" + "\n".join(rows) +
            "\n\nImage paths in the records are relative to --image-root (default --images): set the job's "
            "[data] image_root to it.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` (and its action ``convert``) on `subparsers` (the ``dfm`` parser's
    ``add_subparsers()``); returns the ``data`` parser. The parsed namespace has
    ``command == "data"``, ``data_command == "convert"`` and the flags below."""

    data = subparsers.add_parser("data", help="benchmark files in their official layouts -> eval JSONL")
    what = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    conv = what.add_parser(
        "convert", help="convert a benchmark's official question / annotation files into the eval JSONL",
        description="Turn a benchmark's official files into single-turn eval records of the multimodal job "
                    "(LLaVA JSONL with the fields of its scorer), written atomically.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    conv.add_argument("--from", dest="benchmark", required=True, choices=tuple(CONVERTERS), metavar="NAME",
                      help=f"the benchmark: {', '.join(CONVERTERS)}")
    conv.add_argument("--out", required=True, metavar="PATH", help="the eval JSONL to write")
    conv.add_argument("--images", required=True, metavar="DIR",
                      help="the benchmark's image folder (mme: the MME_Benchmark_release_version folder)")
    conv.add_argument("--questions", metavar="PATH",
                      help="questions file (vqav2, gqa, textvqa, pope, chartqa, docvqa), problems.json "
                           "(scienceqa), refs as JSON lines (refcoco)")
    conv.add_argument("--annotations", metavar="PATH", help="annotations (vqav2) or COCO instances.json (refcoco)")
    conv.add_argument("--splits", metavar="PATH", help="pid_splits.json (scienceqa, optional)")
    conv.add_argument("--split", metavar="NAME",
                      help="COCO split of the image names (vqav2; default the file's data_subtype), the split "
                           "to keep (scienceqa: default test; refcoco: val, testA, testB, ...; default all)")
    conv.add_argument("--category", metavar="A,B", help="mme: the categories to convert (default all)")
    conv.add_argument("--image-root", metavar="DIR", default=None,
                      help="the folder image paths are written relative to, the job's [data] image_root "
                           "(default --images; --images must be inside it)")
    conv.add_argument("--task", metavar="NAME", default=None,
                      help="the records' task name (default per benchmark, e.g. vqav2_val2014; mme: a prefix)")
    conv.add_argument("--suffix", metavar="TEXT", default=None,
                      help="text appended to every question (default the benchmark's LLaVA-1.5 / InternVL "
                           "instruction; '' for none)")
    conv.add_argument("--no-check-images", dest="check_images", action="store_false",
                      help="do not require the image files to exist (mme always reads its folder)")
    return data


def main(args: argparse.Namespace) -> int:
    """Run ``data convert`` for parsed `args` (`add_parser`); returns the exit status (module doc)."""

    conv = CONVERTERS[args.benchmark]
    inputs = {k: getattr(args, k, None) for k in INPUTS}
    extra = [k for k, v in inputs.items() if v is not None and k not in conv.required + conv.optional]
    missing = [k for k in conv.required if inputs[k] is None]
    if extra or missing:
        what = (f"needs {', '.join('--' + k for k in missing)}" if missing
                else f"does not take {', '.join('--' + k for k in extra)}")
        print(f"dfm data convert: error: --from {args.benchmark} {what}; usage: --from {args.benchmark} "
              f"{conv.files}", file=sys.stderr)
        return 2
    given = {k: v for k, v in inputs.items() if v is not None}
    try:
        info = convert(args.benchmark, args.out, images=args.images, image_root=args.image_root,
                       check_images=args.check_images, task=args.task, suffix=args.suffix, **given)
    except (ValueError, OSError) as exc:
        print(f"dfm data convert: error: {exc}", file=sys.stderr)
        return 1
    skipped = "".join(f"; skipped {n} {why}" for why, n in info["skipped"].items())
    print(f"{info['benchmark']}: {info['records']} records -> {info['output']} (metric {info['metric']}, "
          f"task {', '.join(info['tasks'])}){skipped}")
    print(f"evaluate it with [data] source = \"llava\", test = \"{info['output']}\", "
          f"image_root = \"{info['image_root']}\" (docs/benchmarks.md)")
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.mllm.convert.cli")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    # `... cli convert --from ...`: the data group's actions at the top level
    return main(parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(_standalone())
