"""``retrieval list``: every registered retriever (with its options), dataset,
aggregator and index backend, and the shipped config groups.

A built-in component's options come from its factory's signature, which means importing
its module (and torch with it). The built-ins' table is therefore kept in
``builtin_options.json`` beside this file, written by :func:`write_builtin_options` and
checked against the live registries by the test suite; only installed plugins
(entry points) are imported to list theirs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval.registry import Registry

BUILTIN_OPTIONS = Path(__file__).with_name("builtin_options.json")


def options(registry: Registry[Any], name: str) -> str:
    """What a user sets for ``name``: its config keys (retrievers, datasets), its
    keyword arguments (aggregators), or its preset options (index backends)."""
    from retrieval.config import data_schema, retriever_schema
    from retrieval.registry import DATASETS, INDEX_BACKENDS, RETRIEVERS

    if registry is RETRIEVERS or registry is DATASETS:
        schema = retriever_schema(name) if registry is RETRIEVERS else data_schema(name)
        return ", ".join(str(key) for key in schema if key != "name")
    if registry is INDEX_BACKENDS:  # the engine's typed options, with their defaults
        from retrieval.index.base import engine_class

        return engine_class(name).Options(**INDEX_BACKENDS.defaults[name]).shown()
    return ", ".join(registry.parameters(name))


def live_options(builtin_only: bool) -> dict[str, dict[str, str]]:
    """kind -> name -> options, from the imported registries (plugins left out with
    ``builtin_only``: a built-in is a factory defined in this package)."""
    from retrieval.registry import REGISTRIES

    table: dict[str, dict[str, str]] = {}
    for registry in REGISTRIES:
        names = registry.names()
        if builtin_only:
            names = [n for n in names if registry.get(n).__module__.startswith("retrieval.")]
        table[registry.kind] = {name: options(registry, name) for name in names}
    return table


def write_builtin_options() -> None:
    """Rewrites ``builtin_options.json`` from the live registries (after a built-in
    component gains or loses an option)."""
    BUILTIN_OPTIONS.write_text(json.dumps(live_options(builtin_only=True), indent=1) + "\n")


def _has_plugins() -> bool:
    from retrieval.registry import REGISTRIES

    return any(
        r.entry_point_group and importlib.metadata.entry_points(group=r.entry_point_group)
        for r in REGISTRIES
    )


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from retrieval.config import CONFIG_DIR
    from retrieval.registry import REGISTRIES

    if _has_plugins():
        table = live_options(builtin_only=False)
    else:
        table = json.loads(BUILTIN_OPTIONS.read_text())
    console = Console()
    for registry in REGISTRIES:
        shown = Table(title=f"{registry.kind}s ({registry.config_key}) and their options")
        shown.add_column("name")
        shown.add_column("options")
        for name, text in sorted(table[registry.kind].items()):
            shown.add_row(name, text)
        console.print(shown)
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
