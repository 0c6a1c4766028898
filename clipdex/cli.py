"""The ``clipdex`` command line: the top-level parser, with each ``clipdex.commands`` module's subcommands.

``build_parser()`` makes the parser (a :class:`~clipdex.commands.argtypes.CommandParser`: one help style for
every command, unknown flags reported by the subcommand they were given to) and ``main(argv=None) -> int``
runs a command, so tests can call it in process as well as in a subprocess. Library code never prints; the
command modules decide what the user sees (a table by default, JSON with ``--json``) and ``main`` turns a
``ClipdexError`` into one ``clipdex: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from clipdex import __version__
from clipdex.exceptions import ClipdexError

EPILOG = """\
examples:
  clipdex world generate --out worlds/demo --seed 0       # make the built-in captioned world
  clipdex train --manifest worlds/demo/manifest.parquet --out runs/mine
  clipdex eval retrieval --model clipdex-world --manifest worlds/demo/manifest.parquet --split test
  clipdex eval oracle --manifest worlds/demo/manifest.parquet --split test
  clipdex index worlds/demo/manifest.parquet --split corpus   # embed a collection
  clipdex search "a red circle left of a star"             # text -> image
  clipdex search --image photo.jpg --captions              # image -> text
  clipdex ask --image photo.jpg "when was it built?"       # answered from the collection, evidence shown
  clipdex eval answer                                      # proof that retrieval is what answers
  clipdex app                                              # the Streamlit UI on 127.0.0.1:8501
  clipdex serve                                            # the HTTP API on 127.0.0.1:8600 (docs at /docs)
  clipdex models                                           # built-in names and accepted spec forms
  clipdex demo                                             # the whole thing on the embedded default
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    # Imported here, not at module top, so `clipdex --help` stays fast and import has no side effects.
    from clipdex.commands import (
        app,
        ask,
        check,
        demo,
        eval,
        index,
        models,
        search,
        serve,
        train,
        world,
    )
    from clipdex.commands.argtypes import CommandParser

    parser = CommandParser(
        prog="clipdex",
        description="Cross-modal retrieval: embed images and captions with a contrastive dual encoder, "
        "search text->image, image->image and image->text, and answer questions grounded in the collection.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"clipdex {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v for info, -vv for debug (default: warnings only)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (world, index, models, train, eval, search, check, demo, ask, app, serve):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (defaults to ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ClipdexError as e:
        print(f"clipdex: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clipdex: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `clipdex ... | head` closed the pipe: stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 141


if __name__ == "__main__":
    sys.exit(main())
