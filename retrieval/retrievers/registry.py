"""Retriever registry (timm's ``register_model`` pattern) plus an entry-point group.

A separate package adds a retriever without editing this one by declaring::

    [project.entry-points."retrieval.retrievers"]
    my_retriever = "my_package.module:MyRetriever"

The entry's target is a class or factory function; its keyword arguments (with type
hints and defaults) are the config keys ``retriever.*`` accepts.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from retrieval.retrievers.base import Retriever

ENTRY_POINT_GROUP = "retrieval.retrievers"

Factory = Callable[..., Retriever]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}
_ENTRY_POINTS_LOADED = False


def register_retriever(name: str) -> Callable[[F], F]:
    """Decorator registering a retriever class or factory under ``name``."""

    def wrap(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"retriever {name!r} is already registered by {existing!r}")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_builtin() -> None:
    # Importing the modules runs their @register_retriever decorators.
    import retrieval.retrievers.clip  # noqa: F401

    for module in ("dense_clip", "cluster_clip", "owlvit"):
        try:
            importlib.import_module(f"retrieval.retrievers.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"retrieval.retrievers.{module}":
                raise


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            target = ep.load()
        except Exception as err:  # a broken plugin must not break the built-in ones
            raise ImportError(
                f"retriever plugin {ep.name!r} ({ep.value}) failed to import: {err}. "
                f"Fix or uninstall the package that declares it in the "
                f"{ENTRY_POINT_GROUP!r} entry-point group."
            ) from err
        if ep.name not in _REGISTRY and callable(target):
            _REGISTRY[ep.name] = target


def _ensure_loaded() -> None:
    _load_builtin()
    _load_entry_points()


def list_retrievers() -> list[str]:
    """Names of every registered retriever, built-in and from plugins."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_factory(name: str) -> Factory:
    """The class or function registered under ``name``, with a did-you-mean error."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown retriever {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}."
        ) from None


def factory_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a retriever accepts: the config keys of ``retriever.*``."""
    factory = get_factory(name)
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_retriever(name: str, **kwargs: Any) -> Retriever:
    """Builds the retriever registered under ``name`` (usable from a notebook)."""
    factory = get_factory(name)
    params = factory_parameters(name)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, params, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"retriever {name!r} has no option {key!r}.{hint} Options: {', '.join(params)}."
        )
    retriever = factory(**kwargs)
    if not isinstance(retriever, Retriever):
        raise TypeError(f"retriever {name!r} built a {type(retriever).__name__}, not a Retriever")
    return retriever
