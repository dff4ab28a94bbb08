"""``retrieval``: the command line. One module per command; no library code lives here.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a function returning the exit status. A :class:`RetrievalError` (bad
config, data, weights or index files) prints one ``error:`` line and exits with 2;
anything else is a bug and keeps its traceback (``RETRIEVAL_DEBUG=1`` shows the
traceback of user errors too).
"""

from __future__ import annotations

import argparse
import os
import sys

from retrieval.cli import compare, data, evaluate, export, index, listing, search, serve, sweep
from retrieval.cli.output import configure
from retrieval.errors import RetrievalError

COMMANDS = (evaluate, listing, data, index, search, export, compare, sweep, serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``retrieval`` parser with every command's subparser."""
    parser = argparse.ArgumentParser(
        prog="retrieval", description="Object-centric open-vocabulary image retrieval."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show library messages (Lightning's start-up lines) and deprecation warnings",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; a user-caused error prints one message and exits with status 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands an optional positional (export's OUT) its empty match at the first
    # positional, so `export RUN --format parquet OUT` leaves OUT over: it is that OUT
    if args.command == "export" and len(extra) == 1 and args.out is None and extra[0][:1] != "-":
        args.out = extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure(args.verbose)
    try:
        return int(args.func(args))
    except RetrievalError as err:
        if os.environ.get("RETRIEVAL_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
