"""Configs -> components: the config-driven builders the engine and the search side
share (``build_retriever(cfg)``, ``build_dataset(cfg, transform)``, ``data_fingerprint``).
Lightning-free.

Each kind's ``register_*`` / ``list_*`` / ``create_*`` live beside its base class
(``retrievers/base.py``, ``data/base.py``, ``aggregate/base.py``, ``index/base.py``) and
are re-exported here, where they were first published. The index backends' load on
first use (:mod:`retrieval.lazy`): the index package builds on this module (a text
query builds the run's retriever), never the other way round.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from retrieval.aggregate.base import create_aggregator, list_aggregators, register_aggregator
from retrieval.config import as_dict, dataset_options, retriever_options
from retrieval.data.base import ImageDataset, create_dataset, list_datasets, register_dataset
from retrieval.lazy import lazy_exports
from retrieval.registry import DATASETS
from retrieval.retrievers.base import (
    Retriever,
    create_retriever,
    list_retrievers,
    register_retriever,
)

if TYPE_CHECKING:
    from retrieval.data.base import Transform
    from retrieval.index.base import create_backend, list_backends, open_backend, register_backend

__all__ = [
    "build_dataset",
    "build_retriever",
    "create_aggregator",
    "create_backend",
    "create_dataset",
    "create_retriever",
    "data_fingerprint",
    "list_aggregators",
    "list_backends",
    "list_datasets",
    "list_retrievers",
    "open_backend",
    "register_aggregator",
    "register_backend",
    "register_dataset",
    "register_retriever",
    "seed_everything",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    dict.fromkeys(
        ("create_backend", "list_backends", "open_backend", "register_backend"),
        "retrieval.index.base",
    ),
)


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


def build_dataset(cfg: DictConfig, transform: Transform | None = None) -> ImageDataset:
    """The configured dataset: its options as :func:`retrieval.config.dataset_options`
    reads them from the validated config, plus ``transform`` (None for the engine: its
    loader applies the retriever's).

    Raises:
        ConfigError: an argument the dataset requires is not set.
    """
    name, options = dataset_options(cfg)
    return create_dataset(name, transform=transform, **options)


def data_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The ``data.*`` settings that decide what each image id's pixels are: every key but
    the dataset's ``LABEL_ONLY_OPTIONS``, paths as the validated config resolved them (so
    ``./x`` and ``/abs/x`` agree)."""
    options = as_dict(cfg.data)
    label_only: frozenset[str] = getattr(
        DATASETS.get(options["name"]), "LABEL_ONLY_OPTIONS", frozenset()
    )
    return {key: value for key, value in options.items() if key not in label_only}
