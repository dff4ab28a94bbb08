"""Lazy package attributes (PEP 562): a package ``__init__`` names what it exports and
where each lives, and a name's module is imported on first access. Importing the package
(every ``retrieval`` command does) then costs nothing the command does not use: torch,
above all, is loaded only by the commands that run a model or read a shard."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name
    to the module defining it; the value is cached in ``namespace`` once imported."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
