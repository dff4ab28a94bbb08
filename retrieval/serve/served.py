"""One index as the server holds it: opened once, its model loaded, its own batcher,
worker thread, image lookups and counters."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from retrieval.index import SearchIndex, open_index
from retrieval.index.base import Hit
from retrieval.serve.batching import Batcher
from retrieval.serve.images import ImageFiles
from retrieval.serve.queries import Answer, Counters, Job, answer_batch


class ServedIndex:
    """An index behind the API.

    Args:
        name: what requests call it (``?index=NAME``, ``/api/images/NAME/...``).
        folder: the index folder.
        device: where its model and exact search run.
        max_batch, wait_ms: the batcher's settings.
    """

    def __init__(
        self,
        name: str,
        folder: str | Path,
        device: str = "auto",
        max_batch: int = 64,
        wait_ms: float = 2.0,
    ) -> None:
        self.name = name
        self.index: SearchIndex = open_index(folder, device)
        self.retriever = self.index.retriever()  # loaded now, not on the first query
        self.counters = Counters()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"index-{name}")
        self.batcher: Batcher[Job, Answer] = Batcher(
            self.run_batch, self.executor, max_batch, wait_ms
        )
        self.images = self._image_files()
        self.index.metadata()  # so is the filter table (a broken one fails at start)

    def check_where(self, where: str) -> None:
        """Evaluates ``where`` over the index's filter columns, so a bad filter is its own
        request's 400 before the query joins a batch, never a batch-mate's failure.

        Raises:
            ConfigError: the filter's one message (as the search would give it).
        """
        self.index.allowed_ids(where)

    def encode_picture(self, image: Image.Image) -> Tensor:
        """An uploaded picture's representatives ``[R, D]``, its multi-vector query (in
        the worker thread, counted as a model call)."""
        self.counters.model_calls += 1
        return self.index.picture_queries(image)

    def run_batch(self, jobs: list[Job]) -> list[Any]:
        self.refresh()
        return answer_batch(self.index, jobs, self.counters)

    async def current(self) -> None:
        """:meth:`refresh` in the index's worker thread (never beside a running search)."""
        await asyncio.wrap_future(self.executor.submit(self.refresh))

    def refresh(self) -> None:
        """Picks up a committed ``retrieval index update`` (new generation) before a
        batch is answered; the id -> file map is rebuilt with it."""
        if self.index.refresh():
            self.images = self._image_files()

    def _image_files(self) -> ImageFiles:
        """The index's id -> file map, built now rather than by a request."""
        files = ImageFiles(self.name, self.index, self.counters)
        files.paths([])
        return files

    def info(self) -> dict[str, Any]:
        """The index as ``GET /api/indexes`` lists it."""
        m = self.index.manifest
        return {
            "name": self.name,
            "backend": m.backend,
            "retriever": m.retriever,
            "images": m.images,
            "representatives": m.representatives,
            "embed_dim": self.index.embed_dim,
            "recall": self.index.recall,
            "generation": self.index.generation,
            "metadata_columns": self.index.metadata().column_names,
            "random_weights": bool(getattr(self.retriever, "random_weights", False)),
        }

    def hits_json(self, hits: list[Hit]) -> list[dict[str, Any]]:
        """Hits as the API returns them: the one hit shape (:mod:`retrieval.index.hits`,
        as ``retrieval search --json`` writes it) plus each image's URL here."""
        files = self.images.paths([h.image_id for h in hits])
        return [
            {
                **hit.record(rank, files.get(hit.image_id)),
                "image_url": f"/api/images/{self.name}/{hit.image_id}",
            }
            for rank, hit in enumerate(hits, start=1)
        ]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.index.close()
