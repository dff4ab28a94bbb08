"""Retrieval metrics: AP@K (min(K, P) and hits), full AP, small-medium split, per split.

Plain functions live in :mod:`retrieval.metrics.functional`; :class:`RetrievalEvaluation`
wraps :func:`evaluate_rankings` as a torchmetrics ``Metric`` for distributed runs.
"""

from retrieval.metrics.functional import average_precision, evaluate_rankings, rank_order
from retrieval.metrics.metric import RetrievalEvaluation

__all__ = ["RetrievalEvaluation", "average_precision", "evaluate_rankings", "rank_order"]
