"""``list``: the images a CSV or Parquet file names, no labels, extra columns as metadata.

For collections that are not one folder (a fleet's frames picked by a query, files spread
over disks). Ids are stable across runs exactly as for ``folder``: both go through the
run's collection table (:mod:`retrieval.data.collection`).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np

from retrieval.data.base import ImageDataset, OnBadImage, Transform, register_dataset
from retrieval.data.collection import Collection, Ticker, read_listing
from retrieval.data.images import (
    BAD_IMAGE_FIX,
    MISSING_LISTED,
    outside_root,
    outside_root_error,
)
from retrieval.errors import DataError, MissingFileError

log = logging.getLogger("retrieval")


@register_dataset("list")
class ListDataset(ImageDataset):
    """The files named by a list file's ``path`` column as an unlabelled collection.

    A listed file that is missing (or not a file), or, when ``images`` is given, whose
    path resolves outside it (absolute elsewhere, ``..``, a symlink out), stops the run
    under ``on_bad_image="error"``; under ``"skip"`` it is left out, logged and kept in
    :attr:`failures_at_start` with the reason. One whose pixels cannot be read is
    reported by the embed phase under the same policy.

    Args:
        list: the CSV or Parquet file (config ``data.list``); its ``path`` column holds
            absolute paths or paths relative to ``images``; every other column is kept
            as metadata in the collection table.
        images: the folder relative paths start from (config ``data.images``); default:
            the list file's folder.
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``skip`` (the default for a collection) or ``error`` (config
            ``data.on_bad_image``); skipped files are listed in the run's ``skipped.csv``.
        max_images: keep only the first N live ids (ascending), for quick runs.
        run_dir: the run folder holding the collection table (``run.output_dir``); None
            assigns ids in memory only.
        progress: show progress while checking or reading many files (``run.progress``).
    """

    CONFIG_OPTIONS = {"run_dir": "run.output_dir", "progress": "run.progress"}
    LABEL_ONLY_OPTIONS = ImageDataset.LABEL_ONLY_OPTIONS | {"run_dir"}
    dataset_name = "list"

    def __init__(
        self,
        list: str,  # shadows the builtin: the config key is data.list
        images: str | None = None,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "skip",
        max_images: int | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        list_file = Path(list).expanduser().absolute()
        root = Path(images).expanduser().absolute() if images else list_file.parent
        super().__init__(root, transform, on_bad_image, max_images)
        if images and not root.is_dir():
            what = "not a folder" if root.exists() else "not found"
            raise MissingFileError(
                f"image folder {what}: {root}; set data.images to the folder the relative "
                f"paths of {list_file} start from, or leave it unset (the list's folder)"
            )
        # With data.images given every listed path must stay inside it; without, the
        # list may name files anywhere (absolute paths are its point).
        self.image_roots = (root.resolve(),) if images else None
        listed = read_listing(list_file, "data.list")
        paths = listed.column("path").to_pylist()
        present, sizes, mtimes = _stat_files(paths, root, progress)
        roots = self.image_roots
        reasons = [None if roots is None else outside_root(root / p, roots) for p in paths]
        present &= np.array([r is None for r in reasons], dtype=bool)
        self.failures_at_start = [
            {"image_id": None, "path": str(root / p), "reason": reason or "file not found"}
            for p, ok, reason in zip(paths, present, reasons, strict=True)
            if not ok
        ]
        del paths, reasons  # one Python string per row: freed before the ids are assigned
        if self.failures_at_start:
            escaped = outside_root_error(self.failures_at_start, list_file)
            if escaped is not None and on_bad_image == "error":
                raise escaped
            self._report_missing(list_file, listed.num_rows, on_bad_image)
        files = listed.filter(present)
        files = files.add_column(1, "size_bytes", [sizes[present]])
        files = files.add_column(2, "mtime_ns", [mtimes[present]])
        if not files.num_rows:
            raise DataError(
                f"{list_file} names no image that exists ({listed.num_rows} rows, "
                f"{len(self.failures_at_start)} missing); its 'path' column must name image "
                f"files, absolute or relative to {root}"
            )
        log.info(
            "%s: %d images, %d missing", list_file, files.num_rows, len(self.failures_at_start)
        )
        self.collection = Collection(files, root, run_dir, progress)
        self.image_ids: np.ndarray = self.collection.live_ids[:max_images]

    def _report_missing(self, list_file: Path, total: int, on_bad_image: str) -> None:
        failures = self.failures_at_start
        shown = [
            f"  {f['path']}" + ("" if f["reason"] == "file not found" else f": {f['reason']}")
            for f in failures[:MISSING_LISTED]
        ]
        more = len(failures) - len(shown)
        message = "\n".join(
            [
                f"{len(failures)} of {total} files listed in {list_file} are missing, not "
                "files, or outside data.images:",
                *shown,
                *([f"  ... and {more} more"] if more else []),
            ]
        )
        if on_bad_image == "error":
            raise MissingFileError(
                f"{message}\nCheck data.images (where relative paths start), or: {BAD_IMAGE_FIX}."
            )
        log.warning("%s\nLeft out (data.on_bad_image=skip).", message)

    def image_path(self, image_id: int) -> Path:
        """The file of any id the collection table holds (removed ones too)."""
        return self.collection.image_path(image_id)


def _stat_files(
    paths: list[str], root: Path, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(present, size_bytes, mtime_ns)`` per listed path (symlinks followed)."""
    n = len(paths)
    present, sizes, mtimes = np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64)
    ticker = Ticker("checking listed files", n, progress)
    for k, path in enumerate(paths):
        try:
            info = os.stat(root / path)
        except OSError:
            info = None
        if info is not None and stat.S_ISREG(info.st_mode):
            present[k], sizes[k], mtimes[k] = True, info.st_size, info.st_mtime_ns
        ticker.step()
    ticker.close()
    return present, sizes, mtimes
