"""``milvus``: one row per representative in a Milvus collection, grouped by image.

``uri`` picks the engine: unset (the default), the index uses milvus-lite in
``INDEX/milvus.db`` (embedded, in this process); ``http://host:19530`` a Milvus server
or cluster, for collections that outgrow one machine. A server is shared, so its
collection is named by the user (``collection=...``, replaced on rebuild) and its token
comes from ``MILVUS_TOKEN``, never from the index manifest. See docs/milvus.md for the
versions tested.

Engines differ, some silently, so the backend asks the engine its version at build and
at open (:mod:`retrieval.index.milvus_server_caps`) and records what it chose in its
settings (``engine``, ``grouping``, ``vector_type``; ``retrieval index info`` shows
them):

- grouping: where the engine honours ``group_by_field`` (servers >= 2.4, milvus-lite)
  it returns each top image once with its best representative (``grouping=server``);
  a 2.3 server ignores it, so there the backend groups itself (``grouping=client``):
  it fetches the top ``overfetch x k`` representatives, keeps each image's first, and
  fetches twice as many for a query short of ``k`` images, up to Milvus's top-k limit
  (``LIMIT_MAX``) or every row, as the faiss flat backend does. ``group_by=client``
  forces it anywhere. Either way the candidate images are re-scored exactly from the
  fp16 table, which also names the matched representative, and a query the engine
  answers with fewer images than it should (a graph search under a narrow filter, a
  fetch capped by the limit) is answered by exact search over the table instead.
- vectors: ``vector_type=auto`` stores fp16 where the engine takes fp16 with the chosen
  index, float32 elsewhere; an explicit ``float16`` the engine cannot take is refused
  before any work (a 2.3 server hangs indexing fp16 and answers FLAT over fp16 wrongly).

Every request carries a timeout (``timeout`` seconds; flushing, indexing and loading
``load_timeout``), so a dead, hung or still-starting server, a refused token or a
missing collection ends in one :class:`IndexFileError` naming the URI and the fix, not
a hang. Rows are counted with a strong-consistency ``count(*)`` after every write and at
open (it also waits until a restarted server serves the collection again), so searches
that follow see every row.

milvus-lite 3.x is a pure-Python stand-in: slow to insert (results/bench/search_cpu.md),
float32 only, and its group-by over-fetches a fixed 10x, so its recall is
measured, not assumed.

An update inserts the new table rows (primary key = table row) and deletes the removed
images' rows (``image in [...]``). The collection changes in place, so unlike the other
backends an update killed half-way is not rolled back: opening the index then fails
naming the mismatch, and rerunning the update repairs it (rows past the previous
table's end are deleted before inserting, so a retry never duplicates them).

A filtered search passes Milvus the allow-list as its own boolean filter on the image
field (``filter="image in [...]"``, image = table position); past ``FILTER_MAX`` images
the allowed rows are re-scored exactly from the fp16 table instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from retrieval.errors import ConfigError, IndexFileError
from retrieval.index.base import Backend, register_backend
from retrieval.index.engine import Engine, EngineOptions, chosen, state_field
from retrieval.index.grouping import (
    check_choice,
    doubled,
    fetch_until_k_images,
    first_images,
    needed_overfetch,
)
from retrieval.index.kernels import RowHits, exact_search, rerank
from retrieval.index.milvus_server_caps import (
    Capabilities,
    lite_capabilities,
    server_capabilities,
)
from retrieval.index.table import corrupt
from retrieval.index.tuning import query_recalls, tune_settings

LITE_DIR = "milvus.db"
LITE_COLLECTION = "representatives"
INSERT_ROWS = 10_000
SEARCH_QUERIES = 64
SEARCH_HITS = 1 << 16  # queries x limit per request: one answer stays a few MB
LIMIT_MAX = 16_384  # Milvus's largest top-k (common.topKLimit)
EF_MAX = 32_768  # Milvus's largest HNSW ef
RERANK_IMAGES = 2  # client grouping re-scores this many x k fetched images exactly
VECTOR_TYPES = ("auto", "float16", "float")
GROUP_BY = ("auto", "server", "client")
INDEX_PARAMS = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {},
    "FLAT": {},
    "AUTOINDEX": {},
}
EF_FACTORS = (1, 2, 4, 8, 16, 32)  # HNSW ef per result asked (Milvus needs ef >= limit)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FILTER_MAX = 100_000  # allowed images pushed into a Milvus filter; past it, exact
TIMEOUT = 60.0  # seconds one request may take
LOAD_TIMEOUT = 1800.0  # seconds flushing, indexing or loading the collection may take


def _import_pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise IndexFileError(
            "the milvus backend needs pymilvus (and milvus-lite for a local index): "
            "pip install 'object-retrieval[milvus]'"
        ) from None
    if not os.environ.get("RETRIEVAL_DEBUG"):  # it logs a traceback per failed request;
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # each becomes one error
    return pymilvus


@dataclass
class MilvusOptions(EngineOptions):
    """``uri`` (unset: milvus-lite in the index folder), ``collection`` (required with a
    server), ``index_type`` HNSW | IVF_FLAT | FLAT | AUTOINDEX, ``vector_type`` auto |
    float16 | float, ``group_by`` auto | server | client, ``overfetch`` (client
    grouping), ``ef_factor`` (HNSW ef = ef_factor x limit), ``nprobe``, ``nlist``,
    ``timeout`` and ``load_timeout`` in seconds; state: ``engine`` and ``grouping``
    (what the engine's version decided)."""

    uri: str | None = chosen("milvus-lite in the index folder")
    collection: str | None = chosen("required with a server")
    index_type: str = "HNSW"
    vector_type: str = "auto"
    group_by: str = "auto"
    overfetch: float = 4
    ef_factor: int | None = chosen("tuned")
    nprobe: int | None = chosen("tuned")
    nlist: int | None = chosen("by size")
    timeout: float = TIMEOUT
    load_timeout: float = LOAD_TIMEOUT
    engine: str | None = state_field()
    grouping: str | None = state_field()

    def __post_init__(self) -> None:
        check_choice("milvus", "index_type", self.index_type, INDEX_PARAMS)
        check_choice("milvus", "vector_type", self.vector_type, VECTOR_TYPES)
        check_choice("milvus", "group_by", self.group_by, GROUP_BY)
        for key in ("timeout", "load_timeout"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(
                    f"milvus {key} {value!r} is not a positive number of seconds: "
                    f"pass e.g. --option {key}={int(TIMEOUT)}"
                )
        if self.uri and not self.collection:
            raise ConfigError(
                f"a Milvus server ({self.uri}) is shared: name the collection this "
                f"index owns with --option collection=NAME (it is replaced on rebuild)"
            )
        self.collection = self.collection or LITE_COLLECTION


@register_backend("milvus")
class MilvusBackend(Engine):
    """Milvus as an index engine (options: :class:`MilvusOptions`)."""

    Options = MilvusOptions
    options: MilvusOptions
    updatable = True
    native_filter = True

    def __init__(self, backend: Backend, options: EngineOptions) -> None:
        super().__init__(backend, options)
        self.client: Any = None  # a pymilvus.MilvusClient once built or loaded

    @property
    def lite(self) -> bool:
        return not self.options.uri

    @property
    def approximate(self) -> bool:
        return self.options.index_type != "FLAT"

    @property
    def where(self) -> str:
        """The engine, for messages: the milvus-lite folder or the server's URI."""
        return str(self.folder / LITE_DIR) if self.lite else str(self.options.uri)

    @property
    def np_type(self) -> type:
        """The numpy type of stored and query vectors."""
        return np.float16 if self.options.vector_type == "float16" else np.float32

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` with a timeout (``timeout`` unless given); a failure
        becomes an :class:`IndexFileError` saying what failed and what to do."""
        pymilvus = _import_pymilvus()
        import grpc  # pymilvus's own transport

        kwargs.setdefault("timeout", self.options.timeout)
        try:
            return method(*args, **kwargs)
        except (pymilvus.MilvusException, grpc.RpcError) as err:
            raise self._error(what, err, kwargs["timeout"]) from None

    def _error(self, what: str, err: Exception, timeout: float) -> IndexFileError:
        import grpc

        cause = err if isinstance(err, grpc.RpcError) else err.__cause__
        code = cause.code() if isinstance(cause, grpc.RpcError) else None
        text = str(getattr(err, "message", "") or "").strip() or str(err).strip()
        rebuild = f"`retrieval index build RUN_DIR --backend milvus --out {self.folder}`"
        if code == grpc.StatusCode.UNAUTHENTICATED or "auth" in text.lower():
            token = "set" if os.environ.get("MILVUS_TOKEN") else "not set"
            return IndexFileError(
                f"Milvus at {self.where} refused the token (MILVUS_TOKEN is {token}) when "
                f"asked to {what}: set MILVUS_TOKEN to a valid 'user:password' or API key"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED or "timeout" in text.lower():
            return IndexFileError(
                f"Milvus at {self.where} did not {what} within {timeout:g} s: it is down, "
                f"hung or still starting (a restarted server may take a minute to serve its "
                f"collections again). Check the server and retry; a build may allow more "
                f"time with --option timeout=SECONDS / load_timeout=SECONDS"
            )
        if code == grpc.StatusCode.UNAVAILABLE or getattr(err, "code", None) == 2:  # connect
            return IndexFileError(
                f"cannot reach Milvus at {self.where} to {what}: start the server (or fix "
                f"--option uri), then retry"
            )
        if "collection not found" in text or "can't find collection" in text:
            return IndexFileError(
                f"Milvus collection {self.options.collection!r} is missing from "
                f"{self.where}; rebuild the index with {rebuild}"
            )
        return IndexFileError(f"Milvus at {self.where} failed to {what}: {text}")

    def _connect(self) -> Capabilities:
        """Connects a client to this index's engine (milvus-lite starts in this process)
        and returns what the engine can do; the grouping follows (in the settings)."""
        pymilvus = _import_pymilvus()
        if self.lite:
            try:
                import milvus_lite  # noqa: F401 - pymilvus starts it for a .db uri
            except ImportError:
                raise IndexFileError(
                    "a local milvus index needs milvus-lite: pip install milvus-lite==3.2.2, "
                    "or pass --option uri=http://HOST:19530 for a Milvus server"
                ) from None
            uri = str((self.folder / LITE_DIR).resolve())
        else:
            uri = str(self.options.uri)
        token = os.environ.get("MILVUS_TOKEN", "")
        connect = pymilvus.MilvusClient
        self.client = self._call("connect", connect, uri=uri, token=token)
        if self.lite:  # the package pymilvus started, which is what decides
            caps = lite_capabilities(importlib.metadata.version("milvus-lite"))
        else:
            version = self._call("tell its version", self.client.get_server_version)
            caps = server_capabilities(str(version))
        if self.options.group_by == "server" and not caps.group_by:
            raise ConfigError(
                f"{caps.engine} at {self.where} ignores group_by_field (Milvus groups from "
                f"2.4 on): pass --option group_by=auto (the backend then groups by image)"
            )
        server = caps.group_by and self.options.group_by != "client"
        self.options.engine = caps.engine
        self.options.grouping = "server" if server else "client"
        return caps

    def _resolve_vector_type(self, caps: Capabilities) -> None:
        """``auto`` -> fp16 where the engine takes it with the index, else float32;
        an explicit fp16 it cannot take is refused (a 2.3 server would hang or err)."""
        kind, wanted = self.options.index_type, self.options.vector_type
        fp16 = kind in caps.fp16_indexes
        if wanted == "float16" and not fp16:
            takes = ", ".join(sorted(caps.fp16_indexes))
            only = f" (only with {takes})" if takes else ""
            raise ConfigError(
                f"{caps.engine} at {self.where} cannot store float16 vectors for a {kind} "
                f"index{only}: pass --option vector_type=auto (float16 where the engine "
                f"takes it) or vector_type=float"
            )
        if wanted == "auto":
            self.options.vector_type = "float16" if fp16 else "float"

    def build(self, progress: bool) -> None:
        pymilvus = _import_pymilvus()
        table = self.require_table()
        self._resolve_vector_type(self._connect())
        client, name = self.client, self.options.collection
        if self._call(f"look up collection {name!r}", client.has_collection, name):
            self._call(f"drop the old collection {name!r}", client.drop_collection, name)
        vector_type = (
            pymilvus.DataType.FLOAT16_VECTOR
            if self.np_type == np.float16
            else pymilvus.DataType.FLOAT_VECTOR
        )
        schema = pymilvus.MilvusClient.create_schema(auto_id=False)
        schema.add_field("row", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("image", pymilvus.DataType.INT64)
        schema.add_field("vector", vector_type, dim=self.dim)
        self._call(f"create collection {name!r}", client.create_collection, name, schema=schema)
        self._insert(table.live_rows, progress)
        kind = self.options.index_type
        params = dict(INDEX_PARAMS[kind])
        if kind == "IVF_FLAT":
            if self.options.nlist is None:
                rows = table.num_rows
                self.options.nlist = max(1, min(int(math.sqrt(rows)), rows // 39))
            params["nlist"] = self.options.nlist
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type=kind, metric_type="IP", params=params
        )
        wait = self.options.load_timeout
        self._call(f"flush collection {name!r}", client.flush, name, timeout=wait)
        build = client.create_index
        self._call(f"build a {kind} index on {name!r}", build, name, index_params, timeout=wait)
        self._call(f"load collection {name!r}", client.load_collection, name, timeout=wait)
        self._check_rows()

    def _insert(self, rows: np.ndarray, progress: bool) -> None:
        """Inserts table ``rows`` (ascending), ``INSERT_ROWS`` at a time."""
        table = self.require_table()
        name, np_type = self.options.collection, self.np_type
        starts = range(0, len(rows), INSERT_ROWS)
        for start in tqdm(starts, desc="milvus insert", unit="chunk", disable=not progress):
            part = rows[start : start + INSERT_ROWS]
            vectors: np.ndarray = np.asarray(table.vectors[part], dtype=np_type)
            data = [
                {"row": int(row), "image": int(image), "vector": vector}
                for row, image, vector in zip(part, table.owner[part], vectors, strict=True)
            ]
            self._call(f"insert rows into {name!r}", self.client.insert, name, data)

    def add(self, rows: np.ndarray, progress: bool) -> None:
        """Inserts the new rows, after deleting any an unfinished update left there."""
        name = self.options.collection
        where = f"row >= {int(rows[0])}"
        self._call(f"delete rows from {name!r}", self.client.delete, name, filter=where)
        self._insert(rows, progress)

    def remove(self, rows: np.ndarray) -> None:
        """Deletes the removed images' rows by image (table position)."""
        name = self.options.collection
        images = np.unique(self.require_table(allow_empty=True).owner[rows])
        for start in range(0, len(images), INSERT_ROWS):
            part = ", ".join(str(int(i)) for i in images[start : start + INSERT_ROWS])
            where = f"image in [{part}]"
            self._call(f"delete rows from {name!r}", self.client.delete, name, filter=where)

    def save(self) -> None:
        """After an update: flushes the collection (Milvus keeps its own files) and
        checks it holds the table's live rows (the build checked already)."""
        if self.generation:
            name = self.options.collection
            wait = self.options.load_timeout
            self._call(f"flush collection {name!r}", self.client.flush, name, timeout=wait)
            self.backend.updating = False
            self._check_rows()

    def load(self) -> None:
        if self.lite and not (self.folder / LITE_DIR).is_dir():
            raise corrupt(self.folder / LITE_DIR, "folder missing")
        caps = self._connect()
        name, kind = self.options.collection, self.options.index_type
        if self.options.vector_type == "float16" and kind not in caps.fp16_indexes:
            raise IndexFileError(  # an index built before the engine's version was asked
                f"index {self.folder} stores float16 vectors with a {kind} index, which "
                f"{caps.engine} at {self.where} does not search correctly: rebuild it with "
                f"`retrieval index build RUN_DIR --backend milvus --out {self.folder}` "
                f"(vector_type=auto picks float32 there)"
            )
        if not self._call(f"look up collection {name!r}", self.client.has_collection, name):
            raise IndexFileError(
                f"Milvus collection {name!r} is missing from {self.where}; rebuild the index "
                f"with `retrieval index build RUN_DIR --backend milvus --out {self.folder}`"
            )
        wait = self.options.load_timeout
        self._call(f"load collection {name!r}", self.client.load_collection, name, timeout=wait)
        self._check_rows()

    def _check_rows(self) -> None:
        """Raises unless the collection holds the table's live rows (an update may open
        one an unfinished update left otherwise: it repairs it). A strong-consistency
        count: it sees every write so far, so the searches after it do too."""
        name = self.options.collection
        found = self._call(
            f"count the rows of {name!r}",
            self.client.query,
            name,
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        rows = int(found[0]["count(*)"])
        table_rows = self.require_table(allow_empty=True).num_live_rows
        if rows != table_rows and not self.updating:
            raise IndexFileError(
                f"Milvus collection {name!r} at {self.where} holds {rows} representatives, "
                f"the index table {table_rows}: it was changed since the build or last "
                f"update (an update that did not finish: rerun `retrieval index update "
                f"{self.folder}`); else rebuild with `retrieval index build RUN_DIR "
                f"--backend milvus --out {self.folder}`"
            )

    def close(self) -> None:
        """Closes the client (and stops this index's milvus-lite server)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.lite:
            from milvus_lite import server_manager_instance

            server_manager_instance.release_server(str((self.folder / LITE_DIR).resolve()))

    def _lite_bytes(self) -> int:
        """Size of milvus-lite's folder (0 for a server). Not listed in :meth:`files`: it
        rewrites its files as it runs, so the collection's row count is checked at open."""
        folder = self.folder / LITE_DIR
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if self.lite else 0

    def disk_bytes(self) -> int:
        return self._lite_bytes()

    def memory_bytes(self) -> int:
        """milvus-lite holds its collection in this process (its folder's size counts);
        a server holds it elsewhere, so only the table's metadata counts here."""
        return self._lite_bytes()

    def _search_params(self, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.options.index_type == "HNSW":
            ef = max((self.options.ef_factor or 2) * limit, 16, limit)
            params["ef"] = min(ef, EF_MAX)
        if self.options.nprobe is not None:
            params["nprobe"] = self.options.nprobe
        return {"metric_type": "IP", "params": params}

    def _search(self, queries: np.ndarray, limit: int, where: str, group: bool) -> list[Any]:
        """Milvus's answers for ``queries``, ``limit`` each (images when ``group``,
        else representatives), a batch of queries per request."""
        if self.client is None:
            raise IndexFileError(f"index {self.folder}: the milvus collection is not open")
        name = self.options.collection
        per = max(1, min(SEARCH_QUERIES, SEARCH_HITS // limit))
        extra = {"group_by_field": "image", "output_fields": ["image"]} if group else {}
        out: list[Any] = []
        for start in range(0, len(queries), per):
            batch: np.ndarray = queries[start : start + per].astype(self.np_type)
            out += self._call(
                f"search collection {name!r}",
                self.client.search,
                name,
                data=list(batch),
                limit=limit,
                filter=where,
                search_params=self._search_params(limit),
                **extra,
            )
        return out

    def _server_groups(self, queries: np.ndarray, k: int, where: str) -> list[np.ndarray]:
        """Per query, the top ``k`` images (table positions) Milvus's group-by returns."""
        found = self._search(queries, k, where, group=True)
        return [np.array([h["entity"]["image"] for h in hits], np.int64) for hits in found]

    def _client_groups(
        self, queries: np.ndarray, k: int, where: str, rows: int
    ) -> list[np.ndarray]:
        """Per query, candidate images (table positions, best first) grouped here: the
        first ``RERANK_IMAGES x k`` images of the top representatives, fetching twice as
        many for a query short of ``k`` images while more rows (``rows`` searchable)
        can come back."""
        owner = self.require_table().owner
        most = min(LIMIT_MAX, rows)
        limit = min(max(math.ceil(self.options.overfetch * k), k), most)

        def fetch(todo: np.ndarray, round_: int) -> list[np.ndarray]:
            found = self._search(queries[todo], doubled(limit, most, round_), where, group=False)
            return [first_images(np.asarray(hits.ids, np.int64), owner) for hits in found]

        def exhausted(round_: int) -> bool:
            return doubled(limit, most, round_) >= most

        grouped = fetch_until_k_images(len(queries), k, fetch, len, exhausted)
        return [images[: RERANK_IMAGES * k] for images in grouped]

    def _answer(self, queries: Tensor, k: int, images: np.ndarray | None) -> list[RowHits]:
        """Top ``k`` images (among ``images``, table positions, when given): the engine's
        candidates re-scored from the table; a query it answered short of the images it
        should find is searched exactly instead."""
        table = self.require_table()
        q = queries.float().cpu()
        if images is None:
            where, wanted, rows = "", min(k, table.searchable_images), table.num_live_rows
        else:
            where = f"image in [{', '.join(str(int(i)) for i in images)}]"
            wanted, rows = min(k, len(images)), len(table.rows_of(images))
        if self.options.grouping == "server":
            found = self._server_groups(q.numpy(), k, where)
        else:
            found = self._client_groups(q.numpy(), k, where, rows)
        out = [rerank(table, v, f, k) for v, f in zip(q, found, strict=True)]
        short = [i for i, hits in enumerate(out) if len(hits[0]) < wanted]
        if short:
            exact = exact_search(table, q[short], k, self.device, images=images)
            for i, hits in zip(short, exact, strict=True):
                out[i] = hits
        return out

    def search(self, queries: Tensor, k: int) -> list[RowHits]:
        return self._answer(queries, k, None)

    def search_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """Milvus's ``filter`` on the image field; exact past ``FILTER_MAX`` images."""
        if len(images) > FILTER_MAX:
            return super().search_in(queries, k, images)
        return self._answer(queries, k, images)

    def tune(self, queries: Tensor, truth: list[np.ndarray], k: int, target: float) -> None:
        """Client grouping: first the over-fetch most queries need (the rest fetch
        again). Then HNSW: the least ``ef_factor`` reaching ``target`` recall; IVF_FLAT:
        the least ``nprobe``; else the most tried. FLAT and AUTOINDEX have nothing more
        to tune."""
        if self.options.grouping == "client":
            self.options.overfetch = self._overfetch(queries.float().cpu().numpy(), k)
        kind = self.options.index_type
        values: tuple[int, ...]
        if kind == "HNSW":
            key, values = "ef_factor", EF_FACTORS
        elif kind == "IVF_FLAT":
            key, values = "nprobe", tuple(v for v in NPROBE if v <= (self.options.nlist or 1))
        else:
            return
        owner = self.require_table().owner
        tune_settings(
            self.options,
            ({key: value} for value in values),
            lambda: query_recalls(self.search(queries, k), truth, owner),
            target,
            fallback="last",
        )

    def _overfetch(self, queries: np.ndarray, k: int) -> int:
        """Representatives per image wanted that cover ``k`` images for 90% of queries."""
        owner = self.require_table().owner
        limit = min(64 * k, LIMIT_MAX, self.require_table().num_live_rows)
        found = self._search(queries, limit, "", group=False)
        fetched = [np.asarray(hits.ids, np.int64) for hits in found]
        return needed_overfetch(fetched, owner, k, cap=limit / k)
