"""The collection table of an unlabelled run: which file each image id is, and which ids
are still in the collection.

An unlabelled run (a folder, a list file, tar shards) keeps ``<run>/images.parquet``
(its dataset computes it, the embed phase writes it), one row per image id it ever
assigned, sorted by id:

===============  ========  =============================================================
column           type      meaning
===============  ========  =============================================================
``image_id``     int64     the id the run's shards and indexes use
``path``         string    the file, relative to the images root (absolute when a list
                           file names one outside it)
``size_bytes``   int64     file size when the id was assigned
``mtime_ns``     int64     file modification time (ns) when the id was assigned
``width``        int32     pixels as the embed phase sees them (EXIF orientation
                           applied); null when the header cannot be read
``height``       int32     likewise
``removed``      bool      the file vanished or changed since: the id is no longer live
(metadata)       any       every other column of the metadata or list file, by path
===============  ========  =============================================================

The images root (absolute) is kept in the Parquet schema metadata under ``root``, so the
search side resolves any id to its file from the table alone, without rescanning
(:class:`retrieval.store.run_folder.ImageFiles`, the one id -> file map).

Ids are stable: an unchanged file (same path, size and mtime) keeps its id across runs; a
new or modified file gets a new id (the largest id ever assigned + 1, ..., in path
order), and the id of a deleted or modified file is marked ``removed``, so shards never
need rewriting and an index can be updated by ids alone. :func:`assign_ids` is the one
implementation every unlabelled dataset shares; it depends only on the previous table
and the listing, so every DDP rank computes the same table; only the embed phase's
:meth:`Collection.sync` writes it (rank 0, under the run lock).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.errors import DataError, MissingFileError, StoreError
from retrieval.store.atomic import write_atomic
from retrieval.store.run_folder import COLLECTION_FILE, ROOT_KEY, ImageFiles, RunFolder
from retrieval.store.run_folder import column_numpy as column_numpy
from retrieval.store.run_folder import read_table as _read_table

if TYPE_CHECKING:
    import pyarrow as pa
    from rich.progress import Progress

log = logging.getLogger("retrieval")

FIXED_COLUMNS = ("image_id", "path", "size_bytes", "mtime_ns", "width", "height", "removed")
PROGRESS_AFTER = 10_000
"""Listings and header reads show a progress bar only past this many items."""
SAMPLE = 3
"""How many example paths an error message shows."""
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 rotate the image by 90 degrees


def collection_path(run_dir: str | Path) -> Path:
    """Where a run keeps its collection table."""
    return RunFolder(Path(run_dir)).collection


def live_image_ids(run_dir: str | Path) -> np.ndarray | None:
    """The ids still in the run's collection (ascending), or None for a run without a
    collection table (:meth:`RunFolder.live_ids`)."""
    return RunFolder(Path(run_dir)).live_ids()


# progress -----------------------------------------------------------------------------
class Ticker:
    """A count of items done, drawn as a progress bar only once it passes
    :data:`PROGRESS_AFTER` (small folders stay silent; large ones show they are alive)."""

    def __init__(self, description: str, total: int | None = None, enabled: bool = True):
        self.description = description
        self.total = total
        self.enabled = enabled and (total is None or total > PROGRESS_AFTER)
        self.count = 0
        self._bar: Progress | None = None
        self._task: Any = None

    def step(self) -> None:
        self.count += 1
        if not self.enabled or self.count % 1000 or self.count < PROGRESS_AFTER:
            return
        if self._bar is None:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        self._bar.update(self._task, completed=self.count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# listings: the list file of `list`, the metadata file of `folder` ------------------------
def normalise_path(path: str) -> str:
    """One spelling per file (``./a//b.jpg`` -> ``a/b.jpg``), so lookups and duplicate
    checks compare files, not strings."""
    return posixpath.normpath(path)


NOT_UTF8 = "names not UTF-8"
NOT_UTF8_REASON = "its name is not valid UTF-8 (the collection table stores text): rename it"


def is_utf8(name: str) -> bool:
    """Whether a name from the file system or a tar header (undecodable bytes held as
    surrogates) is UTF-8, as the collection table's ``path`` column must be."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_listing(path: str | Path, key: str) -> pa.Table:
    """A CSV or Parquet file keyed by a ``path`` column (normalised), other columns kept.

    Args:
        path: the file.
        key: the config key that names it (``data.list``), for messages.

    Raises:
        MissingFileError: no such file.
        DataError: not CSV/Parquet, unreadable, no ``path`` column, empty or duplicate
            paths, or a column named like one of the table's own.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"{key}={path} not found: pass a CSV or Parquet file of paths")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            from pyarrow import csv

            table = csv.read_csv(
                path,
                parse_options=csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                convert_options=csv.ConvertOptions(column_types={"path": pa.string()}),
            )
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            raise DataError(
                f"{key}={path}: unknown format {suffix!r}; give a .csv, .tsv or .parquet file"
            )
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{key}={path} cannot be read as {suffix[1:]}: {err}") from None
    try:
        names = table.column_names
    except UnicodeDecodeError:  # pyarrow reads a header's bytes as they are
        raise DataError(f"{key}={path}: its header is not UTF-8 text; save it as UTF-8") from None
    repeated_columns = sorted({c for c in names if names.count(c) > 1})
    if repeated_columns:
        raise DataError(
            f"{key}={path}: column(s) {', '.join(map(repr, repeated_columns))} appear more "
            f"than once in the header; give each column its own name"
        )
    if "path" not in table.column_names:
        raise DataError(
            f"{key}={path} has no 'path' column (columns: {', '.join(table.column_names)}); "
            f"name the column of image paths 'path'"
        )
    clash = sorted(set(table.column_names) & set(FIXED_COLUMNS) - {"path"})
    if clash:
        raise DataError(
            f"{key}={path}: column(s) {', '.join(clash)} clash with the collection table's "
            f"own (image_id, size_bytes, mtime_ns, width, height, removed); rename them"
        )
    try:
        paths = table.column("path").cast(pa.string())
    except pa.ArrowException as err:  # e.g. a binary column that is not UTF-8
        raise DataError(f"{key}={path}: its 'path' column is not text: {err}") from None
    empty = pc.or_kleene(pc.is_null(paths), pc.equal(paths, "")).to_numpy(zero_copy_only=False)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(
            f"{key}={path}: {int(empty.sum())} row(s) have an empty path (first: row {row + 1})"
        )
    normal = pa.array([normalise_path(p) for p in paths.to_pylist()], pa.string())
    counts = pc.value_counts(normal)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        shown = ", ".join(repeated[:SAMPLE].to_pylist())
        raise DataError(
            f"{key}={path}: {len(repeated)} path(s) appear more than once ({shown}"
            f"{', ...' if len(repeated) > SAMPLE else ''}); give each file one row"
        )
    return table.set_column(table.column_names.index("path"), "path", normal)


def join_metadata(files: pa.Table, metadata: pa.Table, source: str | Path) -> pa.Table:
    """``files`` with ``metadata``'s columns joined by ``path`` (null where it has no row).
    Rows that name no listed file are counted and the first :data:`SAMPLE` named in a
    warning (a typo'd or absolute path is otherwise silently lost).

    Raises:
        DataError: no path of ``metadata`` names a listed file (a sample of each side).
    """
    import pyarrow.compute as pc

    rows = pc.index_in(files.column("path"), value_set=metadata.column("path"))
    if rows.null_count == len(rows):
        theirs = metadata.column("path")[:SAMPLE].to_pylist()
        ours = files.column("path")[:SAMPLE].to_pylist()
        raise DataError(
            f"metadata file {source}: none of its {metadata.num_rows} paths names an image "
            f"(its paths: {theirs}; images found: {ours}); its 'path' column must hold "
            f"paths relative to data.images"
        )
    unmatched = pc.invert(pc.is_in(metadata.column("path"), value_set=files.column("path")))
    if (count := pc.sum(unmatched).as_py() or 0) > 0:
        shown = metadata.column("path").filter(unmatched)[:SAMPLE].to_pylist()
        log.warning(
            "metadata file %s: %d of its %d rows name no image found (%s%s), so their "
            "columns are not used; its 'path' column holds paths relative to data.images",
            source, count, metadata.num_rows, ", ".join(shown), ", ..." if count > SAMPLE else "",
        )  # fmt: skip
    extra = metadata.drop_columns(["path"]).take(rows)
    for name in extra.column_names:
        files = files.append_column(name, extra.column(name))
    return files


# ids ----------------------------------------------------------------------------------
SizeReader = Callable[[str], tuple[int, int] | None]
"""A table ``path`` -> ``(width, height)`` from the image's header, or None (for images
that are not files under the root, such as tar shard members)."""


def image_size(path: str | Path | IO[bytes]) -> tuple[int, int] | None:
    """``(width, height)`` from the header as :func:`load_image` would orient it, without
    decoding; None when the header cannot be read (the embed phase then reports it).
    ``path`` may also be an open binary file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            return width, height
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for a bad header
        return None


def assign_ids(
    previous: pa.Table | None,
    files: pa.Table,
    root: Path,
    progress: bool,
    read_size: SizeReader | None = None,
) -> pa.Table:
    """The new collection table: ``files`` (``path``, ``size_bytes``, ``mtime_ns`` and
    metadata, one row per path) with ids kept for unchanged files and new ids, in path
    order, for the rest; ``previous`` rows not kept stay, marked ``removed``. New rows'
    width and height come from ``read_size(path)`` (default: the header of
    ``root / path``), called in path order.

    Deterministic in its inputs, so every DDP rank computes the same table.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    files = _sorted_by_path(files)
    if previous is not None and _unchanged(previous, files, root):
        return previous  # a rerun over the same files: the table as it is, no copy
    n = files.num_rows
    sizes = files.column("size_bytes").to_numpy()
    mtimes = files.column("mtime_ns").to_numpy()
    if previous is None:
        previous = empty_collection()
    removed = previous.column("removed").to_numpy(zero_copy_only=False).astype(bool)
    live = previous.filter(pa.array(~removed)) if removed.any() else previous
    row = pc.index_in(files.column("path"), value_set=live.column("path"))
    row_np = row.fill_null(-1).to_numpy()
    del row
    found = row_np >= 0
    kept = found.copy()  # same path, size and mtime as a live row
    kept[found] = (live.column("size_bytes").to_numpy()[row_np[found]] == sizes[found]) & (
        live.column("mtime_ns").to_numpy()[row_np[found]] == mtimes[found]
    )
    ids = np.empty(n, np.int64)
    ids[kept] = live.column("image_id").to_numpy()[row_np[kept]]
    first = int(previous.column("image_id").to_numpy().max()) + 1 if previous.num_rows else 0
    ids[~kept] = first + np.arange(int((~kept).sum()))

    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    known = np.zeros(n, bool)
    if kept.any():
        take = pa.array(row_np, mask=~kept)
        for name, out in (("width", width), ("height", height)):
            old = live.column(name).take(take)
            out[kept] = old.fill_null(0).to_numpy()[kept]
            known[kept] = pc.is_valid(old).to_numpy(zero_copy_only=False)[kept]
        del take, old
    del live, row_np, found
    # A zero-byte file has no header to read (and PIL would try every format on it): its
    # size stays null and the embed phase reports it under data.on_bad_image.
    new_rows = np.flatnonzero(~kept & (sizes != 0))
    ticker = Ticker("reading image sizes", len(new_rows), progress)
    paths = files.column("path")
    for k in new_rows.tolist():
        path = paths[k].as_py()
        size = read_size(path) if read_size is not None else image_size(root / path)
        if size is not None:
            width[k], height[k], known[k] = size[0], size[1], True
        ticker.step()
    ticker.close()

    current = pa.table(
        {
            "image_id": ids,
            "path": paths,
            "size_bytes": files.column("size_bytes"),
            "mtime_ns": files.column("mtime_ns"),
            "width": pa.array(width, mask=~known),
            "height": pa.array(height, mask=~known),
            "removed": np.zeros(n, bool),
            **{c: files.column(c) for c in files.column_names if c not in FIXED_COLUMNS},
        }
    )
    if kept.all() and not removed.any() and n == previous.num_rows:
        table = current  # nothing vanished: no row of the previous table to carry over
        order = ids
    else:
        gone = previous.filter(
            pc.invert(pc.is_in(previous.column("image_id"), pa.array(ids[kept])))
        )
        gone = gone.set_column(
            FIXED_COLUMNS.index("removed"), "removed", pa.array(np.ones(gone.num_rows, bool))
        )
        table = pa.concat_tables([_conform(gone, current.schema), current])
        order = np.concatenate([gone.column("image_id").to_numpy(), ids])
    if len(order) > 1 and not bool(np.all(order[1:] > order[:-1])):
        table = table.sort_by("image_id")  # only when some id is out of order
    return table.replace_schema_metadata({ROOT_KEY: str(root).encode()})


def _sorted_by_path(files: pa.Table) -> pa.Table:
    """``files`` in path order; as it is when already sorted (no copy)."""
    import pyarrow.compute as pc

    paths = files.column("path")
    if len(paths) > 1 and pc.all(pc.less(paths[:-1], paths[1:])).as_py():
        return files
    return files.sort_by("path")


def _unchanged(previous: pa.Table, files: pa.Table, root: Path) -> bool:
    """Whether :func:`assign_ids` would return ``previous`` itself: the same root and
    columns, and ``files`` (in path order) equal to its live rows in every listed column,
    so every id is kept, no header is read and nothing is marked removed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fixed = empty_collection().schema
    extra = [f for f in files.schema if f.name not in FIXED_COLUMNS]
    expected = pa.schema(
        [
            fixed.field("image_id"),
            pa.field("path", files.schema.field("path").type),
            pa.field("size_bytes", files.schema.field("size_bytes").type),
            pa.field("mtime_ns", files.schema.field("mtime_ns").type),
            fixed.field("width"),
            fixed.field("height"),
            fixed.field("removed"),
            *[pa.field(f.name, f.type) for f in extra],
        ],
        metadata={ROOT_KEY: str(root).encode()},
    )
    if not previous.schema.equals(expected, check_metadata=True):
        return False
    removed = previous.column("removed")
    live_count = previous.num_rows - int(pc.sum(removed).as_py() or 0)
    if live_count != files.num_rows or removed.null_count:
        return False
    ids = previous.column("image_id").to_numpy()
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        return False  # not in id order: let the full path rebuild it
    live = previous.filter(pc.invert(removed)) if live_count < previous.num_rows else previous
    live = live.select(files.column_names)
    live = _sorted_by_path(live)
    return bool(live.equals(files.select(files.column_names)))


def _conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """Old rows in the new schema: a metadata column of the same name and type keeps its
    values, any other becomes null (columns the metadata no longer has are dropped)."""
    import pyarrow as pa

    columns = [
        rows.column(f.name)
        if f.name in rows.column_names and rows.schema.field(f.name).type == f.type
        else pa.nulls(rows.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def empty_collection() -> pa.Table:
    """A table with the collection columns and no rows."""
    import pyarrow as pa

    types = [pa.int64(), pa.string(), pa.int64(), pa.int64(), pa.int32(), pa.int32(), pa.bool_()]
    fields = [pa.field(n, t) for n, t in zip(FIXED_COLUMNS, types, strict=True)]
    return pa.schema(fields).empty_table()


def read_collection(run_dir: str | Path) -> pa.Table | None:
    """The run's collection table in the current column types, or None when it has none.

    Raises:
        StoreError: the table is unreadable or lacks a collection column.
    """
    path = collection_path(run_dir)
    if not path.exists():
        return None
    table = _read_table(path)
    missing = [c for c in FIXED_COLUMNS if c not in table.column_names]
    if missing:
        raise StoreError(
            f"{path} lacks column(s) {', '.join(missing)}: it is not a collection table; "
            f"restore it from a backup or embed the collection into a new run.output_dir"
        )
    fixed = empty_collection().schema
    for name in FIXED_COLUMNS:
        k = table.column_names.index(name)
        table = table.set_column(k, fixed.field(name), table.column(k).cast(fixed.field(name).type))
    return table


def write_collection(run_dir: str | Path, table: pa.Table) -> None:
    """Writes the table whole or not at all (:func:`write_atomic`: several DDP ranks may
    write the same content at once, and a reader never sees half a file)."""
    import pyarrow.parquet as pq

    path = collection_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


class Collection:
    """An unlabelled dataset's images by id: the ids :func:`assign_ids` gives ``files``
    from ``<run_dir>/images.parquet`` as it stands. Building it only reads; the embed
    phase records the table with :meth:`sync` (global rank 0, under the run lock), so a
    dataset built to look (a sweep's estimate, the search side) never writes, and every
    rank of a distributed run reads the table rank 0 wrote.

    Args:
        files: ``path`` (relative to ``root``, or absolute), ``size_bytes``, ``mtime_ns``
            and any metadata columns, one row per file.
        root: the images root (absolute).
        run_dir: the run folder; None keeps the table in memory only (a notebook).
        progress: show a progress bar while reading many image headers.
        read_size: reads a new path's width and height (see :func:`assign_ids`).
    """

    def __init__(
        self,
        files: pa.Table,
        root: Path,
        run_dir: str | Path | None,
        progress: bool = True,
        read_size: SizeReader | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._stored = read_collection(run_dir) if run_dir is not None else None
        self.root = root
        self.table = assign_ids(self._stored, files, root, progress, read_size)
        self._ids = self.table.column("image_id").to_numpy()
        removed = self.table.column("removed").to_numpy(zero_copy_only=False).astype(bool)
        self.live_ids: np.ndarray = self._ids[~removed].astype(np.int64)

    @property
    def changed(self) -> bool:
        """Whether :meth:`sync` has a table to write (none stored, or a different one)."""
        if self.run_dir is None:
            return False
        stored = self._stored
        return stored is None or (
            self.table is not stored and not stored.equals(self.table, check_metadata=True)
        )

    def sync(self) -> bool:
        """Writes the table into the run folder when it differs from the stored one (the
        embed phase's step, on global rank 0 under the run lock, before any image is
        embedded); whether it wrote.

        Raises:
            StoreError: the run holds embeddings but no table, so their ids name no files.
        """
        if not self.changed:
            return False
        assert self.run_dir is not None  # changed is False without a run folder
        if self._stored is None:
            _refuse_shards_without_table(self.run_dir)
        write_collection(self.run_dir, self.table)
        self._stored = self.table
        return True

    def image_path(self, image_id: int) -> Path:
        """The file of any id in the table, live or removed.

        Raises:
            KeyError: the table never assigned ``image_id``.
        """
        return self.files.path(image_id)

    @cached_property
    def files(self) -> ImageFiles:
        """The table's id -> file map (the one every reader of a run uses)."""
        return ImageFiles.of_table(self.table)


def _refuse_shards_without_table(run_dir: Path) -> None:
    if RunFolder(run_dir).store().shard_paths():
        raise StoreError(
            f"{run_dir} holds embeddings but no {COLLECTION_FILE}, so their image ids name no "
            f"files; restore {collection_path(run_dir)} from a backup, or embed into a new "
            f"run.output_dir"
        )
