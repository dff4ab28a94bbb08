"""``retrieval serve``: indexes behind an HTTP API (FastAPI + uvicorn) and a search page.

A run layer beside :mod:`retrieval.report`: it uses the core (indexes, retrievers,
shards) and the report's drawing (:mod:`retrieval.report.drawing`), never the engine,
Lightning or wandb. The pieces: :mod:`~retrieval.serve.app` (the application),
:mod:`~retrieval.serve.routes` (its routers: service, search, images) and
:mod:`~retrieval.serve.deps` (what they share), :mod:`~retrieval.serve.served` (one loaded index),
:mod:`~retrieval.serve.batching` (dynamic batching of queries),
:mod:`~retrieval.serve.queries` (text, compound and by-example query vectors),
:mod:`~retrieval.serve.images` (pictures, boxes and heatmaps by image id) and
:mod:`~retrieval.serve.security` (token, limits, upload checks). docs/serve.md is the
user's guide.
"""

from __future__ import annotations

from retrieval.serve.app import create_app
from retrieval.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
