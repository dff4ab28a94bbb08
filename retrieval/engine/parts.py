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
    """Builds (and seeds) the run's retriever, then its dataset with the retriever's
    transform; a warning from building the model (random weights, QuickGELU) is logged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retriever = build_retriever(cfg)
    for w in caught:
        log.warning("%s", w.message)
    return RunParts(retriever, build_dataset(cfg, retriever.image_transform))
