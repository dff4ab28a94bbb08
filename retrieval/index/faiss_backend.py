"""``faiss``: an embedded, in-memory index over the representatives, grouped by image.

Two kinds (``kind``): ``flat`` (exact scores: fp16 codes of the fp16 table) fetches
``overfetch x k`` representatives and groups them by image, fetching more for any query
that found fewer than ``k`` distinct images, so its answer is exact; ``ivfpq``
(``IndexIVFPQ``) fetches ``overfetch x k`` candidate representatives by their compressed
codes, scores those rows exactly from the fp16 table, and re-ranks the ``RERANK_IMAGES
x k`` best images over all their representatives (re-ranking fewer leaves PQ recall
low; re-ranking every candidate's image caps the affordable over-fetch: the
measurements are in results/bench/search_cpu.md). ``auto`` picks
flat up to ``FLAT_MAX_ROWS`` representatives and ``ivfpqfs`` above (of the compressed
kinds, the one that reached recall 0.99 there). :meth:`FaissBackend.tune` sets
``overfetch`` (and ``nprobe``) from queries with known exact answers. Two more compressed
kinds share ivfpq's path (candidates by codes, exact re-rank from the fp16 table):
``ivfpqfs`` (``faiss-ivfpqfs``, 4-bit fast-scan PQ, ``IVF...,PQ{D/2}x4fs``) and
``ivfrabitq`` (``faiss-rabitq``, IVF-RaBitQ); results/bench/search_cpu.md compares them.

faiss ids are table rows (``add_with_ids``): ``flat`` wraps its codes in an
``IndexIDMap`` (a flat index renumbers its rows on removal), ``ivfpq`` keeps ids in its
inverted lists. The index is stored as segments: the build's ``faiss.index`` and, for
each update that added images, ``faiss.G.index`` holding only the new rows (encoded with
the build's training: ivfpq is not retrained; its recall is measured again, and a
rebuild retrains). Removed images' rows are dropped with ``remove_ids`` when the
segments are loaded and merged (the table's tombstones say which). So an update writes
only what it adds, never rewrites a file an earlier generation reads, and does not even
load the index to add a segment.

The IVF kinds scan a query's probed lists in parts side by side, one per OpenMP thread
(:func:`search_ivf`): faiss scans one query on one thread. The exact re-rank after it
runs on one thread: its products are small, and OpenMP's threads spin after each one
on the cores the next scan wants.

A filtered search hands faiss the allowed images' rows (= ids) as an
``IDSelectorBatch`` in ``SearchParameters`` (``SearchParametersIVF`` with the tuned
``nprobe`` for ivfpq), so faiss never returns another row and the same over-fetch loop
finds ``k`` allowed images whenever there are ``k`` (fetching at most every allowed row).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import faiss
import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from retrieval.errors import IndexFileError
from retrieval.index.base import Backend, register_backend
from retrieval.index.engine import Engine, EngineOptions, chosen, state_field
from retrieval.index.grouping import check_choice, doubled, fetch_until_k_images, needed_overfetch
from retrieval.index.kernels import RowHits, first_per_image, rerank
from retrieval.index.table import corrupt, generation_name, replace_atomically
from retrieval.index.tuning import query_recalls, tune_settings

FAISS_FILE = "faiss.index"
FLAT_MAX_ROWS = 2_000_000
ADD_ROWS = 65_536
SMALL_TRAIN = 20_000
TRAIN_PER_LIST = 64  # training vectors per inverted list (faiss wants >= 39)
MIN_TRAIN = 20_000  # enough for 8-bit PQ codebooks (256 centroids x 39 points, doubled)
KINDS = ("auto", "flat", "ivfpq", "ivfpqfs", "ivfrabitq")
# the compressed kinds beside ivfpq, as faiss factory strings: 4-bit fast-scan PQ with a
# sub-quantiser per 2 dimensions (2 bits per dimension, scanned in SIMD registers; one
# per 4 dimensions needed far more re-ranked rows: results/bench/search_cpu.md), and IVF-RaBitQ
# (1 bit per dimension plus two floats, trained by the IVF k-means alone)
FACTORY = {"ivfpqfs": "IVF{nlist},PQ{m}x4fs", "ivfrabitq": "IVF{nlist},RaBitQ"}
DIMS_PER_CODE = {"ivfpqfs": 2, "ivfrabitq": 8}  # dimensions per sub-quantiser / byte
# what scanning one code costs in _cost's units (a re-ranked row costs D): 8-bit PQ and
# RaBitQ read their codes one by one (m table look-ups, D/8 bytes); fast-scan PQ scores
# 32 codes per SIMD pass, so a code costs a tiny share of a re-ranked row (measured in
# results/bench/search_cpu.md): 1 unit, rounded up
SCAN_UNITS = {"ivfpqfs": 1}
OVERFETCH = (2, 4, 10, 20, 50, 100, 200, 400)
RERANK_IMAGES = 2  # images re-ranked in full per result, best by their fetched rows
NPROBE = tuple(2**i for i in range(16))  # those under nlist, then every list


@contextmanager
def omp_threads(threads: int | None) -> Iterator[None]:
    """Runs faiss (and torch: one OpenMP runtime) with ``threads`` OpenMP threads on the
    calling thread (None: unchanged). Small trainings run on one: on a busy machine
    OpenMP's waiting makes a small IVF-PQ train far slower on several threads than on
    one (results/bench/search_cpu.md)."""
    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@cache
def scan_pool(workers: int) -> ThreadPoolExecutor:
    """Threads that scan parts of a query's inverted lists (faiss releases the GIL)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="faiss-scan")


def ivf_params(nprobe: int, selector: faiss.IDSelector | None) -> faiss.SearchParametersIVF:
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    if selector is not None:
        params.sel = selector
    return params


def search_ivf(
    index: faiss.IndexIVF,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with each query's probes split into parts (faiss's thread count)
    scanned side by side, each part's best ``k`` merged by score.

    faiss scans one query on one thread (its threads split the queries), so a single
    query used one core; the fast-scan kinds' own list-parallel modes (``implem``
    14/15) merge in thread timing order, which changed the candidates from one run to
    the next. Here a query's probed lists (best first) are dealt to the parts in turn
    and the merge keeps part order for equal scores: a rerun is identical, a query's
    answer does not depend on the batch it came in, and the merged best ``k`` are the
    unsplit ones but for ties at the k-th score."""
    parts = max(1, min(faiss.omp_get_max_threads(), nprobe))
    if parts == 1:
        return index.search(queries, k, params=ivf_params(nprobe, selector))
    coarse_scores, lists = index.quantizer.search(queries, nprobe)

    def scan(part: int) -> tuple[np.ndarray, np.ndarray]:
        faiss.omp_set_num_threads(1)  # this thread's own setting: no nested teams
        assign = np.ascontiguousarray(lists[:, part::parts])
        centroid_scores = np.ascontiguousarray(coarse_scores[:, part::parts])
        scores = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        ptr = faiss.swig_ptr  # the Python wrapper of search_preassigned refuses params
        index.search_preassigned_c(  # type: ignore[attr-defined] # not in faiss stubs
            len(queries),
            ptr(queries),
            k,
            ptr(assign),
            ptr(centroid_scores),
            ptr(scores),
            ptr(rows),
            False,
            ivf_params(assign.shape[1], selector),
        )
        return scores, rows

    found = list(scan_pool(parts).map(scan, range(parts)))
    scores = np.concatenate([s for s, _ in found], axis=1)
    rows = np.concatenate([r for _, r in found], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def quiet_small_training(index: faiss.Index) -> None:
    """Small tables train the lists and PQ codebooks on few points per centroid; the
    recorded recall says what that cost, so faiss's warning about it is only noise."""
    faiss.extract_index_ivf(index).cp.min_points_per_centroid = 1
    pq = getattr(index, "pq", None)  # the PQ kinds' codebooks (not RaBitQ)
    if pq is not None:
        pq.cp.min_points_per_centroid = 1


class Allowed:
    """A filter's allow-list as faiss takes it: the allowed images' table rows (= faiss
    ids) in an ``IDSelectorBatch``, and how many rows and images it allows."""

    def __init__(self, rows: np.ndarray, images: int) -> None:
        self.ids = np.ascontiguousarray(rows, dtype=np.int64)  # kept alive for faiss
        self.rows, self.images = len(rows), images
        self.selector = faiss.IDSelectorBatch(self.ids)


def pq_layout(rows: int, dim: int) -> tuple[int, int, int]:
    """``(nlist, m, nbits)`` for ``rows`` vectors: ~sqrt(rows) lists (>= 39 training
    points each; more lists train slower than re-ranking costs at these sizes),
    sub-quantisers of >= 16 dimensions (8-bit codes, fewer bits on tiny tables):
    8-dimensional ones train much slower (results/bench/search_cpu.md)."""
    nlist = max(1, min(int(math.sqrt(rows)), rows // 39, 65_536))
    m = max(d for d in range(1, max(dim // 16, 1) + 1) if dim % d == 0)
    nbits = 8 if rows >= 256 * 39 else max(4, min(8, int(math.log2(max(rows // 39, 16)))))
    return nlist, m, nbits


@dataclass
class FaissOptions(EngineOptions):
    """``kind`` (one of ``KINDS``; ``auto`` is resolved at build), ``overfetch``
    (representatives fetched per image wanted), ``nprobe``, ``nlist``, ``m``, ``nbits``
    and ``train_size`` (the IVF kinds: chosen at build unless given), ``segments``
    (state: the generations that wrote a faiss file)."""

    kind: str = "auto"
    overfetch: float = 4
    nprobe: int | None = chosen("tuned")
    nlist: int | None = chosen("~sqrt(rows)")
    m: int | None = chosen("by kind and D")
    nbits: int | None = chosen("8, fewer on tiny tables")
    train_size: int | None = chosen("64 per list, >= 20000")
    segments: list[int] | None = state_field()

    def __post_init__(self) -> None:
        fix = (
            "pass --option kind=auto|flat|ivfpq|ivfpqfs|ivfrabitq or use backend faiss-flat "
            "/ faiss-ivfpq / faiss-ivfpqfs / faiss-rabitq"
        )
        check_choice("faiss", "kind", self.kind, KINDS, fix)


@register_backend("faiss", kind="auto")
@register_backend("faiss-flat", kind="flat")
@register_backend("faiss-ivfpq", kind="ivfpq")
@register_backend("faiss-ivfpqfs", kind="ivfpqfs")
@register_backend("faiss-rabitq", kind="ivfrabitq")
class FaissBackend(Engine):
    """faiss as an index engine (options: :class:`FaissOptions`)."""

    Options = FaissOptions
    options: FaissOptions
    updatable = True
    native_filter = True

    def __init__(self, backend: Backend, options: EngineOptions) -> None:
        super().__init__(backend, options)
        self.index: faiss.Index | None = None
        self._segment: faiss.Index | None = None  # rows an update adds, until saved

    @property
    def approximate(self) -> bool:
        return self.options.kind != "flat"

    def _make_index(self, rows: int) -> faiss.Index:
        o = self.options
        if o.kind == "auto":
            o.kind = "flat" if rows <= FLAT_MAX_ROWS else "ivfpqfs"
        if o.kind == "flat":  # fp16 codes: lossless for the fp16 table, and
            # half the memory of IndexFlatIP's fp32, and faster; ids = table rows
            return faiss.IndexIDMap(self._flat_codes())
        chosen_m = o.m  # fast-scan: sub-quantisers, when given
        nlist, m, nbits = pq_layout(rows, self.dim)
        # what the user did not set: the layout's, 16 probes, enough training vectors
        o.nlist = nlist if o.nlist is None else o.nlist
        o.m = m if o.m is None else o.m
        o.nbits = nbits if o.nbits is None else o.nbits
        o.nprobe = 16 if o.nprobe is None else o.nprobe
        if o.train_size is None:
            o.train_size = min(rows, max(TRAIN_PER_LIST * nlist, MIN_TRAIN))
        if o.kind in FACTORY:  # m: D/2 sub-quantisers (fast-scan), D/8 bytes (RaBitQ)
            o.m = chosen_m or self.dim // DIMS_PER_CODE[o.kind]
            spec = FACTORY[o.kind].format(nlist=o.nlist, m=o.m)
            index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
            quiet_small_training(index)
            o.nbits = None
            return index
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(
            quantizer, self.dim, o.nlist, o.m, o.nbits, faiss.METRIC_INNER_PRODUCT
        )
        quiet_small_training(index)
        return index

    def _flat_codes(self) -> faiss.Index:
        return faiss.IndexScalarQuantizer(
            self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )

    def build(self, progress: bool) -> None:
        table = self.require_table()
        rows = table.live_rows
        index = self._make_index(len(rows))
        if not index.is_trained:
            rng = np.random.default_rng(0)
            size = min(self.options.train_size or len(rows), len(rows))
            sample = rows[np.sort(rng.choice(len(rows), size, replace=False))]
            with omp_threads(1 if size < SMALL_TRAIN else None):
                index.train(table.float_rows(sample).numpy())
        self.index = index
        self._add(rows, progress)

    def _add(self, rows: np.ndarray, progress: bool, index: faiss.Index | None = None) -> None:
        """Adds table ``rows`` (ascending) to ``index`` (the built one when None), ids =
        rows, by chunk."""
        table, index = self.require_table(), index or self._built()
        starts = range(0, len(rows), ADD_ROWS)
        for start in tqdm(
            starts, desc=f"faiss {self.options.kind}", unit="chunk", disable=not progress
        ):
            part = rows[start : start + ADD_ROWS]
            contiguous = part[-1] - part[0] == len(part) - 1  # one slice read, no gather
            chunk = table.float_rows(slice(part[0], part[-1] + 1) if contiguous else part)
            index.add_with_ids(chunk.numpy(), part.astype(np.int64))

    @property
    def segments(self) -> list[int]:
        """Generations that wrote a faiss file: the build's, then each update's additions."""
        return list(self.options.segments or [0])

    def _write(self, index: faiss.Index, generation: int) -> None:
        path = self.folder / generation_name(FAISS_FILE, generation)
        writer = faiss.PyCallbackIOWriter  # type: ignore[attr-defined] # not in faiss's stubs
        replace_atomically(path, lambda f: faiss.write_index(index, writer(f.write)))

    def save(self) -> None:
        """The build writes ``faiss.index``; an update that added rows writes them alone
        to ``faiss.G.index`` (a new segment); removals are the table's tombstones, applied
        when the segments are loaded. No earlier file is rewritten."""
        if self.generation == 0:
            self._write(self._built(), 0)
            self.options.segments = [0]
        elif self._segment is not None:
            self._write(self._segment, self.generation)
            self.options.segments = [*self.segments, self.generation]
            self._segment = None

    def add(self, rows: np.ndarray, progress: bool) -> None:
        """The new rows, ids = table rows, go into a new segment (written by :meth:`save`)
        and into the index in memory when it is loaded."""
        self._segment = self._empty()
        self._add(rows, progress, self._segment)
        if self.index is not None:
            self._add(rows, False, self.index)

    def remove(self, rows: np.ndarray) -> None:
        """Nothing to write (the table's tombstones are the record); the index in memory,
        when loaded, drops the rows by ``remove_ids``."""
        if self.index is not None:
            self._remove(self.index, rows)

    def _remove(self, index: faiss.Index, rows: np.ndarray) -> None:
        ids = np.ascontiguousarray(rows, dtype=np.int64)
        gone = index.remove_ids(ids)  # type: ignore[arg-type] # the wrapper takes arrays
        if gone != len(rows):
            raise corrupt(
                self.folder / FAISS_FILE,
                f"{len(rows)} removed rows to drop, the faiss segments held {gone} of them",
            )

    def _empty(self) -> faiss.Index:
        """An empty index of this one's kind and training, to hold a new segment."""
        if self.options.kind == "flat":
            return faiss.IndexIDMap(self._flat_codes())
        index = self._read(0)  # PQ codes: small next to the table
        index.reset()
        return index

    def _read(self, generation: int) -> faiss.Index:
        path = self.folder / generation_name(FAISS_FILE, generation)
        if not path.exists():
            raise corrupt(path, "file missing")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise corrupt(path, f"faiss cannot read it: {str(err).splitlines()[0]}") from None
        if index.d != self.dim:
            raise corrupt(path, f"its vectors have {index.d} dimensions, the table {self.dim}")
        return index

    def load(self) -> None:
        """Reads the segments, merges them and drops removed images' rows. An update
        opens the index lazily: adding a segment does not need the others in memory."""
        if self.updating:
            return
        self._load()

    def _load(self) -> faiss.Index:
        table = self.require_table(allow_empty=True)
        index = self._read(self.segments[0])
        for generation in self.segments[1:]:
            index.merge_from(self._read(generation), 0)
        if table.has_removed:
            self._remove(index, table.rows_of(np.flatnonzero(table.removed)))
        if index.ntotal != table.num_live_rows:
            path = self.folder / generation_name(FAISS_FILE, self.segments[-1])
            raise corrupt(path, "its size does not match the representative table")
        self.index = index
        return index

    def _built(self) -> faiss.Index:
        """The faiss index (after :meth:`build` or :meth:`load`), else a clear error."""
        if self.index is None:
            if self.backend.table is not None and self.updating:  # opened lazily by an update
                return self._load()
            raise IndexFileError(f"index {self.folder}: the faiss index is not built")
        return self.index

    def _ivf(self) -> faiss.IndexIVF:
        """The built index as the inverted-file index that ``ivfpq`` makes."""
        index = self._built()
        if not isinstance(index, faiss.IndexIVF):
            raise IndexFileError(f"index {self.folder}: the faiss index is not an IVF index")
        return index

    def own_files(self) -> list[Path]:
        return [self.folder / generation_name(FAISS_FILE, g) for g in self.segments]

    def memory_bytes(self) -> int:
        """The faiss index lives in memory; ivfpq re-ranking reads few table rows."""
        return sum(p.stat().st_size for p in self.own_files())

    def _fetch(
        self,
        queries: np.ndarray,
        kp: int,
        nprobe: int | None = None,
        allowed: Allowed | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss's top ``kp`` rows of each query; with ``allowed``, of those rows only
        (faiss skips the others inside its search: an ``IDSelectorBatch`` over ids)."""
        index = self._built()
        kp = max(1, min(kp, index.ntotal if allowed is None else allowed.rows))
        selector = None if allowed is None else allowed.selector
        if isinstance(index, faiss.IndexIVF):
            nprobe = min(nprobe or self.options.nprobe or index.nlist, index.nlist)
            return search_ivf(index, queries, kp, nprobe, selector)
        params: faiss.SearchParameters | None = None
        if selector is not None:
            params = faiss.SearchParameters()
            params.sel = selector
        return index.search(queries, kp, params=params)

    def search(self, queries: Tensor, k: int) -> list[RowHits]:
        return self._search(queries, k, None)

    def search_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """faiss searches the allowed images' rows alone (an id selector)."""
        rows = self.require_table().rows_of(images).astype(np.int64)
        return self._search(queries, k, Allowed(rows, len(images)))

    def _search(self, queries: Tensor, k: int, allowed: Allowed | None) -> list[RowHits]:
        self._built()  # a clear error before any work when it is not
        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        kp = math.ceil(self.options.overfetch * k)
        if self.options.kind != "flat":
            return self._ivfpq(queries, q, k, kp, allowed)
        return self._flat(q, k, kp, allowed)

    def _ivfpq(
        self, queries: Tensor, q: np.ndarray, k: int, kp: int, allowed: Allowed | None = None
    ) -> list[RowHits]:
        """Re-ranked candidates; a query short of ``k`` images (its probed lists held too
        few) is asked again with twice the probes and fetch, up to the whole index (or
        every allowed row)."""
        table = self.require_table()
        wanted = min(k, table.searchable_images if allowed is None else allowed.images)
        index = self._ivf()
        total = index.ntotal if allowed is None else allowed.rows
        nprobe = self.options.nprobe or index.nlist

        def fetch(todo: np.ndarray, round_: int) -> list[RowHits]:
            _, rows = self._fetch(q[todo], kp * 2**round_, nprobe * 2**round_, allowed)
            return [self._rerank(queries[i], r, k) for i, r in zip(todo, rows, strict=True)]

        def exhausted(round_: int) -> bool:
            return nprobe * 2**round_ >= index.nlist and kp * 2**round_ >= total

        return fetch_until_k_images(len(q), wanted, fetch, lambda hits: len(hits[0]), exhausted)

    def _rerank(self, query: Tensor, rows: np.ndarray, k: int) -> RowHits:
        """Exact top ``k`` of the images whose fetched ``rows`` score best exactly, on one
        OpenMP thread: its products are small, and OpenMP's threads spin after each one
        on the cores the next scan wants."""
        table = self.require_table()
        rows = np.sort(rows[rows >= 0])  # sorted: memory-mapped reads in file order
        with omp_threads(1):
            sims = (table.float_rows(rows) @ query.float().cpu()).numpy()
            order = np.argsort(-sims, kind="stable")
            best, _ = first_per_image(rows[order], sims[order], table.owner, RERANK_IMAGES * k)
            return rerank(table, query, table.owner[best], k)

    def _flat(
        self, q: np.ndarray, k: int, kp: int, allowed: Allowed | None = None
    ) -> list[RowHits]:
        """Groups the top ``kp`` representatives; fetches more where < ``k`` images came
        (until every row, or every allowed row, was fetched)."""
        owner = self.require_table().owner
        total = self._built().ntotal if allowed is None else allowed.rows

        def fetch(todo: np.ndarray, round_: int) -> list[RowHits]:
            scores, rows = self._fetch(q[todo], doubled(kp, total, round_), allowed=allowed)
            return [first_per_image(r, s, owner, k) for s, r in zip(scores, rows, strict=True)]

        def exhausted(round_: int) -> bool:
            return doubled(kp, total, round_) >= total

        return fetch_until_k_images(len(q), k, fetch, lambda hits: len(hits[0]), exhausted)

    def tune(self, queries: Tensor, truth: list[np.ndarray], k: int, target: float) -> None:
        """flat: the over-fetch most queries need (the rest fetch again). ivfpq: the
        cheapest ``(nprobe, overfetch)`` pair (:meth:`_cost`) whose re-ranked answers
        reach ``target`` recall, else the pair of best recall (:func:`tune_settings`)."""
        if self.options.kind == "flat":
            self.options.overfetch = self._flat_overfetch(queries, k)
            return
        owner = self.require_table().owner
        nlist = self._ivf().nlist
        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        fetched: dict[int, np.ndarray] = {}  # nprobe -> rows of the largest over-fetch

        def measure() -> np.ndarray:
            nprobe, overfetch = self.options.nprobe or nlist, int(self.options.overfetch)
            if nprobe not in fetched:  # a smaller fetch is a prefix of a larger one:
                fetched.clear()  # one fetch per nprobe serves every over-fetch
                fetched[nprobe] = self._fetch(q, OVERFETCH[-1] * k)[1]
            found = [
                self._rerank(v, r[: overfetch * k], k)
                for v, r in zip(queries, fetched[nprobe], strict=True)
            ]
            return query_recalls(found, truth, owner)

        candidates = (
            {"nprobe": nprobe, "overfetch": overfetch}
            for nprobe in [*(p for p in NPROBE if p < nlist), nlist]
            for overfetch in OVERFETCH
        )
        # the cost grows with both knobs, so once a pair meets the target the pricier
        # ones (more over-fetch, or more probes at any over-fetch) go unmeasured
        tune_settings(
            self.options,
            candidates,
            measure,
            target,
            cost=lambda s: self._cost(k, s["nprobe"], s["overfetch"]),
        )

    def _cost(self, k: int, nprobe: int, overfetch: int) -> float:
        """Numbers touched per query: PQ codes scanned, fetched rows scored exactly, and
        the best images' rows re-ranked. A model, not a timing, so the same data always
        gets the same settings (timings on a busy machine picked differently run to run)."""
        table = self.require_table()
        rows = table.num_live_rows
        per_code = SCAN_UNITS.get(self.options.kind, self.options.m or 1)
        scanned = nprobe / self._ivf().nlist * rows * per_code
        reps_per_image = rows / max(len(table.live_images), 1)
        return scanned + (overfetch + RERANK_IMAGES * reps_per_image) * k * self.dim

    def _flat_overfetch(self, queries: Tensor, k: int) -> int:
        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        _, rows = self._fetch(q, 64 * k)
        return needed_overfetch(rows, self.require_table().owner, k, cap=64)
