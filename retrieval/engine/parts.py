"""What both phases of a run build from its config: the retriever and the dataset.

Lightning-free, so the score phase and the search side stay free of it too.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from omegaconf import DictConfig

from retrieval.data.base import ImageDataset
from retrieval.factory import build_dataset, build_retriever
from retrieval.retrievers.base import Retriever

log = logging.getLogger("retrieval")


@dataclass
class RunParts:
    """The retriever and dataset of one run, built once and shared by its phases."""

    retriever: Retriever
    dataset: ImageDataset


def build_parts(cfg: DictConfig) -> RunParts:
    """Builds the run's dataset, then (and seeds) its retriever, and hands the dataset the
    retriever's transform; a warning from building the model (random weights, QuickGELU)
    is logged.

    The dataset comes first so that bad annotations, missing files or an empty dataset
    stop the run before any model is loaded. It is built without a transform and given
    ``retriever.image_transform`` afterwards (the ``transform`` attribute every
    :class:`ImageDataset` reads in ``__getitem__``); a dataset that takes its transform
    only through the constructor (no such attribute) is built again with it.
    """
    dataset = build_dataset(cfg, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retriever = build_retriever(cfg)
    for w in caught:
        log.warning("%s", w.message)
    if hasattr(dataset, "transform"):
        dataset.transform = retriever.image_transform
    else:
        dataset = build_dataset(cfg, retriever.image_transform)
    return RunParts(retriever, dataset)
