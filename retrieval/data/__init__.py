"""Datasets and their ground truth: images in, relevance per (category, image) out.

``retrieval.data.synthetic`` (a generated COCO-format benchmark) is imported on its own,
so that ``python -m retrieval.data.synthetic`` runs it without a double import. The names
below load on first use (:mod:`retrieval.lazy`): ``retrieval.data.download`` and the
other light modules import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.lazy import lazy_exports

if TYPE_CHECKING:
    from retrieval.data.base import create_dataset, list_datasets, register_dataset
    from retrieval.data.coco import CocoDataset
    from retrieval.data.ground_truth import Category, GroundTruth
    from retrieval.data.images import BadImageError, load_image
    from retrieval.data.names import clean_category_name, query_name

__all__ = [
    "BadImageError",
    "Category",
    "CocoDataset",
    "GroundTruth",
    "clean_category_name",
    "create_dataset",
    "list_datasets",
    "load_image",
    "query_name",
    "register_dataset",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "BadImageError": "retrieval.data.images",
        "Category": "retrieval.data.ground_truth",
        "CocoDataset": "retrieval.data.coco",
        "GroundTruth": "retrieval.data.ground_truth",
        "clean_category_name": "retrieval.data.names",
        "create_dataset": "retrieval.data.base",
        "list_datasets": "retrieval.data.base",
        "load_image": "retrieval.data.images",
        "query_name": "retrieval.data.names",
        "register_dataset": "retrieval.data.base",
    },
)
