"""Datasets and their ground truth: images in, relevance per (category, image) out.

``retrieval.data.synthetic`` (a generated COCO-format benchmark) is imported on its own,
so that ``python -m retrieval.data.synthetic`` runs it without a double import.
"""

from retrieval.data.coco import CocoDataset
from retrieval.data.ground_truth import Category, GroundTruth
from retrieval.data.images import BadImageError, load_image
from retrieval.data.names import clean_category_name, query_name
from retrieval.factory import create_dataset, list_datasets, register_dataset

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
