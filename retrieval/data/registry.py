"""Dataset registry: config ``data.name`` -> dataset class (mirrors the retriever one).

``coco`` serves COCO itself and any COCO-format folder; ``lvis`` and ``nuimages``
register themselves from their own modules when those exist.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

Factory = Callable[..., Any]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}
_BUILTIN = ("coco", "lvis", "nuimages")


def register_dataset(name: str) -> Callable[[F], F]:
    """Decorator registering a dataset class or factory under ``name``."""

    def wrap(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"dataset {name!r} is already registered by {existing!r}")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_builtin() -> None:
    # Importing a module runs its @register_dataset decorators; a module not written
    # yet is simply absent, a module that fails to import is a real error.
    for module in _BUILTIN:
        try:
            importlib.import_module(f"retrieval.data.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"retrieval.data.{module}":
                raise


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_dataset_factory(name: str) -> Factory:
    """The class or function registered under ``name``, with a did-you-mean error."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown dataset {name!r} (config data.name).{hint} "
            f"Registered: {', '.join(sorted(_REGISTRY))}."
        ) from None


def dataset_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a dataset accepts: the config keys of ``data.*``."""
    factory = get_dataset_factory(name)
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_dataset(name: str, **kwargs: Any) -> Any:
    """Builds the dataset registered under ``name``; an unknown option names the valid ones."""
    factory = get_dataset_factory(name)
    params = dataset_parameters(name)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, params, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"dataset {name!r} has no option {key!r} (config data.{key}).{hint} "
            f"Options: {', '.join(params)}."
        )
    return factory(**kwargs)
