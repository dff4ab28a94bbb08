"""Export a run's stored representatives for other tools: one row per valid representative.

Each row holds the fields a search hit names the same way (:mod:`retrieval.index.hits`):
``image_id``, ``path`` (the image file), ``file_name``, ``rep_index`` (the slot in the
run's padded ``[B, R, D]`` layout) and ``box`` (normalised ``xyxy``, or null when the
retriever gives no boxes); then ``embedding`` (fp16 or fp32) and, for a collection, its
table's columns (``size_bytes``, ``mtime_ns``, ``width``, ``height`` and the metadata
CSV's columns). Only live images are exported when the run has a collection table
(``images.parquet``).

Two formats:

* ``parquet``: one file, one row group per read of a shard (never the whole run in
  memory); ``embedding`` and ``box`` are fixed-size lists. The run folder and its
  embedding fingerprint are in the file's key-value metadata.
* ``npy``: clip-retrieval's embeddings folder, what embedding-reader
  (``file_format="parquet_npy"``) and autofaiss read: ``OUT/img_emb/img_emb_K.npy``
  (``[N, D]``) and ``OUT/metadata/metadata_K.parquet`` (the other columns, same row
  order), one pair per non-empty shard. ``K`` is zero-padded to one width, because both
  readers sort file names as strings and pair the two folders by that order; an empty
  pair is never written, since embedding-reader skips an empty ``.npy`` but not its
  parquet, which would shift every later pair.

The output is written under a temporary name and renamed, so a killed export leaves no
half-written ``OUT`` behind; an existing ``OUT`` is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from retrieval.errors import ConfigError, StoreError
from retrieval.index.hits import ROW_FIELDS
from retrieval.outputs import check_output
from retrieval.store.run_folder import RunFolder, read_table
from retrieval.store.run_images import RunImages
from retrieval.store.shards import ShardReader, ShardStore, open_run_store

FORMATS: tuple[str, ...] = ("parquet", "npy")
DTYPES: dict[str, type[np.floating[Any]]] = {"float16": np.float16, "float32": np.float32}
EMBEDDINGS_DIR = "img_emb"  # clip-retrieval's image embeddings subfolder
METADATA_DIR = "metadata"
READ_SLOTS = 1 << 16  # padded slots (images x R) read from a shard at once


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        out: the parquet file or the npy folder.
        format: ``parquet`` or ``npy``.
        dtype: the embeddings' dtype.
        shards: shards read.
        images: images with at least one exported row.
        rows: exported rows (valid representatives of live images).
        removed: stored images left out because the collection marks them removed.
        missing_paths: rows whose ``path`` is null.
        files: every file written, at its final place.
    """

    out: Path
    format: str
    dtype: str
    shards: int = 0
    images: int = 0
    rows: int = 0
    removed: int = 0
    missing_paths: int = 0
    files: list[Path] = field(default_factory=list)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    format: str = "parquet",
    dtype: str = "float16",
    progress: bool = True,
    force: bool = False,
) -> ExportResult:
    """Writes every valid representative of a run's live images to ``out``, shard by shard.

    Args:
        run_dir: the run folder (``embeddings/``; ``images.parquet`` for an unlabelled
            run, else ``config.yaml`` naming its dataset).
        out: the parquet file (``format="parquet"``) or folder (``format="npy"``).
        format: ``parquet`` or ``npy`` (see the module docstring for both layouts).
        dtype: ``float16`` (the store's own precision) or ``float32``.
        progress: show a progress bar (shards, with the rows written so far).
        force: replace an existing ``out`` (a file, or a folder holding an earlier npy
            export); never any other folder.

    Returns:
        The counts and the files written.

    Raises:
        ConfigError: unknown format or dtype, or ``out`` exists (without ``force``, or
            as something an export would not have written).
        MissingFileError: ``run_dir`` does not exist.
        StoreError: ``run_dir`` holds no embeddings, or its shards disagree.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run_dir = Path(run_dir)
    out = check_output(out, "OUT", "file" if format == "parquet" else "folder")
    store = open_run_store(run_dir)
    _check_out(out, format, force)
    live = RunFolder(run_dir).live_ids()
    paths = _path_source(run_dir)
    tmp = out.with_name(f".{out.name}.exporting")
    _remove(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out=out, format=format, dtype=dtype)
    shard_paths = store.shard_paths()
    writer: _Writer | None = None
    try:
        writer = _Writer(tmp, format, dtype, store, run_dir, paths.fields)
        with tqdm(
            total=len(shard_paths), desc="exporting", unit="shard", disable=not progress
        ) as bar:
            for number, path in enumerate(shard_paths):
                writer.shard(number, len(shard_paths), path, live, paths, result)
                result.shards += 1
                bar.set_postfix(rows=result.rows, refresh=False)
                bar.update()
        files = writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        _remove(tmp)
        raise
    if out.exists() or out.is_symlink():
        _remove(out)
    os.replace(tmp, out)
    result.files = [out / f.relative_to(tmp) if f != tmp else out for f in files]
    return result


def _is_export_folder(folder: Path) -> bool:
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= {EMBEDDINGS_DIR, METADATA_DIR}


def _check_out(out: Path, format: str, force: bool) -> None:
    """Refuses an existing ``out`` unless ``force``, and always one an export would not
    have written (a folder for parquet, a folder with other files for npy)."""
    if not out.exists() and not out.is_symlink():
        return
    if format == "parquet" and out.is_dir():
        raise ConfigError(f"{out} is a folder: a parquet export is one file, choose another OUT")
    if format == "npy" and not _is_export_folder(out):
        raise ConfigError(
            f"{out} exists and is not an npy export (only {EMBEDDINGS_DIR}/ and "
            f"{METADATA_DIR}/): choose another OUT"
        )
    if not force:
        raise ConfigError(f"{out} already exists: pass --force (force=True) to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class _Paths:
    """Image files by id (:class:`RunImages`, the run's one id -> file map) and, for a
    collection, its table's other columns."""

    def __init__(self, images: RunImages, columns: pa.Table | None = None) -> None:
        self.images = images
        self.columns = columns  # the collection's other columns, rows in id order

    @property
    def fields(self) -> list[pa.Field]:
        """The metadata columns an export carries after the hit fields."""
        return [] if self.columns is None else list(self.columns.schema)

    def lookup(self, image_ids: np.ndarray) -> tuple[pa.Array, list[pa.Array]]:
        """One path per id (null where unknown) and each metadata column's values."""
        files = self.images.files(image_ids)
        table = self.images.table
        if table is None or self.columns is None:
            return files, []
        rows = table.rows(image_ids)
        return files, [column.take(rows) for column in self.columns.columns]


def _path_source(run_dir: Path) -> _Paths:
    """Where the ``path`` column comes from (:class:`RunImages`: ``images.parquet`` when
    the run has one, else the run's labelled dataset; null paths, with one warning, when
    that cannot be opened), and a collection's metadata columns."""
    images = RunImages.open(run_dir)
    if images.table is None:
        return _Paths(images)
    table = read_table(RunFolder(run_dir).collection)
    shared = {"removed", *ROW_FIELDS}  # a name drop_columns sees twice drops another
    columns = table.drop_columns([c for c in table.column_names if c in shared])
    return _Paths(images, columns.take(pa.array(images.table.order)))


def _valid_mask(shard: ShardReader) -> np.ndarray:
    """A shard's ``mask [B, R]`` alone (no embeddings read)."""
    return shard.arrays(0, shard.num_images, ("mask",))["mask"].astype(bool)


class _Writer:
    """Streams rows into the temporary output (a parquet file, or an npy folder)."""

    def __init__(
        self,
        tmp: Path,
        format: str,
        dtype: str,
        store: ShardStore,
        run_dir: Path,
        extra_fields: list[pa.Field],
    ):
        self.tmp, self.format, self.dtype = tmp, format, dtype
        self.extra_fields = extra_fields
        self.np_dtype = np.dtype(DTYPES[dtype])
        self.arrow_dtype = pa.float16() if dtype == "float16" else pa.float32()
        fingerprint = store.read_manifest().get("fingerprint")
        self.metadata = {
            b"retrieval.run": str(run_dir.resolve()).encode(),
            b"retrieval.fingerprint": json.dumps(fingerprint, sort_keys=True).encode(),
        }
        self.dim: int | None = None
        self.parquet: pq.ParquetWriter | None = None
        self.files: list[Path] = []
        self.written = 0  # npy pairs written
        if format == "npy":
            (tmp / EMBEDDINGS_DIR).mkdir(parents=True)
            (tmp / METADATA_DIR).mkdir()

    def schema(self, with_embedding: bool) -> pa.Schema:
        """The hit fields an export row shares (:data:`retrieval.index.hits.ROW_FIELDS`),
        the embedding, then the collection's metadata columns."""
        fields = [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("path", pa.string()),
            pa.field("file_name", pa.string()),
            pa.field("rep_index", pa.int32(), nullable=False),
            pa.field("box", pa.list_(pa.float32(), 4)),
        ]
        assert tuple(f.name for f in fields) == ROW_FIELDS
        if with_embedding:
            assert self.dim is not None
            fields.append(pa.field("embedding", pa.list_(self.arrow_dtype, self.dim), False))
        return pa.schema(fields + self.extra_fields, metadata=self.metadata)

    def shard(
        self,
        number: int,
        count: int,
        path: Path,
        live: np.ndarray | None,
        paths: _Paths,
        result: ExportResult,
    ) -> None:
        """Exports one shard, ``READ_SLOTS`` padded slots at a time."""
        with ShardReader(path) as shard:
            dim = int(shard.arrays(0, 1, ("embeddings",))["embeddings"].shape[2])
            if self.dim is None:
                self.dim = dim
            elif dim != self.dim:
                raise StoreError(
                    f"{path} holds embeddings of size {dim}, earlier shards {self.dim}: a run "
                    f"folder holds one retriever's shards; re-embed it into a new folder"
                )
            keep = np.ones(shard.num_images, bool)
            if live is not None:
                keep = np.isin(shard.image_ids, live)
                result.removed += int((~keep).sum())
            npy = meta = None
            expected = 0
            if self.format == "npy":
                mask = _valid_mask(shard) & keep[:, None]
                expected = int(mask.sum())
                if not expected:
                    return
                npy, meta = self._open_pair(number, count, expected)
            rows_before = result.rows
            step = max(1, READ_SLOTS // max(shard.num_reps, 1))
            try:
                for start in range(0, shard.num_images, step):
                    stop = min(start + step, shard.num_images)
                    table = self._rows(shard, start, stop, keep[start:stop], paths, result)
                    if table is None:
                        continue
                    if npy is not None and meta is not None:
                        emb = table.column("embedding").combine_chunks().flatten().to_numpy()
                        npy.write(np.ascontiguousarray(emb).tobytes())
                        meta.write_table(table.drop_columns(["embedding"]))
                    else:
                        self._parquet().write_table(table)
                if npy is not None and result.rows - rows_before != expected:
                    raise StoreError(
                        f"{path}: its mask counts {expected} valid representatives but "
                        f"{result.rows - rows_before} were read; the shard is damaged"
                    )
            finally:
                if npy is not None:
                    npy.close()
                if meta is not None:
                    meta.close()

    def _rows(
        self,
        shard: ShardReader,
        start: int,
        stop: int,
        keep: np.ndarray,
        paths: _Paths,
        result: ExportResult,
    ) -> pa.Table | None:
        """The rows of images ``start:stop`` of a shard (None when there are none)."""
        reps = shard.arrays(start, stop, ("embeddings", "mask", "boxes"))
        mask = reps["mask"].astype(bool) & keep[:, None]
        image_pos, slots = mask.nonzero()
        if not len(slots):
            return None
        ids = shard.image_ids[start:stop].astype(np.int64)
        vectors = reps["embeddings"][image_pos, slots].astype(self.np_dtype)
        if "boxes" in reps:
            flat = pa.array(reps["boxes"][image_pos, slots].astype(np.float32).reshape(-1))
            boxes = pa.FixedSizeListArray.from_arrays(flat, 4)
        else:
            boxes = pa.nulls(len(slots), pa.list_(pa.float32(), 4))
        files, extra = paths.lookup(ids)
        rows = pa.array(image_pos)
        image_paths = files.take(rows)
        names = pc.replace_substring_regex(image_paths, pattern=r"^.*/", replacement="")
        assert self.dim is not None
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), self.arrow_dtype), self.dim
        )
        result.rows += len(slots)
        result.images += len(np.unique(image_pos))
        result.missing_paths += image_paths.null_count
        return pa.Table.from_arrays(
            [
                pa.array(ids[image_pos]),
                image_paths,
                names,
                pa.array(slots, pa.int32()),
                boxes,
                embedding,
                *(column.take(rows) for column in extra),
            ],
            schema=self.schema(with_embedding=True),
        )

    def _parquet(self) -> pq.ParquetWriter:
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.tmp, self.schema(with_embedding=True))
            self.files.append(self.tmp)
        return self.parquet

    def _open_pair(self, number: int, count: int, rows: int) -> tuple[Any, pq.ParquetWriter]:
        """Opens ``img_emb_K.npy`` (header for ``rows`` rows) and ``metadata_K.parquet``."""
        assert self.dim is not None
        key = str(self.written).zfill(len(str(max(count - 1, 0))))
        self.written += 1
        npy_path = self.tmp / EMBEDDINGS_DIR / f"img_emb_{key}.npy"
        meta_path = self.tmp / METADATA_DIR / f"metadata_{key}.parquet"
        npy = open(npy_path, "wb")  # noqa: SIM115 - closed by the caller
        header = {
            "descr": np.lib.format.dtype_to_descr(self.np_dtype),
            "fortran_order": False,
            "shape": (rows, self.dim),
        }
        np.lib.format.write_array_header_1_0(npy, header)
        self.files += [npy_path, meta_path]
        return npy, pq.ParquetWriter(meta_path, self.schema(with_embedding=False))

    def close(self) -> list[Path]:
        """Finishes the output; a parquet export with no rows is still a valid file."""
        if self.format == "parquet":
            if self.parquet is None and self.dim is None:
                self.dim = 0
            self._parquet().close()
        return self.files

    def abort(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
