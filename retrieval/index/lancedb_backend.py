"""``lancedb``: embedded and persistent; one row per image with a multivector column.

LanceDB scores a row of several vectors against one query vector by MaxSim, which for a
single query vector is the max cosine over the row's vectors: the engine itself ranks
images as the paper does, with no over-fetch. Vectors are stored in fp16; the index is
IVF_FLAT up to ``HNSW_MIN_ROWS`` representatives and IVF_HNSW_SQ above (chosen by size,
``index_type`` overrides). Hits are re-scored from the fp16 table, which also names the
matched representative (LanceDB returns only the row's distance).

An update adds the new images' rows (``add``) and deletes removed images by table
position (``delete("pos IN (...)")``); each is a new LanceDB version, and the version a
generation reads is recorded in its settings (``version``) and checked out at open, so
the versions an unfinished update wrote are never read (the next update restores the
recorded one before writing). New rows are not put in the IVF index (LanceDB can only do
that by compacting and re-indexing the whole table, as long as a rebuild): they are
searched by LanceDB's flat scan of unindexed rows, exactly, beside the indexed ones.

A filtered search is LanceDB's own prefilter on the image position column,
``where("pos IN (...)", prefilter=True)``, so only allowed images are ranked (probing
more partitions while fewer than ``k`` of them come back); an allow-list of more than
``WHERE_MAX`` images (a filter string that long costs more to parse than it saves), or
a query still short of ``k`` allowed images after every partition, is re-scored exactly
from the fp16 table instead (the engine protocol's fallback, :meth:`Engine.search_in`).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from retrieval.errors import IndexFileError
from retrieval.index.base import Backend, register_backend
from retrieval.index.engine import Engine, EngineOptions, chosen, state_field
from retrieval.index.grouping import check_choice
from retrieval.index.kernels import RowHits, rerank
from retrieval.index.table import corrupt
from retrieval.index.tuning import query_recalls, tune_settings

LANCE_DIR = "lance"
TABLE = "images"
WRITE_IMAGES = 50_000
HNSW_MIN_ROWS = 1_000_000
INDEX_TYPES = ("auto", "none", "IVF_FLAT", "IVF_HNSW_SQ")
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# HNSW candidates per fetched row: lancedb's default (1.5 x limit) fails on multivector
# rows (it asks ef >= ~8 x limit) and 1,000 were needed for a limit of 50 at 2M vectors
EF_FACTORS = (5, 10, 20)
WHERE_MAX = 100_000  # allowed images pushed into a LanceDB prefilter; past it, exact


def _import_lancedb() -> Any:
    try:
        import lancedb
    except ImportError:
        raise IndexFileError(
            "the lancedb backend needs the lancedb package: pip install lancedb==0.40.0"
        ) from None
    return lancedb


@dataclass
class LanceOptions(EngineOptions):
    """``index_type`` (one of ``INDEX_TYPES``; ``auto`` is resolved at build),
    ``num_partitions``, ``nprobes``, ``refine_factor``, ``ef_factor`` (HNSW candidates
    per fetched row), and ``version`` (state: the LanceDB version this generation reads)."""

    index_type: str = "auto"
    nprobes: int = 20
    num_partitions: int | None = chosen("~sqrt(rows)")
    refine_factor: int | None = chosen("tuned")
    ef_factor: int | None = chosen("tuned")
    version: int | None = state_field()

    def __post_init__(self) -> None:
        fix = "pass e.g. --option index_type=IVF_FLAT"
        check_choice("lancedb", "index_type", self.index_type, INDEX_TYPES, fix)


@register_backend("lancedb", index_type="auto")
class LanceBackend(Engine):
    """LanceDB as an index engine (options: :class:`LanceOptions`)."""

    Options = LanceOptions
    options: LanceOptions
    updatable = True
    native_filter = True

    def __init__(self, backend: Backend, options: EngineOptions) -> None:
        super().__init__(backend, options)
        self.lance_table: Any = None  # a lancedb Table once built or loaded
        self._writing: Any = None  # the table opened for an update's writes

    @property
    def approximate(self) -> bool:
        return self.options.index_type != "none"

    def _batches(self, images: np.ndarray | None = None) -> list[Any]:
        """Arrow tables of the live images (of ``images``, table positions, when given)
        that have representatives: ``pos`` (the image's table position) and ``vector``
        (its fp16 vectors), ``WRITE_IMAGES`` at a time."""
        import pyarrow as pa

        table = self.require_table()
        offsets = table.offsets
        if images is None:
            images = table.live_images
        images = images[(np.diff(offsets)[images] > 0) & ~table.removed[images]]
        out = []
        for start in range(0, len(images), WRITE_IMAGES):
            part = images[start : start + WRITE_IMAGES]
            rows = table.rows_of(part)
            values = pa.array(np.asarray(table.vectors[rows], dtype=np.float16).reshape(-1))
            vectors = pa.FixedSizeListArray.from_arrays(values, self.dim)
            counts = np.diff(offsets)[part]
            local = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            out.append(
                pa.table(
                    {
                        "pos": pa.array(part.astype(np.int64)),
                        "vector": pa.ListArray.from_arrays(pa.array(local), vectors),
                    }
                )
            )
        return out

    def build(self, progress: bool) -> None:
        lancedb = _import_lancedb()
        from lancedb.index import IvfFlat, IvfHnswSq

        shutil.rmtree(self.folder / LANCE_DIR, ignore_errors=True)
        db = lancedb.connect(str(self.folder / LANCE_DIR))
        batches = self._batches()
        table = db.create_table(TABLE, batches[0])
        for batch in batches[1:]:
            table.add(batch)
        rows = self.require_table().num_rows
        kind = self.options.index_type
        if kind == "auto":
            kind = "IVF_HNSW_SQ" if rows >= HNSW_MIN_ROWS else "IVF_FLAT"
            self.options.index_type = kind
        if kind != "none":
            images = table.count_rows()
            if self.options.num_partitions is None:
                self.options.num_partitions = max(1, min(int(math.sqrt(rows)), images // 16))
            partitions = self.options.num_partitions
            config = (IvfFlat if kind == "IVF_FLAT" else IvfHnswSq)(
                distance_type="cosine", num_partitions=partitions
            )
            table.create_index("vector", config=config)
        self.lance_table = table

    def save(self) -> None:
        """Records the LanceDB version this generation reads (its files are LanceDB's)."""
        self.options.version = int(self.lance_table.version)

    def _writable(self) -> Any:
        """The table at this index's recorded version, open for writing: a later version
        (an update that did not finish) is rolled back by restoring the recorded one."""
        if self._writing is None:
            table = _import_lancedb().connect(str(self.folder / LANCE_DIR)).open_table(TABLE)
            version = self.options.version
            if version is not None and table.version != version:
                table.restore(version)
            self._writing = self.lance_table = table
        return self._writing

    def add(self, rows: np.ndarray, progress: bool) -> None:
        """Appends the new images (one row each, their vectors as a multivector)."""
        table = self._writable()
        for batch in self._batches(np.unique(self.require_table().owner[rows])):
            table.add(batch)

    def remove(self, rows: np.ndarray) -> None:
        """Deletes the removed images' rows by table position."""
        images = np.unique(self.require_table(allow_empty=True).owner[rows])
        table = self._writable()
        for start in range(0, len(images), WRITE_IMAGES):
            part = ",".join(str(int(p)) for p in images[start : start + WRITE_IMAGES])
            table.delete(f"pos IN ({part})")

    def load(self) -> None:
        """Opens the table and answers one probe query, so a damaged data or index file is
        reported here, naming the folder, rather than at the first search."""
        lancedb = _import_lancedb()
        path = self.folder / LANCE_DIR
        if not path.is_dir():
            raise corrupt(path, "folder missing")
        try:
            self.lance_table = lancedb.connect(str(path)).open_table(TABLE)
            version = self.options.version  # None only while the build writes it
            if version is not None and self.lance_table.version != version:
                self.lance_table.checkout(version)  # a later one is an unfinished update
        except (OSError, ValueError, RuntimeError) as err:
            raise corrupt(path, f"lancedb cannot open it: {str(err).splitlines()[0]}") from None
        probe = np.zeros(self.dim, np.float32)
        probe[0] = 1.0
        try:
            self._query(probe, 1)
        except (OSError, ValueError, RuntimeError) as err:
            reason = f"lancedb cannot read it: {str(err).splitlines()[0]}"
            raise corrupt(path, reason) from None

    def own_files(self) -> list[Path]:
        """LanceDB's files (written once each; its latest-version hint is rewritten in
        place by every version, so it is left out)."""
        files = (self.folder / LANCE_DIR).rglob("*")
        return sorted(p for p in files if p.is_file() and p.name != "latest_version_hint.json")

    def memory_bytes(self) -> int:
        """The index files (LanceDB caches them) plus the table's metadata."""
        indices = [p for p in self.own_files() if "_indices" in p.parts]
        return sum(p.stat().st_size for p in indices)

    def _query(
        self, q: np.ndarray, k: int, nprobes: int = 1, where: str | None = None
    ) -> np.ndarray:
        search = self.lance_table.search(q).distance_type("cosine").limit(k)
        search = search.select(["pos", "_distance"])
        if where is not None:
            search = search.where(where, prefilter=True)
        o = self.options
        if o.index_type != "none":
            search = search.nprobes(nprobes)
            if o.refine_factor:
                search = search.refine_factor(o.refine_factor)
            if o.index_type == "IVF_HNSW_SQ":
                # lance asks ef >= the rows it fetches (refine_factor x k)
                fetched = k * (1 if o.refine_factor is None else o.refine_factor)
                search = search.ef((o.ef_factor or EF_FACTORS[0]) * fetched)
        return search.to_arrow()["pos"].to_numpy()

    def search(self, queries: Tensor, k: int) -> list[RowHits]:
        if self.lance_table is None:
            raise IndexFileError(f"index {self.folder}: the lancedb table is not built")
        table = self.require_table()
        q = queries.float().cpu()
        return [rerank(table, v, self._images(v.numpy(), k), k) for v in q]

    def search_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """LanceDB's prefilter on ``pos`` (the image position); exact past ``WHERE_MAX``."""
        if len(images) > WHERE_MAX:
            return super().search_in(queries, k, images)
        if self.lance_table is None:
            raise IndexFileError(f"index {self.folder}: the lancedb table is not built")
        table = self.require_table()
        where = f"pos IN ({','.join(str(int(p)) for p in images)})"
        q = queries.float().cpu()
        found = [self._images(v.numpy(), k, where, len(images)) for v in q]
        out = [rerank(table, v, f, k) for v, f in zip(q, found, strict=True)]
        # still short of the allowed images after probing every partition (an HNSW graph
        # under a narrow filter can be): such a query is answered exactly instead
        short = [i for i, f in enumerate(found) if len(f) < min(k, len(images))]
        if short:
            exact = super().search_in(queries[short], k, images)
            for i, hits in zip(short, exact, strict=True):
                out[i] = hits
        return out

    def _images(
        self, q: np.ndarray, k: int, where: str | None = None, allowed: int | None = None
    ) -> np.ndarray:
        """Top ``k`` images of one query (among ``allowed`` ones matching ``where``);
        probes more partitions while fewer come back (a partition of a small table can
        hold fewer than ``k`` images)."""
        wanted = min(k, self.require_table().searchable_images if allowed is None else allowed)
        nprobes = self.options.nprobes
        found = self._query(q, k, nprobes, where)
        while len(found) < wanted and nprobes < (self.options.num_partitions or 0):
            nprobes *= 2
            found = self._query(q, k, nprobes, where)
        return found

    def tune(self, queries: Tensor, truth: list[np.ndarray], k: int, target: float) -> None:
        """The fewest ``nprobes`` reaching ``target`` recall (cost grows with probes), and
        for HNSW_SQ the least ``ef_factor`` with it (it also re-ranks ``refine_factor x
        k`` rows exactly); else the most tried."""
        if self.options.index_type == "none":
            return
        owner = self.require_table().owner
        hnsw = self.options.index_type == "IVF_HNSW_SQ"
        if hnsw and self.options.refine_factor is None:
            self.options.refine_factor = 4
        partitions = self.options.num_partitions or 1
        candidates = (
            {"nprobes": min(nprobes, partitions)} | ({"ef_factor": ef} if ef else {})
            for nprobes in NPROBES
            if nprobes < partitions * 2
            for ef in (EF_FACTORS if hnsw else (None,))
        )
        tune_settings(
            self.options,
            candidates,
            lambda: query_recalls(self.search(queries, k), truth, owner),
            target,
            fallback="last",
        )
