"""``retrieval list``: every registered retriever (with its options), dataset,
aggregator and index backend, and the shipped config groups."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from retrieval.config import CONFIG_DIR, data_schema, retriever_schema
from retrieval.registry import DATASETS, INDEX_BACKENDS, REGISTRIES, RETRIEVERS, Registry


def options(registry: Registry, name: str) -> str:
    """What a user sets for ``name``: its config keys (retrievers, datasets), its
    keyword arguments (aggregators), or its preset options (index backends)."""
    if registry is RETRIEVERS or registry is DATASETS:
        schema = retriever_schema(name) if registry is RETRIEVERS else data_schema(name)
        return ", ".join(str(key) for key in schema if key != "name")
    if registry is INDEX_BACKENDS:
        preset = ", ".join(f"{k}={v}" for k, v in INDEX_BACKENDS.defaults[name].items())
        return f"{preset + '; ' if preset else ''}more with --option key=value"
    return ", ".join(registry.parameters(name))


def _list(args: argparse.Namespace) -> int:
    console = Console()
    for registry in REGISTRIES:
        table = Table(title=f"{registry.kind}s ({registry.config_key}) and their options")
        table.add_column("name")
        table.add_column("options")
        for name in registry.names():
            table.add_row(name, options(registry, name))
        console.print(table)
    for group in ("dataset", "retriever", "experiment"):
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        console.print(f"configs/{group}: {', '.join(names)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``list``."""
    parser = subparsers.add_parser(
        "list", help="registered retrievers, datasets, aggregators, index backends and configs"
    )
    parser.set_defaults(func=_list)
