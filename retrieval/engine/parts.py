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
    """Builds the run's dataset, then (and seeds) its retriever; a warning from building
    the model (random weights, QuickGELU) is logged.

    The dataset comes first so that bad annotations, missing files or an empty dataset
    stop the run before any model is loaded. It is built without a transform and left as
    built: the embed phase's loader applies ``retriever.image_transform``
    (:mod:`retrieval.engine.loading`).
    """
    dataset = build_dataset(cfg, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retriever = build_retriever(cfg)
    for w in caught:
        log.warning("%s", w.message)
    return RunParts(retriever, dataset)
