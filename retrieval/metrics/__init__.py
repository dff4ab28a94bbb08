"""Retrieval metrics: AP@K (min(K, P) and hits), full AP, small-medium split, per split.

Plain functions live in :mod:`retrieval.metrics.functional`; :class:`RetrievalEvaluation`
wraps :func:`evaluate_rankings` as a torchmetrics ``Metric`` for distributed runs. The
wrapper is imported on first use, because importing torchmetrics takes seconds and the
functions do not need it.
"""

from typing import TYPE_CHECKING

from retrieval.metrics.functional import average_precision, evaluate_rankings, rank_order

if TYPE_CHECKING:
    from retrieval.metrics.metric import RetrievalEvaluation

__all__ = ["RetrievalEvaluation", "average_precision", "evaluate_rankings", "rank_order"]


def __getattr__(name: str) -> object:
    if name == "RetrievalEvaluation":
        from retrieval.metrics.metric import RetrievalEvaluation

        return RetrievalEvaluation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
