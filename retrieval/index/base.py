"""The shared front end of every index: ``add(image_ids, reps)``, ``finish()``, ``search(q, k)``.

An image's score is the max cosine over its representatives, so an engine either groups
natively or fetches the top representatives and groups them by image (over-fetch,
:mod:`retrieval.index.grouping`). Every engine answers a query with table rows, the
best-matching representative of each top image; the front end (:class:`Backend`) turns
rows into :class:`Hit` (image id, score, representative index, box). It owns what every
backend shares (the table, staged updates, the commit, image positions, hits, sizes) and
holds one :class:`~retrieval.index.engine.Engine`, the small interface a backend
implements; engines register under a name with :func:`register_backend`.

A finished index grows and shrinks by generations: ``add(image_ids, reps)`` and
``remove(image_ids)`` on it stage a change, ``commit()`` writes the next generation of
the table (new rows appended, removed images tombstoned) and hands the engine the rows
that came and went (:meth:`Engine.add` / :meth:`Engine.remove`), then
:meth:`Engine.save` writes its files for the new generation under new names. An engine
that does not declare itself ``updatable`` is refused with a message saying to rebuild.

Filtered search (``search(queries, k, allowed=ids)``, the allow-list a ``--where``
expression gave, see :mod:`retrieval.index.filters`) answers the top ``k`` among the
allowed images only; removed images are never among them. The front end turns the ids
into table positions and calls :meth:`Engine.search_in`, which each engine pushes down
as far as it allows:

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
  :meth:`Engine.search_in`, exact re-scoring of the allowed images' rows from the fp16
  table: always correct, and cheap when few images are allowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from retrieval.errors import ConfigError, IndexFileError
from retrieval.index.engine import Engine
from retrieval.index.hits import Hit
from retrieval.index.kernels import RowHits, exact_search
from retrieval.index.table import RepTable, TableWriter
from retrieval.registry import INDEX_BACKENDS
from retrieval.representatives import Representatives

E = TypeVar("E", bound="type[Engine]")


class Backend:
    """An index: the representative table and one engine over it, answering top images
    by max cosine. Build, update and search use this front end alone.

    Args:
        name: the registered backend name (for messages and the manifest).
        engine: the engine's class; it is made here with ``options``.
        folder: where the table and the engine's files live.
        dim: embedding size ``D``.
        device: ``auto``, ``cpu`` or ``cuda[:i]`` where an engine computes on torch.
        options: the engine's options (``--option``, registered defaults, or the state
            the manifest stored); an unknown one is refused naming it.
    """

    def __init__(
        self,
        name: str,
        engine: type[Engine],
        folder: str | Path,
        dim: int,
        device: str,
        options: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.folder = Path(folder)
        self.dim = dim
        self.device = device
        self.table: RepTable | None = None
        self.generation = 0
        self.updating = False  # opened by an update (see open_backend)
        self._writer: TableWriter | None = None
        self._removing: list[np.ndarray] = []  # image positions staged for removal
        self.engine = engine(self, engine.Options.parse(name, options))

    @property
    def approximate(self) -> bool:
        """The engine's declared capability: its answers may miss top images."""
        return self.engine.approximate

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
        engine follows (:meth:`Engine.add`, :meth:`Engine.remove`) and saves its files.
        The index manifest (``retrieval.index.update``) then switches to it.

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
        self._advise(table)
        if len(removed):
            self.engine.remove(removed)
        if len(added):
            self.engine.add(added, progress)
        self.engine.save()
        return added, removed

    def require_updatable(self) -> None:
        """Raises unless the engine declares itself ``updatable``."""
        if not self.engine.updatable:
            raise IndexFileError(
                f"index backend {self.name!r} cannot add or remove images in place (its "
                f"engine is not updatable): rebuild the index with `retrieval index build "
                f"RUN_DIR --backend {self.name} --out {self.folder}`"
            )

    def finish(self, progress: bool = False) -> None:
        """Seals the table and builds the engine's structure from it."""
        if self.table is not None:
            raise IndexFileError(
                f"index {self.folder} is already finished: apply added or removed images "
                f"with commit()"
            )
        if self._writer is None:
            self._writer = TableWriter(self.folder, self.dim)
        self.table = self._writer.close()
        self._writer = None
        self.engine.build(progress)
        self.engine.save()
        self._advise(self.table)

    def open(self, generation: int = 0, updating: bool = False) -> None:
        """Reads a finished index back: its table at ``generation`` (0, the build) and
        the engine's files; ``updating=True`` opens it to be updated."""
        self.generation, self.updating = generation, updating
        self.table = RepTable.open(self.folder, self.dim, generation)
        self.engine.load()
        self._advise(self.table)

    def _advise(self, table: RepTable) -> None:
        """An approximate engine re-ranks scattered rows of the memory-mapped vectors: of a
        table larger than half the machine's memory (one the page cache cannot keep),
        each query's rows are read alone rather than with the kernel's readahead, which
        reads ~10x more (bench/bench_rerank_reads.py; below that size readahead warms the
        cache sooner)."""
        if self.engine.approximate and table.vectors.nbytes > physical_memory() // 2:
            table.advise_random()

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

    def search_rows(self, queries: Tensor, k: int) -> list[RowHits]:
        """The engine's answer: per query, the best row of each of the top ``k`` images."""
        return self.engine.search(queries, k)

    def search_rows_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """:meth:`search_rows` among the images at table positions ``images`` only: the
        engine's own filtered search where it declares one (``native_filter``), else
        exact re-scoring of those images' rows from the fp16 table."""
        if self.engine.native_filter:
            return self.engine.search_in(queries, k, images)
        return exact_search(self.require_table(), queries, k, self.device, images=images)

    def positions_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Table positions (ascending) of the live images among ``image_ids`` that have
        representatives; ids the index does not hold are skipped."""
        table = self.require_table()
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        keep = np.isin(table.image_ids, ids) & ~table.removed & (np.diff(table.offsets) > 0)
        return np.flatnonzero(keep)

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
        """The engine's options to store in the index manifest so :func:`open_backend`
        rebuilds this backend (:meth:`EngineOptions.state`)."""
        return self.engine.options.state()

    def tune(self, queries: Tensor, truth: list[np.ndarray], k: int, target: float) -> None:
        """Lets the engine choose settings reaching ``target`` recall@k (:meth:`Engine.tune`)."""
        self.engine.tune(queries, truth, k, target)

    def files(self) -> list[Path]:
        """Files this index consists of (the table's and the engine's own)."""
        return self.require_table().files() + self.engine.own_files()

    def disk_bytes(self) -> int:
        """Bytes this index takes on disk."""
        return sum(p.stat().st_size for p in self.files()) + self.engine.disk_bytes()

    def memory_bytes(self) -> int:
        """Bytes resident in memory while searching (memory-mapped vectors not counted)."""
        return self.require_table().meta_bytes() + self.engine.memory_bytes()

    def close(self) -> None:
        """Releases what the engine holds open (a client, an embedded server)."""
        self.engine.close()


def register_backend(name: str, **defaults: Any) -> Callable[[E], E]:
    """Class decorator: makes an :class:`Engine` available as ``--backend name``;
    ``defaults`` are options it gets unless given (one class can serve several names)."""
    return INDEX_BACKENDS.register(name, **defaults)


def list_backends() -> list[str]:
    """Names accepted by ``--backend``."""
    return INDEX_BACKENDS.names()


def engine_class(name: str) -> type[Engine]:
    """The engine registered as ``name``.

    Raises:
        TypeError: ``name`` is registered as something other than an :class:`Engine`
            subclass (a plugin's bug, named here rather than deep inside).
    """
    cls = INDEX_BACKENDS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"index backend {name!r} is registered as {cls!r}, not an Engine class")
    return cls


def physical_memory() -> int:
    """Bytes of memory this machine has (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def create_backend(
    name: str, folder: str | Path, dim: int, device: str = "auto", **options: Any
) -> Backend:
    """A new, empty backend ``name`` writing into ``folder``."""
    cls = engine_class(name)
    return Backend(name, cls, folder, dim, device, {**INDEX_BACKENDS.defaults[name], **options})


def open_backend(
    name: str, folder: str | Path, dim: int, device: str = "auto", **state: Any
) -> Backend:
    """A finished backend ``name`` read back from ``folder`` with its stored ``state``
    (``generation``: the generation to read, 0 when not given; ``updating``: opened by
    an update)."""
    generation = int(state.pop("generation", 0) or 0)
    updating = bool(state.pop("updating", False))
    cls = engine_class(name)
    backend = Backend(name, cls, folder, dim, device, {**INDEX_BACKENDS.defaults[name], **state})
    backend.open(generation, updating)
    return backend
