"""`seesay <verb>`: each verb lives in `seesay/commands/<verb>.py`.

A command module defines `HELP` (one line), `add_arguments(parser)` (every flag with a help
text; defaults are shown automatically, so a help text says "(default: ...)" itself only when
the parser's default is not what the user should read, e.g. None or a path computed later) and
`run(args) -> int`, which calls one library function. Command modules import the library inside
`run`, so `seesay --help` stays fast. A `SeesayError` ends the verb with one line,
`seesay <verb>: error: <message>`, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from seesay.allocator import keep_freed_memory
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
    "serve",
    "export",
    "convert",
    "train-vq",
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help states its default itself, the
    flag is required, or X is None (which tells a user nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or action.required or action.default is None:
            return help_text
        return super()._get_help_string(action)


def _available_commands() -> dict[str, object]:
    commands = {}
    for verb in VERBS:
        try:
            module = f"seesay.commands.{verb.replace('-', '_')}"
            commands[verb] = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a verb whose module is not written yet
            if e.name != module:
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
    keep_freed_memory()  # tensors a step frees are reused by the next (seesay.allocator)
    try:
        return int(args._run(args) or 0)
    except SeesayError as e:
        print(f"seesay {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a quota, a folder removed mid-run: the file and the reason, no traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"seesay {args.verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seesay {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
