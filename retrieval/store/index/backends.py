"""Imports every built-in backend so each registers its name (``--backend``)."""

from retrieval.store.index import (  # noqa: F401
    exact,
    faiss_backend,
    lancedb_backend,
    milvus_backend,
)
