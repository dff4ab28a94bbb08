"""Large-scale search: index a run's representatives, answer ad-hoc text queries.

``build_index(run_dir, backend)`` writes an index folder; ``open_index(folder)`` reads
it back; ``SearchIndex.search("a stroller", top=50)`` returns ``Hit(image_id, score,
rep_index, box)``, an image's score being the max cosine over its representatives.
Backends (``exact``, ``faiss``, ``faiss-flat``, ``faiss-ivfpq``, ``lancedb``, ``milvus``)
share one interface (:class:`Backend`); approximate ones record their recall against
exact search.
"""

from retrieval.errors import IndexFileError
from retrieval.factory import create_backend, list_backends, open_backend, register_backend
from retrieval.index.base import Backend, Hit
from retrieval.index.build import build_index
from retrieval.index.search import SearchIndex, open_index, search
from retrieval.index.table import RepTable

__all__ = [
    "Backend",
    "Hit",
    "IndexFileError",
    "RepTable",
    "SearchIndex",
    "build_index",
    "create_backend",
    "list_backends",
    "open_backend",
    "open_index",
    "register_backend",
    "search",
]
