"""A run folder: what ``retrieval embed`` / ``eval`` write and every later command reads.

::

    RUN/
      config.yaml          the resolved config (:meth:`RunFolder.write_config`)
      embeddings/          the shards and their manifest.json (:class:`ShardStore`)
      images.parquet       an unlabelled run's collection table (ids -> files, live ids)
      metrics.json, per_category.csv, scores.npz, summary.md   a labelled run's results
      indexes.json         the index folders built from the run (:meth:`record_index`)
      .lock                held while a process writes the run (:mod:`retrieval.store.lock`)

The collection table's columns and how ids are assigned are
:mod:`retrieval.data.collection`'s; this module reads it (no torch, no pandas) and is the
one place that turns an image id into its file (:class:`ImageFiles`). Every file written
here goes through :func:`retrieval.store.atomic.write_atomic`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import StoreError
from retrieval.store.atomic import write_atomic
from retrieval.store.shards import ShardStore

if TYPE_CHECKING:
    import pyarrow as pa

CONFIG = "config.yaml"
EMBEDDINGS = "embeddings"
COLLECTION_FILE = "images.parquet"
ROOT_KEY = b"root"  # images.parquet schema metadata: the absolute images root
INDEXES = "indexes.json"


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A collection table (or the ``columns`` named), or a :class:`StoreError` naming it.

    Raises:
        StoreError: the file cannot be read as Parquet.
    """
    import pyarrow.parquet as pq

    try:  # one file: ParquetFile (pq.read_table imports pyarrow.dataset, and pandas with it)
        with pq.ParquetFile(path, memory_map=True) as file:
            return file.read(columns=columns)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise StoreError(
            f"{path} cannot be read ({err}); its ids name the run's stored embeddings, so "
            f"restore the file from a backup or embed the collection into a new run.output_dir"
        ) from None


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-width column without nulls as NumPy, read from its buffers: pyarrow's own
    ``to_numpy`` imports pandas (a quarter second), which ``index info``, ``export`` and
    the staleness notes would pay for nothing."""
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    kind = column.type
    if column.null_count or not (pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
        return column.to_numpy(zero_copy_only=False)
    data = column.buffers()[1]
    if pa.types.is_boolean(kind):  # bit-packed, least significant bit first
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return bits[column.offset : column.offset + len(column)].astype(bool)
    values = np.frombuffer(data, kind.to_pandas_dtype())
    return values[column.offset : column.offset + len(column)]


@dataclass(frozen=True)
class ImageFiles:
    """Which file each id of a collection table is: its ``path`` under the images root the
    table's schema metadata names (an absolute ``path`` as it is; as stored when the table
    names no root). Live and removed ids alike.

    Attributes:
        ids: the table's ids, ascending.
        paths: each id's ``path`` as stored (same order).
        root: the images root, or None when the table names none.
        order: the table rows in ``ids`` order (to align its other columns).
    """

    ids: np.ndarray
    paths: pa.Array
    root: Path | None
    order: np.ndarray

    @classmethod
    def of_table(cls, table: pa.Table) -> ImageFiles:
        import pyarrow as pa

        ids = column_numpy(table, "image_id").astype(np.int64)
        order = np.argsort(ids, kind="stable")
        paths = table.column("path").combine_chunks().cast(pa.string()).take(pa.array(order))
        raw = (table.schema.metadata or {}).get(ROOT_KEY, b"").decode()
        return cls(ids[order], paths, Path(raw) if raw else None, order)

    def rows(self, image_ids: np.ndarray) -> pa.Array:
        """Each id's position in :attr:`ids` (null for an id the table never assigned)."""
        import pyarrow as pa

        image_ids = np.asarray(image_ids, np.int64)
        if not len(self.ids):
            return pa.nulls(len(image_ids), pa.int64())
        pos = np.clip(np.searchsorted(self.ids, image_ids), 0, len(self.ids) - 1)
        return pa.array(pos, mask=self.ids[pos] != image_ids)

    def files(self, image_ids: np.ndarray) -> pa.Array:
        """One file per id (a string; null for an id the table never assigned)."""
        import pyarrow.compute as pc

        stored = self.paths.take(self.rows(image_ids))
        if self.root is None:
            return stored
        joined = pc.binary_join_element_wise(str(self.root).rstrip("/") + "/", stored, "")
        return pc.if_else(pc.starts_with(stored, "/"), stored, joined)

    def path(self, image_id: int) -> Path:
        """The file of one id.

        Raises:
            KeyError: the table never assigned ``image_id``.
        """
        k = int(np.searchsorted(self.ids, image_id))
        if k == len(self.ids) or self.ids[k] != image_id:
            raise KeyError(f"image id {image_id} is not in the collection table")
        stored = self.paths[k].as_py()
        # :meth:`files`' rule for one id, without building arrays (the embed phase asks
        # once per image)
        if self.root is None or stored.startswith("/"):
            return Path(stored)
        return Path(str(self.root).rstrip("/") + "/" + stored)


@dataclass(frozen=True)
class RunFolder:
    """The files of the run folder ``root`` (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def embeddings(self) -> Path:
        return self.root / EMBEDDINGS

    @property
    def collection(self) -> Path:
        return self.root / COLLECTION_FILE

    @property
    def indexes(self) -> Path:
        return self.root / INDEXES

    def store(self, dtype: str = "float16") -> ShardStore:
        return ShardStore(self.embeddings, dtype)

    def write_config(self, text: str) -> None:
        """Writes ``config.yaml`` (the resolved config as YAML), whole or not at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config, lambda tmp: tmp.write_text(text))

    def live_ids(self) -> np.ndarray | None:
        """The ids still in the run's collection (ascending), or None for a run without a
        collection table (a labelled run: every stored image is live).

        Raises:
            StoreError: the table exists but cannot be read.
        """
        if not self.collection.exists():
            return None
        table = read_table(self.collection, columns=["image_id", "removed"])
        ids, removed = column_numpy(table, "image_id"), column_numpy(table, "removed")
        return np.sort(ids[~removed]).astype(np.int64)

    def indexable_ids(self, skip_damaged: bool = False) -> np.ndarray:
        """Ids an index of the run should hold: stored in its shards and live in its
        collection table (every stored image when it has none: a labelled run)."""
        stored = self.store().stored_ids(skip_damaged)
        live = self.live_ids()
        return stored if live is None else np.intersect1d(stored, live)

    @cached_property
    def image_files(self) -> ImageFiles | None:
        """The collection table's id -> file map (read once), or None without a table.

        Raises:
            StoreError: the table exists but cannot be read.
        """
        if not self.collection.exists():
            return None
        return ImageFiles.of_table(read_table(self.collection, columns=["image_id", "path"]))

    def record_index(self, folder: str | Path) -> None:
        """Notes in ``indexes.json`` that ``folder`` indexes this run, so that ``retrieval
        index update RUN`` finds every index of the run, wherever it was built."""
        folder = Path(folder).resolve()
        known = [str(p) for p in self.recorded_indexes()]
        if str(folder) in known:
            return
        text = json.dumps(sorted([*known, str(folder)]), indent=1) + "\n"
        write_atomic(self.indexes, lambda tmp: tmp.write_text(text))

    def recorded_indexes(self) -> list[Path]:
        """The folders ``indexes.json`` lists (none when it is missing or unreadable)."""
        try:
            listed = json.loads(self.indexes.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(listed, list):
            return []
        return [Path(p) for p in listed if isinstance(p, str)]
