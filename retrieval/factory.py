"""Names and configs -> components, in one place (open_clip's ``factory.py``).

Plain functions for each registered kind (``create_retriever("clip", backbone="RN50")``,
``create_dataset``, ``create_aggregator``, ``create_backend``), their ``list_*`` and
``register_*`` companions, and the config-driven builders the engine and the search
side share (``build_retriever(cfg)``, ``build_dataset(cfg, transform)``). Lightning-free.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from retrieval.config import as_dict, config_options, retriever_options
from retrieval.errors import ConfigError
from retrieval.registry import AGGREGATORS, DATASETS, INDEX_BACKENDS, RETRIEVERS

if TYPE_CHECKING:
    from retrieval.aggregate.base import Aggregator
    from retrieval.data.base import ImageDataset, Transform
    from retrieval.index.base import Backend
    from retrieval.retrievers.base import Retriever

F = TypeVar("F", bound=Callable[..., Any])


# retrievers ---------------------------------------------------------------------------
def register_retriever(name: str) -> Callable[[F], F]:
    """Decorator registering a retriever class or factory under ``name``."""
    return RETRIEVERS.register(name)


def list_retrievers() -> list[str]:
    """Names of every registered retriever, built-in and from plugins."""
    return RETRIEVERS.names()


def create_retriever(name: str, **kwargs: Any) -> Retriever:
    """Builds the retriever registered under ``name`` (usable from a notebook).

    Raises:
        ConfigError: it is not a complete retriever (``retrievers.base.check_contract``:
            no ``embed_dim``, one dense-source hook without the other, ...), named with
            its class, before anything is embedded with it.
    """
    from retrieval.retrievers.base import check_contract

    return check_contract(RETRIEVERS.create(name, **kwargs))


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (every device), as Lightning's helper does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_retriever(cfg: DictConfig) -> Retriever:
    """The configured retriever; typed option groups arrive as their dataclasses.

    Seeded with ``run.seed`` first, so a random-weight model is the same wherever the
    run's config builds it: each DDP rank, a later re-score, the search side.
    """
    seed_everything(int(cfg.run.seed))
    return create_retriever(cfg.retriever.name, **retriever_options(cfg))


# datasets -----------------------------------------------------------------------------
def register_dataset(name: str) -> Callable[[F], F]:
    """Decorator registering a dataset class or factory under ``name``."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    return DATASETS.names()


def create_dataset(name: str, **kwargs: Any) -> ImageDataset:
    """Builds the dataset registered under ``name``; an unknown option names the valid ones."""
    return DATASETS.create(name, **kwargs)


def build_dataset(cfg: DictConfig, transform: Transform | None = None) -> ImageDataset:
    """The configured dataset: ``data.*`` as its keyword arguments, plus the protocol
    options it declares and the retriever's ``transform``.

    Raises:
        ConfigError: an argument the dataset requires is not set.
    """
    options = as_dict(cfg.data)
    name = options.pop("name")
    required = [
        key
        for key, param in DATASETS.parameters(name).items()
        if param.default is param.empty and key != "transform"
    ]
    for key in required:
        if options.get(key) in (None, ""):
            raise ConfigError(
                f"data.{key} is not set: pass data.{key}=PATH on the command line "
                f"(see `retrieval data check` and the README's dataset section)"
            )
    for argument, key in config_options(name).items():
        options[argument] = OmegaConf.select(cfg, key)
    return create_dataset(name, transform=transform, **options)


def data_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The ``data.*`` settings that decide what each image id's pixels are: every key but
    the dataset's ``LABEL_ONLY_OPTIONS``, paths resolved (so ``./x`` and ``/abs/x`` agree)."""
    options = as_dict(cfg.data)
    label_only: frozenset[str] = getattr(
        DATASETS.get(options["name"]), "LABEL_ONLY_OPTIONS", frozenset()
    )
    return {
        key: str(Path(value).resolve())
        if isinstance(value, str) and Path(value).exists()
        else value
        for key, value in options.items()
        if key not in label_only
    }


# aggregators --------------------------------------------------------------------------
def register_aggregator(name: str) -> Callable[[F], F]:
    """Class decorator registering an aggregator under ``name`` for :func:`create_aggregator`."""
    return AGGREGATORS.register(name)


def list_aggregators() -> list[str]:
    """Names accepted by :func:`create_aggregator`."""
    return AGGREGATORS.names()


def create_aggregator(name: str, **options: Any) -> Aggregator:
    """Builds a registered aggregator, e.g. ``create_aggregator("kmeans", k=10)``."""
    return AGGREGATORS.create(name, **options)


# index backends -----------------------------------------------------------------------
def register_backend(name: str, **defaults: Any) -> Callable[[F], F]:
    """Class decorator: makes a backend available as ``--backend name``; ``defaults``
    are options it gets unless given (one class can serve several names)."""
    return INDEX_BACKENDS.register(name, **defaults)


def list_backends() -> list[str]:
    """Names accepted by ``--backend``."""
    return INDEX_BACKENDS.names()


def create_backend(
    name: str, folder: str | Path, dim: int, device: str = "auto", **options: Any
) -> Backend:
    """A new, empty backend ``name`` writing into ``folder``."""
    backend = INDEX_BACKENDS.create(name, folder, dim, device, **options)
    backend.name = name
    return backend


def open_backend(
    name: str, folder: str | Path, dim: int, device: str = "auto", **state: Any
) -> Backend:
    """A finished backend ``name`` read back from ``folder`` with its stored ``state``."""
    cls = INDEX_BACKENDS.get(name)
    backend = cls.open(folder, dim, device, **{**INDEX_BACKENDS.defaults[name], **state})  # type: ignore[attr-defined]
    backend.name = name
    return backend
