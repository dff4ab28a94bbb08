"""Cluster-CLIP from stored Dense-CLIP shards: sweep aggregations without the backbone.

The backbone pass is the expensive part of a Cluster-CLIP run and the same for every
aggregation; a ``dense_clip`` run's shards already hold its output. With
``store.dense_from=<that run>``, a ``cluster_clip`` run reads them, aggregates on the
scoring device and writes its own shards (same names, so resume works as for embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track

from retrieval.config import ConfigError
from retrieval.representatives import Representatives
from retrieval.retrievers.base import DenseSource
from retrieval.store import ShardStore
from retrieval.store.scoring import resolve_device
from retrieval.store.shards import ShardReader


def dense_source(path: str | Path) -> tuple[ShardStore, dict[str, Any]]:
    """The Dense-CLIP store at ``path`` (a run folder or its ``embeddings/``) and its
    retriever description.

    Raises:
        ConfigError: no shards there, or they were not made by ``dense_clip``.
    """
    root = Path(path)
    if (root / "embeddings").is_dir():
        root = root / "embeddings"
    store = ShardStore(root)
    fingerprint = store.read_manifest().get("fingerprint") or {}
    retriever = fingerprint.get("retriever") or {}
    if not store.shard_paths() or retriever.get("name") != "dense_clip":
        raise ConfigError(
            f"store.dense_from={path}: no dense_clip embeddings there (found "
            f"{retriever.get('name') or 'no shards'}). Run a dense_clip evaluation with "
            f"the same backbone/resolution first and point store.dense_from at its folder."
        )
    return store, retriever


def deriver(
    retriever: Any, dense_config: dict[str, Any]
) -> Callable[[Representatives], Representatives]:
    """How ``retriever``'s representatives come from stored Dense-CLIP ones (its own
    :class:`~retrieval.retrievers.base.DenseSource` hooks: Cluster-CLIP re-aggregates,
    Dense-CLIP takes the cells, CLIP at its native size the global embedding).

    Raises:
        ConfigError: the retriever cannot be derived from them, or their settings differ
            (each difference named).
    """
    if not isinstance(retriever, DenseSource):
        raise ConfigError(
            "store.dense_from needs a retriever that can take stored Dense-CLIP features "
            "(clip, dense_clip, cluster_clip)"
        )
    try:
        retriever.check_dense_source(dense_config)
    except ValueError as err:
        raise ConfigError(f"store.dense_from: {err}") from None
    return lambda stored: retriever.from_dense(stored, dense_config)


def reaggregate(
    source: ShardStore,
    dense_config: dict[str, Any],
    store: ShardStore,
    retriever: Any,
    todo: np.ndarray,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> int:
    """Aggregates the ``todo`` images' stored dense embeddings into ``store``.

    Returns:
        The number of images written.

    Raises:
        ConfigError: the retriever cannot aggregate, the dense features were made with
            other settings, or images are missing from the source.
    """
    derive = deriver(retriever, dense_config)
    missing = np.setdiff1d(todo, source.accounted_ids())
    if len(missing):
        raise ConfigError(
            f"store.dense_from={source.root} lacks {len(missing)} of the dataset's images "
            f"(e.g. {missing[:5].tolist()}): complete that dense_clip run first"
        )
    dev = resolve_device(device)
    wanted = set(todo.tolist())
    written = 0
    for path in track(source.shard_paths(), description="re-aggregating", disable=not progress):
        with ShardReader(path) as shard:
            rows = np.isin(shard.image_ids, todo)
            failures = [f for f in shard.failures if f["image_id"] in wanted]
            if not rows.any() and not failures:
                continue
            parts = []
            for i in range(0, shard.num_images, batch_size):
                keep = torch.from_numpy(rows[i : i + batch_size])
                if keep.any():
                    stored = shard.rows(i, i + batch_size).select(keep).to(dev, torch.float32)
                    parts.append(derive(stored).to("cpu"))
            ids = torch.from_numpy(shard.image_ids[rows])
            reps = Representatives.concat(parts) if parts else Representatives.empty()
            store.write_shard(f"dense-{path.stem}", ids, reps, failures)
            written += len(ids)
    return written
