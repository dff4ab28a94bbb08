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
from retrieval.errors import differences
from retrieval.representatives import Representatives
from retrieval.retrievers.clip import ClipRetriever
from retrieval.retrievers.cluster_clip import DENSE_FEATURE_KEYS
from retrieval.retrievers.dense_clip import DenseClipRetriever
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


def cells_alone(stored: Representatives, dense_config: dict[str, Any]) -> Representatives:
    """A ``dense_clip`` run's stored representatives without the global embedding its
    source appended (the cells, bit for bit: nothing is recomputed)."""
    if not dense_config.get("with_global"):
        return stored
    cells = stored.embeddings.shape[1] - 1
    boxes = None if stored.boxes is None else stored.boxes[:, :cells]
    return Representatives(stored.embeddings[:, :cells], stored.mask[:, :cells], boxes)


GLOBAL_SOURCE_KEYS = ("model", "pretrained", "weights_sha256")


def global_alone(stored: Representatives) -> Representatives:
    """The global embedding a CLIP + Dense-CLIP run stored after its cells (whole-image
    box): the ``clip`` retriever's own embedding when that run's ``global_pass`` is
    ``native`` (the same model on the same resize + centre-crop view)."""
    boxes = None if stored.boxes is None else stored.boxes[:, -1:]
    return Representatives(stored.embeddings[:, -1:], stored.mask[:, -1:], boxes)


def deriver(
    retriever: Any, dense_config: dict[str, Any]
) -> Callable[[Representatives], Representatives]:
    """How ``retriever``'s representatives come from stored Dense-CLIP ones: Cluster-CLIP
    re-aggregates them; Dense-CLIP takes the cells (when the source kept the global
    embedding and this run does not).

    Raises:
        ConfigError: the retriever cannot be derived from them, or their feature settings
            differ (each difference named).
    """
    if hasattr(retriever, "from_dense"):  # Cluster-CLIP, or a plugin that aggregates
        try:
            retriever.check_dense_source(dense_config)
        except ValueError as err:
            raise ConfigError(f"store.dense_from: {err}") from None
        return lambda stored: retriever.from_dense(stored, dense_config)
    if isinstance(retriever, DenseClipRetriever) and not retriever.with_global:
        keys = DENSE_FEATURE_KEYS
        diff = differences(
            {k: dense_config.get(k) for k in keys}, {k: retriever.config.get(k) for k in keys}
        )
        if diff:
            raise ConfigError(
                "store.dense_from: the stored Dense-CLIP embeddings were made with other "
                "settings: " + "; ".join(diff)
            )
        return lambda stored: cells_alone(stored, dense_config)
    if isinstance(retriever, ClipRetriever) and retriever.config.get("resolution") is None:
        source = {k: dense_config.get(k) for k in GLOBAL_SOURCE_KEYS}
        diff = differences(source, {k: retriever.config.get(k) for k in GLOBAL_SOURCE_KEYS})
        if not (dense_config.get("with_global") and dense_config.get("global_pass") == "native"):
            diff.append("the Dense-CLIP run kept no native-size global embedding")
        if diff:
            raise ConfigError(
                "store.dense_from: a clip run takes the global embedding of a dense_clip "
                "run with with_global=true, global_pass=native and the same model: "
                + "; ".join(diff)
            )
        return global_alone
    raise ConfigError(
        "store.dense_from needs a retriever that aggregates Dense-CLIP features "
        "(retriever.name=cluster_clip), a dense_clip run without with_global, or a clip "
        "run at its native size (from a dense_clip run with global_pass=native)"
    )


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
