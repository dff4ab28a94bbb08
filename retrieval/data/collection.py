"""The collection table of an unlabelled run: which file each image id is, and which ids
are still in the collection.

An unlabelled dataset (a folder, a list file, tar shards) writes ``<run>/images.parquet``,
one row per image id it ever assigned: ``image_id``, ``path`` (relative to the images
root), ``size_bytes``, ``mtime_ns``, ``width``, ``height``, ``removed`` and any metadata
columns. Ids are stable: an unchanged file keeps its id across runs; a new or modified
file gets a new id, and the id of a deleted or modified file is marked ``removed``, so
shards never need rewriting and an index can be updated by ids alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.errors import StoreError

COLLECTION_FILE = "images.parquet"


def collection_path(run_dir: str | Path) -> Path:
    """Where a run keeps its collection table."""
    return Path(run_dir) / COLLECTION_FILE


def live_image_ids(run_dir: str | Path) -> np.ndarray | None:
    """The ids still in the run's collection (ascending), or None for a run without a
    collection table (a labelled run: every stored image is live).

    Raises:
        StoreError: the table exists but cannot be read.
    """
    path = collection_path(run_dir)
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["image_id", "removed"])
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise StoreError(
            f"{path} cannot be read ({err}); its ids name the run's stored embeddings, so "
            f"restore the file from a backup or embed the collection into a new run.output_dir"
        ) from None
    ids = table.column("image_id").to_numpy()
    removed = table.column("removed").to_numpy(zero_copy_only=False).astype(bool)
    return np.sort(ids[~removed]).astype(np.int64)
