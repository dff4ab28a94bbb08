"""The backend interface: ``add(image_ids, reps)``, ``finish()``, ``search(q, k)``.

An image's score is the max cosine over its representatives, so a backend either groups
natively or fetches the top representatives and groups them by image (over-fetch). Every
backend answers a query with table rows, the best-matching representative of each top
image; the base class turns rows into :class:`Hit` (image id, score, representative
index, box). Backends register under a name with :func:`register_backend`.

A finished index grows and shrinks by generations: ``add(image_ids, reps)`` and
``remove(image_ids)`` on it stage a change, ``commit()`` writes the next generation of
the table (new rows appended, removed images tombstoned) and hands the backend the rows
that came and went through its :meth:`Backend.add_rows` / :meth:`Backend.remove_rows`
hooks, then :meth:`Backend.save` writes its files for the new generation under new
names. A backend without those hooks (a plugin written before updates) is refused with
a message saying to rebuild.

Filtered search (``search(queries, k, allowed=ids)``, the allow-list a ``--where``
expression gave, see :mod:`retrieval.index.filters`) answers the top ``k`` among the
allowed images only; removed images are never among them. The base class turns the ids
into table positions and calls :meth:`Backend.search_rows_in`, which each backend pushes
down as far as its engine allows:

- ``exact``: scores only the allowed images' rows (a subset scan), or, when they are
  most of the table, the whole table with the other images masked before the top-k;
- ``faiss`` (flat, ivfpq): ``SearchParameters(sel=IDSelectorBatch(allowed rows))`` in
  faiss's own search, the over-fetch loop unchanged (so flat still finds ``k`` images
  whenever ``k`` are allowed; ivfpq probes more lists while short of them);
- ``lancedb``: a prefilter ``where("pos IN (...)", prefilter=True)`` on the image
  position column (up to ``lancedb_backend.WHERE_MAX`` images);
- ``milvus``: the search's ``filter="image in [...]"`` on the image field (up to
  ``milvus_backend.FILTER_MAX`` images);
- anything else (a plugin, or an allow-list past those limits): the default
  :meth:`Backend.search_rows_in`, exact re-scoring of the allowed images' rows from the
  fp16 table: always correct, and cheap when few images are allowed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from retrieval.errors import ConfigError, IndexFileError
from retrieval.index.hits import Hit
from retrieval.index.kernels import RowHits, exact_search
from retrieval.index.table import RepTable, TableWriter
from retrieval.registry import INDEX_BACKENDS
from retrieval.representatives import Representatives

B = TypeVar("B", bound="type[Backend]")


class Backend(ABC):
    """A vector index over a :class:`RepTable`, answering top images by max cosine.

    Args:
        folder: where the table and the backend's own files live.
        dim: embedding size ``D``.
        device: ``auto``, ``cpu`` or ``cuda[:i]`` where the backend computes on torch.
        options: backend-specific settings (see each backend); tuned values included.
    """

    name: str = ""
    approximate: ClassVar[bool] = False

    def __init__(self, folder: str | Path, dim: int, device: str = "auto", **options: Any) -> None:
        self.folder = Path(folder)
        self.dim = dim
        self.device = device
        self.options = options
        self.table: RepTable | None = None
        self.generation = 0
        self.updating = False  # opened by an update (see open)
        self._writer: TableWriter | None = None
        self._removing: list[np.ndarray] = []  # image positions staged for removal

    def add(self, image_ids: np.ndarray | Tensor, reps: Representatives) -> None:
        """Adds a batch of images with their representatives: before :meth:`finish` to
        build, after it to grow the index (applied by :meth:`commit`)."""
        if self.table is not None:
            self.require_updatable()
            if self._writer is None:
                self._writer = TableWriter(self.folder, self.dim, self.table, self.generation + 1)
        elif self._writer is None:
            self._writer = TableWriter(self.folder, self.dim)
        self._writer.append(image_ids, reps)

    def remove(self, image_ids: np.ndarray | Tensor) -> int:
        """Stages the removal of images from a finished index (applied by :meth:`commit`);
        ids the index does not hold (or has removed) are skipped.

        Returns:
            How many images will be removed.
        """
        table = self.require_table(allow_empty=True)
        self.require_updatable()
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        positions = table.live_images[np.isin(table.live_image_ids, ids)]
        self._removing.append(positions)
        return len(positions)

    def commit(self, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Applies the staged additions and removals as the next generation: the table's
        metadata for it is written beside the current one (vectors appended), the
        backend's hooks update its structure and :meth:`save` writes its files. The
        index manifest (``retrieval.index.update``) then switches to it.

        Returns:
            ``(added rows, removed rows)`` of the new table.
        """
        old = self.require_table(allow_empty=True)
        removing = np.unique(np.concatenate([np.zeros(0, np.int64), *self._removing]))
        writer = self._writer or TableWriter(self.folder, self.dim, old, self.generation + 1)
        self._writer, self._removing = None, []
        table = writer.close(removing)
        added = np.arange(old.num_rows, table.num_rows)
        removed = old.rows_of(removing)
        self.table, self.generation = table, self.generation + 1
        if len(removed):
            self.remove_rows(removed)
        if len(added):
            self.add_rows(added, progress)
        self.save()
        return added, removed

    def require_updatable(self) -> None:
        """Raises unless this backend implements the update hooks."""
        cls = type(self)
        if cls.add_rows is Backend.add_rows or cls.remove_rows is Backend.remove_rows:
            raise IndexFileError(
                f"index backend {self.name or cls.__name__!r} cannot add or remove images in "
                f"place (it implements no add_rows/remove_rows): rebuild the index with "
                f"`retrieval index build RUN_DIR --backend {self.name or 'NAME'} "
                f"--out {self.folder}`"
            )

    def add_rows(self, rows: np.ndarray, progress: bool) -> None:
        """Hook: index the new table rows ``rows`` (appended by an update; ascending).
        A backend that can grow implements it (with :meth:`remove_rows`)."""
        self.require_updatable()

    def remove_rows(self, rows: np.ndarray) -> None:
        """Hook: stop returning the table rows ``rows`` (of images an update removed; they
        stay in the table, tombstoned). Implemented with :meth:`add_rows`."""
        self.require_updatable()

    def save(self) -> None:  # noqa: B027 - an optional hook: not every backend has files
        """Writes the backend's files for :attr:`generation` (after build or an update)
        under names no other generation uses, so the previous one stays readable."""

    def finish(self, progress: bool = False) -> None:
        """Seals the table and builds the backend's structure from it."""
        if self.table is not None:
            raise IndexFileError(
                f"index {self.folder} is already finished: apply added or removed images "
                f"with commit()"
            )
        if self._writer is None:
            self._writer = TableWriter(self.folder, self.dim)
        self.table = self._writer.close()
        self._writer = None
        self.build(progress)
        self.save()

    @classmethod
    def open(cls, folder: str | Path, dim: int, device: str = "auto", **options: Any) -> Backend:
        """Opens a finished index (its table and the backend's own files) at generation
        ``options["generation"]`` (0, the build, when not given); ``updating=True`` opens
        it to be updated (a backend may then accept what an unfinished update left)."""
        generation = int(options.pop("generation", 0) or 0)
        updating = bool(options.pop("updating", False))
        backend = cls(folder, dim, device, **options)
        backend.generation, backend.updating = generation, updating
        backend.table = RepTable.open(backend.folder, dim, generation)
        backend.load()
        return backend

    def search(
        self, queries: Tensor | np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[list[Hit]]:
        """Top ``k`` images of each query ``[Q, D]`` (or one ``[D]``), best first; with
        ``allowed`` (image ids), the top ``k`` of those images only (fewer when fewer
        are allowed, none when none is)."""
        q = torch.as_tensor(queries).float()
        q = q.unsqueeze(0) if q.ndim == 1 else q
        self.require_table()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexFileError(
                f"query embedding size {tuple(q.shape)[-1]} does not match this index's "
                f"{self.dim}: queries must come from the retriever that made the index"
            )
        if k < 1:
            raise ConfigError(f"top k must be at least 1, got {k}: ask for --top 1 or more")
        if allowed is None:
            found = self.search_rows(q, k)
        else:
            images = self.positions_of(allowed)
            if not len(images):
                return [[] for _ in range(len(q))]
            found = self.search_rows_in(q, k, images)
        return [self.hits(rows, scores) for rows, scores in found]

    def positions_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Table positions (ascending) of the live images among ``image_ids`` that have
        representatives; ids the index does not hold are skipped."""
        table = self.require_table()
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        keep = np.isin(table.image_ids, ids) & ~table.removed & (np.diff(table.offsets) > 0)
        return np.flatnonzero(keep)

    def search_rows_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """Like :meth:`search_rows`, among the images at table positions ``images``
        (ascending, live, non-empty) only. This default re-scores their rows exactly
        from the fp16 table; backends that can filter natively override it."""
        return exact_search(self.require_table(), queries, k, self.device, images=images)

    def require_table(self, allow_empty: bool = False) -> RepTable:
        if self.table is None:
            raise IndexFileError(f"index {self.folder} is not finished: call finish() first")
        if not allow_empty and self.table.num_live_rows == 0:
            raise IndexFileError(
                f"index {self.folder} is empty (no image has a valid representative): "
                f"nothing to search; build it from a run that holds embeddings"
            )
        return self.table

    def hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        table = self.require_table()
        out: list[Hit] = []
        for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
            box: tuple[float, float, float, float] | None = None
            if table.boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in table.boxes[row])  # xyxy
                box = (x0, y0, x1, y1)
            out.append(
                Hit(
                    int(table.image_ids[table.owner[row]]), float(score), int(table.slots[row]), box
                )
            )
        return out

    def state(self) -> dict[str, Any]:
        """Options to store in the index manifest so :meth:`open` rebuilds this backend."""
        return dict(self.options)

    def tune(  # noqa: B027 - an optional hook: exact backends have nothing to tune
        self, queries: Tensor, truth: list[np.ndarray], k: int, target: float
    ) -> None:
        """Chooses settings that reach ``target`` recall@k against exact image lists
        ``truth`` (table image positions); exact backends need none. Approximate ones
        say what to try and how to measure it to :func:`~retrieval.index.tuning.tune_settings`."""

    def files(self) -> list[Path]:
        """Files this index consists of (the table's and the backend's own)."""
        return self.require_table().files() + self.own_files()

    def own_files(self) -> list[Path]:
        return []

    def disk_bytes(self) -> int:
        """Bytes this index takes on disk."""
        return sum(p.stat().st_size for p in self.files())

    def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold no session
        """Releases what the backend holds open (a client, an embedded server)."""

    def memory_bytes(self) -> int:
        """Bytes resident in memory while searching (memory-mapped vectors not counted)."""
        return self.require_table().meta_bytes()

    @abstractmethod
    def build(self, progress: bool) -> None:
        """Builds (and saves) the backend's structure from :attr:`table`."""

    def load(self) -> None:  # noqa: B027 - an optional hook: not every backend has files
        """Loads the backend's saved structure (after :attr:`table` is set)."""

    @abstractmethod
    def search_rows(self, queries: Tensor, k: int) -> list[RowHits]:
        """Per query, the best row of each of the top ``k`` images, best first."""


def register_backend(name: str, **defaults: Any) -> Callable[[B], B]:
    """Class decorator: makes a backend available as ``--backend name``; ``defaults``
    are options it gets unless given (one class can serve several names)."""
    return INDEX_BACKENDS.register(name, **defaults)


def list_backends() -> list[str]:
    """Names accepted by ``--backend``."""
    return INDEX_BACKENDS.names()


def create_backend(
    name: str, folder: str | Path, dim: int, device: str = "auto", **options: Any
) -> Backend:
    """A new, empty backend ``name`` writing into ``folder``."""
    backend = INDEX_BACKENDS.create(name, folder, dim, device, **options)
    backend.name = name
    return backend


def open_backend(
    name: str, folder: str | Path, dim: int, device: str = "auto", **state: Any
) -> Backend:
    """A finished backend ``name`` read back from ``folder`` with its stored ``state``.

    Raises:
        TypeError: ``name`` is registered as something other than a :class:`Backend`
            subclass (a plugin's bug: only a class can read its files back).
    """
    cls = INDEX_BACKENDS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"index backend {name!r} is registered as {cls!r}, not a Backend class")
    backend = cls.open(folder, dim, device, **{**INDEX_BACKENDS.defaults[name], **state})
    backend.name = name
    return backend
