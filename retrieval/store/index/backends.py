"""Imports every built-in backend so each registers its name (``--backend``)."""

from retrieval.store.index import exact, faiss_backend, lancedb_backend  # noqa: F401
