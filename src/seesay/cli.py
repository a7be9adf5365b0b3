"""`seesay <verb>`: each verb lives in `seesay/commands/<verb>.py`.

A command module defines `HELP` (one line), `add_arguments(parser)` (every flag with a help
text; defaults are shown automatically) and `run(args) -> int`, which calls one library
function. Command modules import the library inside `run`, so `seesay --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from seesay.errors import SeesayError

VERBS = (
    "synth",
    "prepare",
    "download",
    "train",
    "caption",
    "evaluate",
    "score",
    "visualize",
    "plot",
    "report",
    "demo",
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _available_commands() -> dict[str, object]:
    commands = {}
    for verb in VERBS:
        try:
            commands[verb] = importlib.import_module(f"seesay.commands.{verb}")
        except ModuleNotFoundError as e:  # a verb whose module is not written yet
            if e.name != f"seesay.commands.{verb}":
                raise
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seesay",
        description="seesay: look at a picture and say what is in it (image captioning toolkit).",
        formatter_class=_Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb, module in _available_commands().items():
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP, formatter_class=_Formatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except SeesayError as e:
        print(f"seesay {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seesay {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
