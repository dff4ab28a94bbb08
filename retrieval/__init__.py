"""Object-centric open-vocabulary image retrieval: retrievers, metrics and search.

The core (retrievers, aggregate, data, metrics, store, index) imports neither Lightning
nor wandb; ``retrieval.engine`` and ``retrieval.report`` do (docs/architecture.md).
The names below load on first use (:mod:`retrieval.lazy`), so ``import retrieval``
costs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.lazy import lazy_exports

if TYPE_CHECKING:
    from retrieval.representatives import Representatives
    from retrieval.retrievers.base import (
        Retriever,
        create_retriever,
        list_retrievers,
        register_retriever,
    )

__version__ = "0.1.0"

__all__ = [
    "Representatives",
    "Retriever",
    "__version__",
    "create_retriever",
    "list_retrievers",
    "register_retriever",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "create_retriever": "retrieval.retrievers.base",
        "list_retrievers": "retrieval.retrievers.base",
        "register_retriever": "retrieval.retrievers.base",
        "Representatives": "retrieval.representatives",
        "Retriever": "retrieval.retrievers.base",
    },
)
