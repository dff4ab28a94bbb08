"""``milvus``: one row per representative in a Milvus collection, grouped by image.

Milvus's group-by search (``group_by_field="image"``) returns each top image once, with
its best representative, so the engine itself ranks images by max cosine. Hits are
re-scored from the fp16 table, which also names the matched representative exactly.

``uri`` picks the engine: unset (the default), the index uses milvus-lite in
``INDEX/milvus.db`` (embedded, in this process); ``http://host:19530`` a Milvus server
or cluster, for collections that outgrow one machine. The same client code drives both;
milvus-lite is a pure-Python stand-in: slow to insert (~2,000 rows/s here, indexing
included), without fp16 vectors (``vector_type`` falls back to float32 there), it
re-indexes in a background thread after inserts (closing waits for it), and its group-by
over-fetches a fixed 10x, so its recall is measured, not assumed. A server is shared,
so its collection is named by the user (``collection=...``) and its token comes from
``MILVUS_TOKEN``, never from the index manifest.

An update inserts the new table rows (primary key = table row) and deletes the removed
images' rows (``image in [...]``). The collection changes in place, so unlike the other
backends an update killed half-way is not rolled back: opening the index then fails
naming the mismatch, and rerunning the update repairs it (rows past the previous
table's end are deleted before inserting, so a retry never duplicates them).

A filtered search passes Milvus the allow-list as its own boolean filter on the image
field (``filter="image in [...]"``, image = table position), so the engine groups only
allowed images; past ``FILTER_MAX`` images, or for a query the engine answered with fewer
than ``k`` of at least ``k`` allowed images (its HNSW graph search under a narrow filter
can), the allowed rows are re-scored exactly from the fp16 table instead (the base
class's fallback).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from retrieval.errors import ConfigError, IndexFileError, did_you_mean
from retrieval.factory import register_backend
from retrieval.index.base import Backend, RowHits
from retrieval.index.exact import rerank
from retrieval.index.table import corrupt
from retrieval.index.tuning import image_recall, tune_settings

LITE_DIR = "milvus.db"
LITE_COLLECTION = "representatives"
INSERT_ROWS = 10_000
SEARCH_QUERIES = 64
VECTOR_TYPES = ("auto", "float16", "float")
INDEX_PARAMS = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {},
    "FLAT": {},
    "AUTOINDEX": {},
}
EF_FACTORS = (1, 2, 4, 8, 16, 32)  # HNSW ef per result asked (Milvus needs ef >= limit)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FILTER_MAX = 100_000  # allowed images pushed into a Milvus filter; past it, exact


def _import_pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise IndexFileError(
            "the milvus backend needs pymilvus (and milvus-lite for a local index): "
            "pip install 'object-retrieval[milvus]'"
        ) from None
    return pymilvus


@register_backend("milvus", index_type="HNSW", vector_type="auto")
class MilvusBackend(Backend):
    """Milvus behind the backend interface (options: ``uri``, ``collection``,
    ``index_type`` HNSW | IVF_FLAT | FLAT | AUTOINDEX, ``vector_type``, ``ef_factor``
    (HNSW ef = ef_factor x top), ``nprobe``, ``nlist``)."""

    def __init__(self, folder: str | Path, dim: int, device: str = "auto", **options: Any):
        for key, allowed in (("index_type", INDEX_PARAMS), ("vector_type", VECTOR_TYPES)):
            if options[key] not in allowed:
                raise ConfigError(
                    f"milvus {key} {options[key]!r} is not one of {', '.join(allowed)}: "
                    f"pass e.g. --option {key}={next(iter(allowed))}."
                    f"{did_you_mean(str(options[key]), allowed)}"
                )
        if options.get("uri") and not options.get("collection"):
            raise ConfigError(
                f"a Milvus server ({options['uri']}) is shared: name the collection this "
                f"index owns with --option collection=NAME (it is replaced on rebuild)"
            )
        options.setdefault("uri", None)
        options.setdefault("collection", LITE_COLLECTION)
        super().__init__(folder, dim, device, **options)
        self.client: Any = None  # a pymilvus.MilvusClient once built or loaded

    @property
    def lite(self) -> bool:
        return not self.options["uri"]

    @property
    def approximate(self) -> bool:  # type: ignore[override]
        return self.options["index_type"] != "FLAT"

    def _connect(self) -> Any:
        """A client of this index's engine (milvus-lite starts in this process)."""
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
            uri = self.options["uri"]
        try:
            return pymilvus.MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
        except pymilvus.MilvusException as err:
            raise IndexFileError(f"cannot connect to Milvus at {uri}: {err}") from None

    @property
    def np_type(self) -> type:
        """The numpy type of stored and query vectors (``vector_type`` resolved)."""
        if self.options["vector_type"] == "auto":  # milvus-lite has no fp16 vectors
            self.options["vector_type"] = "float" if self.lite else "float16"
        return np.float16 if self.options["vector_type"] == "float16" else np.float32

    def build(self, progress: bool) -> None:
        pymilvus = _import_pymilvus()
        table = self.require_table()
        client = self.client = self._connect()
        name = self.options["collection"]
        if client.has_collection(name):
            client.drop_collection(name)
        np_type = self.np_type
        vector_type = (
            pymilvus.DataType.FLOAT16_VECTOR
            if np_type == np.float16
            else (pymilvus.DataType.FLOAT_VECTOR)
        )
        schema = pymilvus.MilvusClient.create_schema(auto_id=False)
        schema.add_field("row", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("image", pymilvus.DataType.INT64)
        schema.add_field("vector", vector_type, dim=self.dim)
        kind = self.options["index_type"]
        params = dict(INDEX_PARAMS[kind])
        if kind == "IVF_FLAT":
            params["nlist"] = self.options.setdefault(
                "nlist", max(1, min(int(math.sqrt(table.num_rows)), table.num_rows // 39))
            )
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type=kind, metric_type="IP", params=params
        )
        client.create_collection(name, schema=schema, index_params=index_params)
        self._insert(table.live_rows, progress)
        client.load_collection(name)

    def _insert(self, rows: np.ndarray, progress: bool) -> None:
        """Inserts table ``rows`` (ascending), ``INSERT_ROWS`` at a time."""
        table = self.require_table()
        name, np_type = self.options["collection"], self.np_type
        starts = range(0, len(rows), INSERT_ROWS)
        for start in tqdm(starts, desc="milvus insert", unit="chunk", disable=not progress):
            part = rows[start : start + INSERT_ROWS]
            vectors: np.ndarray = np.asarray(table.vectors[part], dtype=np_type)
            self.client.insert(
                name,
                [
                    {"row": int(row), "image": int(image), "vector": vector}
                    for row, image, vector in zip(part, table.owner[part], vectors, strict=True)
                ],
            )

    def add_rows(self, rows: np.ndarray, progress: bool) -> None:
        """Inserts the new rows, after deleting any an unfinished update left there."""
        self.client.delete(self.options["collection"], filter=f"row >= {int(rows[0])}")
        self._insert(rows, progress)

    def remove_rows(self, rows: np.ndarray) -> None:
        """Deletes the removed images' rows by image (table position)."""
        images = np.unique(self.require_table(allow_empty=True).owner[rows])
        for start in range(0, len(images), INSERT_ROWS):
            part = ", ".join(str(int(i)) for i in images[start : start + INSERT_ROWS])
            self.client.delete(self.options["collection"], filter=f"image in [{part}]")

    def save(self) -> None:
        """After an update: flushes the collection (Milvus keeps its own files) and
        checks it holds the table's live rows (the build flushed already)."""
        if self.generation:
            self.client.flush(self.options["collection"])
            self.updating = False
            self._check_rows(self.folder / LITE_DIR if self.lite else self.options["uri"])

    def load(self) -> None:
        if self.lite and not (self.folder / LITE_DIR).is_dir():
            raise corrupt(self.folder / LITE_DIR, "folder missing")
        client = self.client = self._connect()
        name = self.options["collection"]
        where = self.folder / LITE_DIR if self.lite else f"{self.options['uri']}"
        if not client.has_collection(name):
            raise IndexFileError(
                f"Milvus collection {name!r} is missing from {where}; rebuild the index "
                f"with `retrieval index build RUN_DIR --backend milvus --out {self.folder}`"
            )
        client.load_collection(name)
        self._check_rows(where)

    def _check_rows(self, where: object) -> None:
        """Raises unless the collection holds the table's live rows (an update may open
        one an unfinished update left otherwise: it repairs it)."""
        name = self.options["collection"]
        rows = int(self.client.get_collection_stats(name)["row_count"])
        table_rows = self.require_table(allow_empty=True).num_live_rows
        if rows != table_rows and not self.updating:
            raise IndexFileError(
                f"Milvus collection {name!r} at {where} holds {rows} representatives, the "
                f"index table {table_rows}: it was changed since the build or last update "
                f"(an update that did not finish: rerun `retrieval index update "
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
        return super().disk_bytes() + self._lite_bytes()

    def memory_bytes(self) -> int:
        """milvus-lite holds its collection in this process (its folder's size counts);
        a server holds it elsewhere, so only the table's metadata counts here."""
        return super().memory_bytes() + self._lite_bytes()

    def _search_params(self, k: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.options["index_type"] == "HNSW":
            params["ef"] = max(self.options.get("ef_factor", 2) * k, 16)
        if "nprobe" in self.options:
            params["nprobe"] = self.options["nprobe"]
        return {"metric_type": "IP", "params": params}

    def _images(self, queries: np.ndarray, k: int, where: str = "") -> list[np.ndarray]:
        """Per query, the table positions of the top ``k`` images Milvus groups (among
        those matching the filter ``where``)."""
        out: list[np.ndarray] = []
        for start in range(0, len(queries), SEARCH_QUERIES):
            batch: np.ndarray = queries[start : start + SEARCH_QUERIES].astype(self.np_type)
            result = self.client.search(
                self.options["collection"],
                data=list(batch),
                limit=k,
                group_by_field="image",
                output_fields=["image"],
                filter=where,
                search_params=self._search_params(k),
            )
            out += [np.array([h["entity"]["image"] for h in hits], np.int64) for hits in result]
        return out

    def search_rows(self, queries: Tensor, k: int) -> list[RowHits]:
        if self.client is None:
            raise IndexFileError(f"index {self.folder}: the milvus collection is not open")
        table = self.require_table()
        q = queries.float().cpu()
        images = self._images(q.numpy(), k)
        return [rerank(table, v, found, k) for v, found in zip(q, images, strict=True)]

    def search_rows_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """Milvus's ``filter`` on the image field; exact past ``FILTER_MAX`` images."""
        if len(images) > FILTER_MAX:
            return super().search_rows_in(queries, k, images)
        if self.client is None:
            raise IndexFileError(f"index {self.folder}: the milvus collection is not open")
        table = self.require_table()
        q = queries.float().cpu()
        where = f"image in [{', '.join(str(int(i)) for i in images)}]"
        found = self._images(q.numpy(), k, where)
        out = [rerank(table, v, f, k) for v, f in zip(q, found, strict=True)]
        # the engine's filtered graph search can come back short of the allowed images
        # (milvus-lite found 4 of 9): such a query is answered exactly instead
        short = [i for i, f in enumerate(found) if len(f) < min(k, len(images))]
        if short:
            exact = super().search_rows_in(queries[short], k, images)
            for i, hits in zip(short, exact, strict=True):
                out[i] = hits
        return out

    def tune(self, queries: Tensor, truth: list[np.ndarray], k: int, target: float) -> None:
        """HNSW: the least ``ef_factor`` reaching ``target`` recall; IVF_FLAT: the least
        ``nprobe``; else the most tried. FLAT and AUTOINDEX have nothing to tune here."""
        kind = self.options["index_type"]
        values: tuple[int, ...]
        if kind == "HNSW":
            key, values = "ef_factor", EF_FACTORS
        elif kind == "IVF_FLAT":
            key, values = "nprobe", tuple(v for v in NPROBE if v <= self.options["nlist"])
        else:
            return
        q = queries.float().cpu().numpy()
        tune_settings(
            self.options,
            ({key: value} for value in values),
            lambda: image_recall(self._images(q, k), truth),
            target,
            fallback="last",
        )
