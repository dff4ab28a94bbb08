"""Pictures by image id: the file (resized, a representative's box drawn) and the query's
heatmap over the image's cells, drawn by the gallery's own panels.

Only ids are ever taken from a request: the file is the one the index's run names for
that id (its collection table, else its dataset), so no request path reaches the disk.
The id -> file map and the id -> shard row map are built once per index, on first use,
not per request (the gallery's ``explain`` reads every shard each time).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from retrieval.data.images import image_source
from retrieval.index import SearchIndex
from retrieval.index.base import Hit
from retrieval.report.gallery import GalleryItem, cell_maps, heat_panel, image_paths, match_panel
from retrieval.representatives import Representatives
from retrieval.retrievers.base import argmax_representative, max_cosine
from retrieval.serve.errors import ApiError
from retrieval.serve.queries import representative
from retrieval.store.shards import ShardReader, ShardStore

MAX_SIDE = 2048


class ImageFiles:
    """The image files and stored representatives of one index's images, by id."""

    def __init__(self, name: str, index: SearchIndex) -> None:
        self.name = name
        self.index = index
        self._lock = threading.Lock()
        self._paths: dict[int, Path | None] | None = None
        self._shard_rows: dict[int, tuple[Path, int]] | None = None

    def paths(self, image_ids: list[int]) -> dict[int, Path | None]:
        """Files of ``image_ids`` (None where the run cannot name one)."""
        with self._lock:
            if self._paths is None:
                live = self.index.backend.require_table(allow_empty=True).live_image_ids
                self._paths = image_paths(self.index, live.tolist())
        return {i: self._paths.get(i) for i in image_ids}

    def path(self, image_id: int) -> Path:
        """The file of a live image of the index, else a 404 saying which part is missing."""
        paths = self.paths([image_id])
        with self._lock:
            known = image_id in (self._paths or {})
        if not known:
            raise ApiError(404, f"image {image_id} is not in index {self.name!r}")
        path = paths[image_id]
        if path is None:
            raise ApiError(404, f"index {self.name!r} cannot name the file of image {image_id}")
        try:
            source = image_source(path)
        except (OSError, KeyError):
            source = path
        if isinstance(source, Path) and not source.exists():
            raise ApiError(404, f"the file of image {image_id} is missing: {path}")
        return path

    def reps(self, image_id: int) -> Representatives | None:
        """Image ``image_id``'s stored representatives (from the run's shards), or None."""
        with self._lock:
            if self._shard_rows is None:
                found: dict[int, tuple[Path, int]] = {}
                store = ShardStore(self.index.run_dir / "embeddings")
                for shard in store.shard_paths():
                    with ShardReader(shard) as reader:
                        found.update((int(i), (shard, r)) for r, i in enumerate(reader.image_ids))
                self._shard_rows = found
            where = self._shard_rows.get(image_id)
        if where is None:
            return None
        with ShardReader(where[0]) as reader:
            return reader.rows(where[1], where[1] + 1)

    def side(self, path: Path, size: int | None) -> int:
        """``size``, or the image's own longer side, at most :data:`MAX_SIDE`."""
        if size is not None:
            return size
        with Image.open(image_source(path)) as image:
            return min(max(image.size), MAX_SIDE)

    def photo(self, image_id: int, size: int | None, rep: int | None) -> bytes:
        """JPEG of the image fitted into ``size`` (or as is, capped), with representative
        ``rep``'s box (and its cluster's cells, when stored) drawn when asked."""
        path = self.path(image_id)
        hit, members = Hit(image_id, 0.0, -1, None), None
        if rep is not None:
            try:
                vector, box = representative(self.index, image_id, rep)
            except LookupError as err:
                raise ApiError(404, f"{err} (index {self.name!r})") from None
            hit = Hit(image_id, 0.0, rep, box)
            stored = self.reps(image_id)
            if stored is not None and rep < stored.embeddings.shape[1]:
                members = cell_maps(vector, stored, rep)[0]
        panel = match_panel(GalleryItem(1, hit, path, members), self.side(path, size))
        return encode(panel, "JPEG")

    def heatmap(self, image_id: int, query: Tensor, size: int | None) -> bytes:
        """PNG of the query's cosine over the image's cells on the image (the gallery's
        heat panel), with the box of the representative that gives the image its score."""
        path = self.path(image_id)
        stored = self.reps(image_id)
        if stored is None:
            raise ApiError(404, f"image {image_id} has no stored representatives in its run")
        q = query.float()[None]
        rep = int(argmax_representative(q, stored.to(dtype=torch.float32))[0, 0])
        score = float(max_cosine(q, stored.to(dtype=torch.float32))[0, 0])
        box = None
        if stored.boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in stored.boxes[0, rep])
            box = (x0, y0, x1, y1)
        members, heat = cell_maps(query, stored, rep)
        if heat is None:
            retriever = self.index.manifest["retriever"].get("name")
            raise ApiError(
                404,
                f"index {self.name!r} has no cell grid to draw a heatmap on: its retriever "
                f"({retriever}) keeps no per-cell representatives (Dense-/Cluster-CLIP do)",
            )
        item = GalleryItem(1, Hit(image_id, score, rep, box), path, members, np.asarray(heat))
        panel = heat_panel(item, self.side(path, size))
        if panel is None:
            raise ApiError(404, f"the file of image {image_id} is missing: {path}")
        return encode(panel, "PNG")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return buffer.getvalue()
