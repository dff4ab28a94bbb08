"""Aggregators: dense grid embeddings (Dense-CLIP) -> a few representatives (Cluster-CLIP).

``create_aggregator(name, **options)`` builds one; ``list_aggregators()`` names them:
``none`` (Dense-CLIP), ``kmeans`` (K.M.), ``agglomerative`` (AG-F with ``n_clusters``,
AG-T with ``distance_threshold``) and ``prune`` (our reading of R.P.). Each also has a
plain-function form returning a cluster label per cell.
"""

from retrieval.aggregate.agglomerative import Agglomerative, agglomerative_labels, grid_adjacency
from retrieval.aggregate.base import (
    Aggregator,
    NoAggregation,
    create_aggregator,
    grid_cell_boxes,
    list_aggregators,
    register_aggregator,
    representatives_from_labels,
)
from retrieval.aggregate.kmeans import KMeans, kmeans_labels, kmeans_plus_plus
from retrieval.aggregate.prune import Prune, prune_labels

__all__ = [
    "Agglomerative",
    "Aggregator",
    "KMeans",
    "NoAggregation",
    "Prune",
    "agglomerative_labels",
    "create_aggregator",
    "grid_adjacency",
    "grid_cell_boxes",
    "kmeans_labels",
    "kmeans_plus_plus",
    "list_aggregators",
    "prune_labels",
    "register_aggregator",
    "representatives_from_labels",
]
