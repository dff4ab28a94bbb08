"""Object-centric open-vocabulary image retrieval: retrievers, metrics and search.

The core (retrievers, aggregate, data, metrics, store, index) imports neither Lightning
nor wandb; ``retrieval.engine`` and ``retrieval.report`` do (docs/architecture.md).
"""

from retrieval.factory import (
    create_retriever,
    list_retrievers,
    register_retriever,
)
from retrieval.representatives import Representatives
from retrieval.retrievers.base import Retriever

__version__ = "0.1.0"

__all__ = [
    "Representatives",
    "Retriever",
    "__version__",
    "create_retriever",
    "list_retrievers",
    "register_retriever",
]
