"""Retriever registry, plus the ``retrieval.retrievers`` entry-point group.

A separate package adds a retriever without editing this one by declaring::

    [project.entry-points."retrieval.retrievers"]
    my_retriever = "my_package.module:MyRetriever"

The entry's target is a class or factory function; its keyword arguments (with type
hints and defaults) are the config keys ``retriever.*`` accepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from retrieval.registry import Registry
from retrieval.retrievers.base import Retriever

ENTRY_POINT_GROUP = "retrieval.retrievers"
F = TypeVar("F", bound=Callable[..., Retriever])

RETRIEVERS = Registry(
    "retriever",
    "retriever.name",
    builtin=tuple(
        f"retrieval.retrievers.{m}" for m in ("clip", "dense_clip", "cluster_clip", "owlvit")
    ),
    entry_point_group=ENTRY_POINT_GROUP,
)


def register_retriever(name: str) -> Callable[[F], F]:
    """Decorator registering a retriever class or factory under ``name``."""
    return RETRIEVERS.register(name)


def list_retrievers() -> list[str]:
    """Names of every registered retriever, built-in and from plugins."""
    return RETRIEVERS.names()


def get_factory(name: str) -> Callable[..., Retriever]:
    """The class or function registered under ``name``, with a did-you-mean error."""
    return RETRIEVERS.get(name)


def factory_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a retriever accepts: the config keys of ``retriever.*``."""
    return RETRIEVERS.parameters(name)


def create_retriever(name: str, **kwargs: Any) -> Retriever:
    """Builds the retriever registered under ``name`` (usable from a notebook)."""
    retriever = RETRIEVERS.create(name, **kwargs)
    if not isinstance(retriever, Retriever):
        raise TypeError(f"retriever {name!r} built a {type(retriever).__name__}, not a Retriever")
    return retriever
