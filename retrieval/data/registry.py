"""Dataset registry: config ``data.name`` -> dataset class (mirrors the retriever one).

``coco`` serves COCO itself and any COCO-format folder; ``lvis`` and ``nuimages``
register themselves from their own modules when those exist.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from retrieval.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

DATASETS = Registry(
    "dataset",
    "data.name",
    builtin=tuple(f"retrieval.data.{m}" for m in ("coco", "lvis", "nuimages")),
)


def register_dataset(name: str) -> Callable[[F], F]:
    """Decorator registering a dataset class or factory under ``name``."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    return DATASETS.names()


def get_dataset_factory(name: str) -> Callable[..., Any]:
    """The class or function registered under ``name``, with a did-you-mean error."""
    return DATASETS.get(name)


def dataset_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a dataset accepts: the config keys of ``data.*``."""
    return DATASETS.parameters(name)


def create_dataset(name: str, **kwargs: Any) -> Any:
    """Builds the dataset registered under ``name``; an unknown option names the valid ones."""
    return DATASETS.create(name, **kwargs)
