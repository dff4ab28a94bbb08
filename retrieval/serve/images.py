"""Pictures by image id: the file (resized, a representative's box drawn), the query's
heatmap over the image's cells, and the query vector of a region drawn on the image.

Only ids are ever taken from a request: the file is the one the index's run names for
that id (its collection table, else its dataset), opened by
:func:`~retrieval.data.images.load_image` inside the run's image roots (the embed phase's
check, again at reading time: a file swapped for a symlink out of the root is refused),
so no request path reaches the disk. The id -> file map and the id -> shard row map are
built once per index, on first use, not per request.

Cells: a Dense-CLIP run stores them (read from its shards); for Cluster-CLIP (cluster
means stored, not cells) they are computed from the picture by one backbone pass of the
index's retriever, in the index's worker thread, and the last :data:`CELL_CACHE` images'
cells are kept, so a page of heatmaps for one query and then the next query cost one
pass per image, not one per request.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from retrieval.data.images import OUTSIDE_ROOT, BadImageError, load_image
from retrieval.index import SearchIndex
from retrieval.index.base import Hit
from retrieval.report.drawing import (
    GalleryItem,
    cell_heat,
    cell_maps,
    dense_cells,
    draws_cells,
    heat_panel,
    match_panel,
    stored_cells,
)
from retrieval.representatives import Representatives
from retrieval.retrievers.base import argmax_representative, max_cosine
from retrieval.serve.errors import ApiError
from retrieval.serve.queries import Counters
from retrieval.store.run_folder import RunFolder
from retrieval.store.shards import ShardReader

MAX_SIDE = 2048
CELL_CACHE = 256  # images whose computed cells are kept


class ImageFiles:
    """The image files, stored representatives and cells of one index's images, by id."""

    def __init__(self, name: str, index: SearchIndex, counters: Counters | None = None) -> None:
        self.name = name
        self.index = index
        self.counters = counters if counters is not None else Counters()
        self._lock = threading.Lock()
        self._paths: dict[int, Path | None] | None = None
        self._roots: tuple[Path, ...] | None = None
        self._shard_rows: dict[int, tuple[Path, int]] | None = None
        self._cells: OrderedDict[int, Tensor] = OrderedDict()

    def paths(self, image_ids: list[int]) -> dict[int, Path | None]:
        """Files of ``image_ids`` (None where the run cannot name one)."""
        with self._lock:
            if self._paths is None:
                live = self.index.live_image_ids().tolist()
                self._paths, self._roots = self.index.image_files(live)
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
        return path

    def picture(self, image_id: int) -> tuple[Path, Image.Image]:
        """The file and its decoded picture (:func:`load_image` inside the run's roots):
        403 for a file that leads out of them, 404 for one missing or unreadable."""
        path = self.path(image_id)
        try:
            return path, load_image(path, self._roots)
        except BadImageError as err:
            if OUTSIDE_ROOT in err.reason:
                raise ApiError(
                    403,
                    f"the file of image {image_id} is not shown: it leads {err.reason}; "
                    f"put the picture itself inside the image folder",
                ) from None
            what = "missing" if "not found" in err.reason else f"unreadable ({err.reason})"
            raise ApiError(404, f"the file of image {image_id} is {what}: {path}") from None

    def reps(self, image_id: int) -> Representatives | None:
        """Image ``image_id``'s stored representatives (from the run's shards), or None."""
        with self._lock:
            if self._shard_rows is None:
                self._shard_rows = RunFolder(self.index.run_dir).store().locate()
            where = self._shard_rows.get(image_id)
        if where is None:
            return None
        with ShardReader(where[0]) as reader:
            return reader.rows(where[1], where[1] + 1)

    def cells(self, image_id: int, picture: Image.Image | None = None) -> Tensor | None:
        """``[h, w, D]`` Dense-CLIP cells of the image: stored (Dense-CLIP), else computed
        by one backbone pass and cached (Cluster-CLIP), else None (whole-image retrievers).
        May run the model: call it in the index's worker thread."""
        if image_id in self._cells:
            self._cells.move_to_end(image_id)
            return self._cells[image_id]
        stored = self.reps(image_id)
        cells = None if stored is None else stored_cells(stored)
        if cells is None:
            retriever = self.index.retriever()
            if not draws_cells(retriever):
                return None
            if picture is None:
                picture = self.picture(image_id)[1]
            cells = dense_cells(retriever, [picture])[0]
            self.counters.model_calls += 1
        self._cells[image_id] = cells
        if len(self._cells) > CELL_CACHE:
            self._cells.popitem(last=False)
        return cells

    def no_cells(self) -> ApiError:
        retriever = self.index.manifest.retriever.get("name")
        return ApiError(
            404,
            f"index {self.name!r} has no heatmaps: its retriever ({retriever}) gives "
            f"whole-image embeddings, with no cells to compare the query with (Dense-CLIP "
            f"and Cluster-CLIP indexes have them)",
        )

    def side(self, picture: Image.Image, size: int | None) -> int:
        """``size``, or the image's own longer side, at most :data:`MAX_SIDE`."""
        return size if size is not None else min(max(picture.size), MAX_SIDE)

    def photo(self, image_id: int, size: int | None, rep: int | None) -> bytes:
        """JPEG of the image fitted into ``size`` (or as is, capped), with representative
        ``rep``'s box (and its cluster's cells, when stored) drawn when asked."""
        path, picture = self.picture(image_id)
        hit, members = Hit(image_id, 0.0, -1, None), None
        if rep is not None:
            try:
                vector, box = self.index.representative(image_id, rep)
            except LookupError as err:
                raise ApiError(404, f"{err} (index {self.name!r})") from None
            hit = Hit(image_id, 0.0, rep, box)
            stored = self.reps(image_id)
            if stored is not None and rep < stored.embeddings.shape[1]:
                members = cell_maps(vector, stored, rep)[0]
        item = GalleryItem(1, hit, path, members, roots=self._roots)
        return encode(match_panel(item, self.side(picture, size)), "JPEG")

    def heatmap(self, image_id: int, query: Tensor, size: int | None) -> bytes:
        """PNG of the query's cosine per cell over the image (the gallery's heat panel, the
        photo's size, its colour bar along the bottom edge), with the box of the
        representative that gives the image its score. May run the model (Cluster-CLIP's
        cells): call it in the index's worker thread."""
        path, picture = self.picture(image_id)
        cells = self.cells(image_id, picture)
        if cells is None:
            raise self.no_cells()
        stored = self.reps(image_id)
        hit, members = Hit(image_id, 0.0, -1, None), None
        if stored is not None:
            q, reps = query.float()[None], stored.to(dtype=torch.float32)
            rep = int(argmax_representative(q, reps)[0, 0])
            box = None
            if stored.boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in stored.boxes[0, rep])
                box = (x0, y0, x1, y1)
            hit = Hit(image_id, float(max_cosine(q, reps)[0, 0]), rep, box)
            members = cell_maps(query, stored, rep)[0]
        item = GalleryItem(1, hit, path, members, cell_heat(cells, query), self._roots)
        panel = heat_panel(item, self.side(picture, size), bar="inside")
        assert panel is not None  # the picture was read above
        return encode(panel, "PNG")

    def region_vector(self, image_id: int, box: tuple[float, float, float, float]) -> Tensor:
        """The query vector of ``box`` (normalised xyxy) drawn on image ``image_id``: its
        cells under the box (:func:`region_of_cells`), or, for an index without cells,
        the crop encoded by the retriever (:func:`crop_vector`). May run the model: call
        it in the index's worker thread."""
        check_box(box)
        _, picture = self.picture(image_id)
        cells = self.cells(image_id, picture)
        if cells is not None:
            return region_of_cells(cells, box)
        w, h = picture.size
        x0, y0 = int(box[0] * w), int(box[1] * h)
        crop = picture.crop(
            (x0, y0, max(round(box[2] * w), x0 + 1), max(round(box[3] * h), y0 + 1))
        )
        self.counters.model_calls += 1
        return crop_vector(self.index.retriever(), crop)


@torch.no_grad()
def crop_vector(retriever: Any, crop: Image.Image) -> Tensor:
    """One query vector for a crop, for retrievers without cells (whole-image CLIP: its
    one embedding; any other: the normalised mean of its valid representatives)."""
    pixels = retriever.image_transform(crop).unsqueeze(0)
    reps = retriever.encode_images(pixels.to(retriever.device))
    emb, mask = reps.embeddings[0].float().cpu(), reps.mask[0].cpu()
    return F.normalize(emb[mask].mean(dim=0), dim=0)


def check_box(box: tuple[float, float, float, float]) -> None:
    """Refuses a box of no area (422)."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ApiError(422, f"box {list(box)} has no area: give x0 < x1 and y0 < y1 in 0..1")


def region_of_cells(cells: Tensor, box: tuple[float, float, float, float]) -> Tensor:
    """``normalise(Σ_c a_c x_c)`` over the ``[h, w, D]`` cells ``x_c``, ``a_c`` the share
    of cell ``c``'s area inside ``box`` (normalised xyxy): cells wholly inside count fully,
    cells the box cuts count in part, and a box inside one cell is that cell."""
    h, w, _ = cells.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    edges_x, edges_y = torch.linspace(0, 1, w + 1), torch.linspace(0, 1, h + 1)
    cover_x = (edges_x[1:].clamp(max=x1) - edges_x[:-1].clamp(min=x0)).clamp(min=0) * w
    cover_y = (edges_y[1:].clamp(max=y1) - edges_y[:-1].clamp(min=y0)).clamp(min=0) * h
    weights = cover_y[:, None] * cover_x[None, :]  # [h, w], each in 0..1
    return F.normalize((weights[..., None] * cells.float()).sum(dim=(0, 1)), dim=0)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return buffer.getvalue()
