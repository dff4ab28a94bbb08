"""Exact scoring: every query against every stored representative, max per image.

No approximation enters a reported metric: scores are computed with chunked matrix
products over the shards, each chunk sized so the ``[Q, images, R]`` similarity block
stays inside a memory budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrieval.errors import StoreError
from retrieval.representatives import Representatives
from retrieval.store.shards import ShardReader, ShardStore

ScoreFn = Callable[[Tensor, Representatives], Tensor]


@dataclass
class ScoreResult:
    """Scores of every stored image, sorted by image id, and what the store held."""

    scores: np.ndarray  # [Q, N] float32
    image_ids: np.ndarray  # [N] int64, ascending
    reps_per_image: np.ndarray  # [N] valid representatives per image
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes_stored: int = 0
    seconds: float = 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.bytes_stored / max(len(self.image_ids), 1)


def images_per_chunk(queries: int, reps: int, max_memory_gb: float) -> int:
    """Images whose ``[Q, images, R]`` fp32 similarities fit the budget (at least 1)."""
    per_image = max(queries * max(reps, 1) * 4 * 2, 1)  # similarities + masked copy
    return max(int(max_memory_gb * 1024**3 // per_image), 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def score_store(
    store: ShardStore,
    text: Tensor,
    score_fn: ScoreFn,
    device: str = "auto",
    max_memory_gb: float = 2.0,
    only: np.ndarray | None = None,
) -> ScoreResult:
    """Scores all shards of ``store`` against ``text [Q, D]`` with ``score_fn``.

    Args:
        store: the run's shards.
        text: query embeddings.
        score_fn: a retriever's ``score`` (default rule: max cosine over valid reps).
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda[:i]``.
        max_memory_gb: budget for one chunk's similarity block.
        only: score just these image ids (the dataset's current images); None: all.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    text = text.to(dev, torch.float32)
    scores, ids, counts, nbytes = [], [], [], 0
    for path in store.shard_paths():
        nbytes += path.stat().st_size
        with ShardReader(path) as shard:
            keep = (
                np.ones(shard.num_images, bool) if only is None else np.isin(shard.image_ids, only)
            )
            step = images_per_chunk(len(text), shard.num_reps, max_memory_gb)
            for i in range(0, shard.num_images, step):
                rows = keep[i : i + step]
                if not rows.any():
                    continue
                chunk = shard.rows(i, i + step).select(torch.from_numpy(rows))
                scores.append(score_fn(text, chunk.to(dev, torch.float32)).float().cpu())
                counts.append(chunk.counts.numpy())
                ids.append(shard.image_ids[i : i + step][rows])
    if not ids:
        raise StoreError(f"no embedding shards in {store.root}: nothing was embedded")
    failures = store.contents()[1]  # the newest record per image; none once it was embedded
    image_ids = np.concatenate(ids)
    order = np.argsort(image_ids, kind="stable")
    if len(np.unique(image_ids)) != len(image_ids):
        raise StoreError(f"{store.root}: an image id appears in more than one shard")
    return ScoreResult(
        scores=torch.cat(scores, dim=1).numpy()[:, order],
        image_ids=image_ids[order],
        reps_per_image=np.concatenate(counts)[order],
        failures=failures,
        bytes_stored=nbytes,
        seconds=time.perf_counter() - start,
    )
