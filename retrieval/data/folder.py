"""``folder``: every image under a folder, no labels, ids stable as the folder changes.

The folder is listed afresh each run (streamed with ``os.scandir``, symlinks followed
once), and the run's collection table (:mod:`retrieval.data.collection`) keeps each
unchanged file's id, so a rerun of ``retrieval embed`` embeds only new or modified files.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.data.base import ImageDataset, OnBadImage, Transform, register_dataset
from retrieval.data.collection import (
    NOT_UTF8,
    NOT_UTF8_REASON,
    Collection,
    Ticker,
    is_utf8,
    join_metadata,
    read_listing,
)
from retrieval.errors import DataError, MissingFileError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("retrieval")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


BATCH = 65_536
"""Paths held as Python strings at most: each folder's (or this many) become one Arrow
chunk, so a listing of millions holds its paths once, compactly."""


@dataclass
class Listing:
    """The image files under a root and what was left out, by reason. The files are held
    in chunks (Arrow paths, NumPy sizes and mtimes), each sorted by path."""

    chunks: list[tuple[pa.Array, np.ndarray, np.ndarray]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    count: int = 0
    not_utf8: list[str] = field(default_factory=list)  # entries left out for their name

    def add(self, paths: list[str], sizes: list[int], mtimes: list[int]) -> None:
        """Appends one batch of files (relative, '/'-separated paths)."""
        import pyarrow as pa

        if not paths:
            return
        order = sorted(range(len(paths)), key=paths.__getitem__)
        self.chunks.append(
            (
                pa.array([paths[k] for k in order], pa.string()),
                np.array(sizes, np.int64)[order],
                np.array(mtimes, np.int64)[order],
            )
        )
        self.count += len(paths)

    def summary(self) -> str:
        """``N images, M skipped (k hidden, j not images[, ...])``."""
        reasons = {"hidden": 0, "not images": 0, **dict(sorted(self.skipped.items()))}
        parts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        return f"{self.count} images, {sum(self.skipped.values())} skipped ({parts})"

    def table(self) -> pa.Table:
        """One row per file; in path order when no folder's files interleave with another's
        (the usual case, so the collection need not sort a copy)."""
        import pyarrow as pa

        chunks = sorted(self.chunks, key=lambda chunk: chunk[0][0].as_py())
        return pa.Table.from_arrays(
            [
                pa.chunked_array([c[0] for c in chunks], pa.string()),
                pa.chunked_array([pa.array(c[1]) for c in chunks], pa.int64()),
                pa.chunked_array([pa.array(c[2]) for c in chunks], pa.int64()),
            ],
            names=["path", "size_bytes", "mtime_ns"],
        )


def list_images(root: Path, progress: bool = True) -> Listing:
    """Every image file under ``root``, recursively, one ``os.scandir`` at a time.

    Extensions are matched case-insensitively; hidden entries (a leading ``.``) are
    skipped without descending, and so are names that are not UTF-8 (kept in
    :attr:`Listing.not_utf8`, for the run's list of what was left out); a symlinked
    folder is followed unless its real path was listed already (loops end, a folder
    reached twice is listed once). Holds the paths as Arrow chunks (one per folder, at
    most :data:`BATCH` long, each sorted), the Python objects of one chunk, and a stack
    of folders still to list.
    """
    listing = Listing()
    skipped = listing.skipped
    seen = {os.path.realpath(root)}
    stack = [(str(root), "")]
    ticker = Ticker(f"listing {root}", enabled=progress)
    batch: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            skipped["unreadable"] += 1
            continue
        with entries:
            for entry in entries:
                ticker.step()
                if entry.name.startswith("."):
                    skipped["hidden"] += 1
                    continue
                if not is_utf8(entry.name):  # the collection table holds UTF-8 text
                    skipped[NOT_UTF8] += 1
                    listing.not_utf8.append(entry.path)
                    continue
                try:
                    if entry.is_dir():
                        real = os.path.realpath(entry.path)
                        if real in seen:
                            skipped["symlinked folders listed already"] += 1
                        else:
                            seen.add(real)
                            stack.append((entry.path, f"{prefix}{entry.name}/"))
                    elif not entry.is_file():
                        skipped["broken links" if entry.is_symlink() else "not images"] += 1
                    elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                        skipped["not images"] += 1
                    else:
                        stat = entry.stat()
                        batch.append(prefix + entry.name)
                        sizes.append(stat.st_size)
                        mtimes.append(stat.st_mtime_ns)
                        if len(batch) >= BATCH:
                            listing.add(batch, sizes, mtimes)
                            batch, sizes, mtimes = [], [], []
                except OSError:  # vanished or unreadable between listing and stat
                    skipped["unreadable"] += 1
        listing.add(batch, sizes, mtimes)
        batch, sizes, mtimes = [], [], []
    ticker.close()
    return listing


@register_dataset("folder")
class FolderDataset(ImageDataset):
    """Every image under ``images`` as an unlabelled collection (``retrieval embed``,
    then index and search; there is nothing to score).

    Image ids come from the run's collection table ``<run_dir>/images.parquet``: an
    unchanged file keeps its id, new or modified files get new ones, vanished ones are
    marked removed; :attr:`image_ids` are the live ids. A file whose header cannot be read
    stays in: the embed phase reports it under ``on_bad_image``.

    Args:
        images: the folder, listed recursively (config ``data.images``; ``~`` expanded).
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``skip`` (the default for a collection: one corrupt file among
            thousands must not stop the embed) leaves an unreadable image out and lists
            it in the run folder's ``skipped.csv``; ``error`` stops at it (config
            ``data.on_bad_image``).
        metadata: an optional CSV or Parquet file with a ``path`` column (relative to
            ``images``); its other columns join the collection table.
        max_images: keep only the first N live ids (ascending), for quick runs.
        run_dir: the run folder holding the collection table (``run.output_dir``); None
            assigns ids in memory only.
        progress: show progress while listing or reading many files (``run.progress``).
    """

    CONFIG_OPTIONS = {"run_dir": "run.output_dir", "progress": "run.progress"}
    LABEL_ONLY_OPTIONS = ImageDataset.LABEL_ONLY_OPTIONS | {"metadata", "run_dir"}
    dataset_name = "folder"

    def __init__(
        self,
        images: str | Path,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "skip",
        metadata: str | None = None,
        max_images: int | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        root = Path(images).expanduser().absolute()
        super().__init__(root, transform, on_bad_image, max_images)
        # Paths come from listing this folder, never from a file the user wrote; the
        # symlinked folders it follows are the user's own choice (see list_images), so
        # no root confines them.
        self.image_roots = None
        if not root.is_dir():
            what = "not a folder" if root.exists() else "not found"
            raise MissingFileError(f"image folder {what}: {root}; set data.images to a folder")
        listing = list_images(root, progress)
        log.info("%s: %s", root, listing.summary())
        if not listing.count:
            raise DataError(
                f"no images under {root}: {listing.summary()}. data.images must be a folder "
                f"holding {', '.join(sorted(IMAGE_EXTENSIONS))} files (any case, searched "
                f"recursively; names starting with '.' are left out)"
            )
        self.failures_at_start: list[dict[str, Any]] = [
            {"image_id": None, "path": path, "reason": NOT_UTF8_REASON} for path in listing.not_utf8
        ]
        files = listing.table()
        del listing  # the paths are in the table now: hold one copy, not two
        if metadata is not None:
            files = join_metadata(files, read_listing(metadata, "data.metadata"), metadata)
        self.collection = Collection(files, root, run_dir, progress)
        self.image_ids: np.ndarray = self.collection.live_ids[:max_images]

    def image_path(self, image_id: int) -> Path:
        """The file of any id the collection table holds (removed ones too)."""
        return self.collection.image_path(image_id)
