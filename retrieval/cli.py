"""``retrieval`` command line: eval, list (compare, index, search and data come later)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console
from rich.table import Table

from retrieval.config import CONFIG_DIR, ConfigError, load_config

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, KeyError, TypeError)


def _eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from retrieval.engine.evaluate import evaluate  # Lightning: only when a run starts

    evaluate(cfg)
    return 0


def _list(args: argparse.Namespace) -> int:
    from retrieval.data.registry import list_datasets
    from retrieval.retrievers.registry import factory_parameters, list_retrievers

    console = Console()
    table = Table(title="retrievers (retriever.name) and their options")
    table.add_column("name")
    table.add_column("options (retriever.*)")
    for name in list_retrievers():
        table.add_row(name, ", ".join(factory_parameters(name)))
    console.print(table)
    console.print(f"datasets (data.name): {', '.join(list_datasets())}")
    for group in ("dataset", "retriever", "experiment"):
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        console.print(f"configs/{group}: {', '.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval", description="Object-centric open-vocabulary image retrieval."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="embed a dataset with a retriever and score it")
    ev.add_argument("config", help="experiment name in configs/ or a YAML path")
    ev.add_argument("overrides", nargs="*", help="key=value or group=name overrides")
    ev.set_defaults(func=_eval)
    ls = sub.add_parser("list", help="registered retrievers, datasets and configs")
    ls.set_defaults(func=_list)
    from retrieval.data.cli import register_cli as register_data
    from retrieval.report.compare import register_cli as register_compare
    from retrieval.store.index.cli import register_cli as register_index

    register_data(sub)
    register_compare(sub)
    register_index(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; a user-caused error prints one message and exits with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("retrieval").setLevel(logging.INFO)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("RETRIEVAL_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
