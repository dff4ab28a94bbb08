"""Large-scale search: index a run's representatives, answer ad-hoc text queries.

``build_index(run_dir, backend)`` writes an index folder; ``open_index(folder)`` reads
it back; ``SearchIndex.search("a stroller", top=50)`` returns ``Hit(image_id, score,
rep_index, box)``, an image's score being the max cosine over its representatives.
Backends (``exact``, ``faiss``, ``faiss-flat``, ``faiss-ivfpq``, ``lancedb``, ``milvus``)
share one front end (:class:`Backend`), each with its engine (:class:`Engine`, the small
interface a backend plugin implements); approximate ones record their recall against
exact search. ``update_index(folder)`` follows the run as it grows and shrinks (new
images added, removed ones dropped, recall measured again) by generations.

Opening an index and reading its manifest need no torch; the names that do (backends,
build, update) load on first use (:mod:`retrieval.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.errors import IndexFileError
from retrieval.index.hits import Hit
from retrieval.index.search import SearchIndex, open_index, search  # the function, not the module
from retrieval.lazy import lazy_exports

if TYPE_CHECKING:
    from retrieval.index.base import (
        Backend,
        create_backend,
        list_backends,
        open_backend,
        register_backend,
    )
    from retrieval.index.build import build_index
    from retrieval.index.engine import Engine, EngineOptions
    from retrieval.index.table import RepTable
    from retrieval.index.update import UpdateResult, update_index

__all__ = [
    "Backend",
    "Engine",
    "EngineOptions",
    "Hit",
    "IndexFileError",
    "RepTable",
    "SearchIndex",
    "UpdateResult",
    "build_index",
    "create_backend",
    "list_backends",
    "open_backend",
    "open_index",
    "register_backend",
    "search",
    "update_index",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "Backend": "retrieval.index.base",
        "Engine": "retrieval.index.engine",
        "EngineOptions": "retrieval.index.engine",
        "RepTable": "retrieval.index.table",
        "UpdateResult": "retrieval.index.update",
        "build_index": "retrieval.index.build",
        "create_backend": "retrieval.index.base",
        "list_backends": "retrieval.index.base",
        "open_backend": "retrieval.index.base",
        "register_backend": "retrieval.index.base",
        "update_index": "retrieval.index.update",
    },
)
