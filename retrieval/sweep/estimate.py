"""What a planned sweep will cost: images to embed, disk, and (measured) time.

Disk comes from a run's own shards when it has some, else from a calibration batch
(``--calibrate``: the retriever embeds one real batch, timed after a warm-up one), else
from the model's config (embedding width x representatives per image: one for CLIP, the
cell grid for Dense-CLIP, ``k`` / ``n_clusters`` for Cluster-CLIP, the grid as an upper
bound for threshold-based aggregations). Time is only ever measured, never guessed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from retrieval.config import as_dict
from retrieval.errors import RetrievalError
from retrieval.factory import data_fingerprint
from retrieval.store.run_folder import RunFolder
from retrieval.sweep.plan import PlannedRun

log = logging.getLogger("retrieval")
DTYPE_BYTES = {"float16": 2, "float32": 4}
BOX_BYTES = 16  # four float32 coordinates per representative


@dataclass
class Estimate:
    """One run's cost; ``None`` where it cannot be known without measuring."""

    images: int | None  # images in the dataset (None: it cannot be read yet)
    left: int | None  # images still to embed (or to re-aggregate, for a derived run)
    bytes_per_image: float | None
    exact_bytes: bool  # measured (shards or calibration), not derived from the config
    seconds_per_image: float | None = None
    at_most: bool = False  # the bytes are an upper bound (a threshold-based aggregation)

    @property
    def disk(self) -> float | None:
        if self.bytes_per_image is None or self.left is None:
            return None
        return self.bytes_per_image * self.left

    @property
    def seconds(self) -> float | None:
        if self.seconds_per_image is None or self.left is None:
            return None
        return self.seconds_per_image * self.left


class DatasetSizes:
    """Dataset image ids per data setting, each built once (annotations read once)."""

    def __init__(self) -> None:
        self._ids: dict[str, np.ndarray | None] = {}

    def image_ids(self, cfg: DictConfig) -> np.ndarray | None:
        """The dataset's image ids; None (said once per dataset) when it cannot be read."""
        key = json.dumps(data_fingerprint(cfg), sort_keys=True, default=str)
        if key not in self._ids:
            from retrieval.factory import build_dataset

            try:
                self._ids[key] = np.asarray(build_dataset(cfg, None).image_ids)
            except RetrievalError as err:  # not there (yet): say so, estimate the rest
                log.warning("%s", err)
                self._ids[key] = None
        return self._ids[key]


def bytes_per_rep(dim: int, dtype: str) -> int:
    """Stored bytes of one representative: its vector, its box and its mask flag."""
    return dim * DTYPE_BYTES[dtype] + BOX_BYTES + 1


def _grid_cells(backbone: str, resolution: int | None) -> tuple[int, int] | None:
    """(embedding width, cells per image) from open_clip's model config."""
    import open_clip

    config = open_clip.get_model_config(backbone)
    if not config:
        return None
    vision = config["vision_cfg"]
    size = resolution or vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if isinstance(vision.get("layers"), (list, tuple)):  # a ModifiedResNet: stride 32
        side = size // 32
    else:
        side = size // int(vision.get("patch_size", 16))
    return int(config["embed_dim"]), side * side


def reps_guess(retriever: dict[str, Any], cells: int) -> tuple[int, bool]:
    """Representatives per image a retriever keeps, and whether that is only an upper
    bound (a threshold-based aggregation keeps as many as the image needs)."""
    name = retriever["name"]
    extra = 1 if retriever.get("with_global") else 0
    if name == "clip":
        return 1, False
    if name == "cluster_clip":
        aggregate = retriever.get("aggregate") or {}
        count = aggregate.get("k") or aggregate.get("n_clusters")
        return min(int(count or cells), cells) + extra, count is None
    return cells + extra, False


def bytes_guess(cfg: DictConfig) -> tuple[float | None, bool]:
    """Stored bytes per image from the model's config (None: unknown) and whether that
    is an upper bound."""
    retriever = as_dict(cfg.retriever)
    try:
        shape = _grid_cells(str(retriever.get("backbone")), retriever.get("resolution"))
    except (KeyError, TypeError, ValueError):
        return None, False
    if shape is None:
        return None, False
    dim, cells = shape
    reps, at_most = reps_guess(retriever, cells)
    return reps * bytes_per_rep(dim, cfg.store.dtype), at_most


def stored(run: PlannedRun) -> tuple[np.ndarray, float | None]:
    """Image ids already in the run's shards and their bytes per image (None: none)."""
    store = RunFolder(run.run_dir).store()
    paths = store.shard_paths()
    if not paths:
        return np.zeros(0, np.int64), None
    done, failures = store.contents()
    ids = np.concatenate([done, np.array([f["image_id"] for f in failures], np.int64)])
    size = sum(p.stat().st_size for p in paths)
    return ids, size / max(len(done), 1)


@torch.no_grad()
def calibrate(cfg: DictConfig, batches: int = 2) -> tuple[float, float]:
    """Seconds and stored bytes per image of one real batch through the run's retriever
    (the first of ``batches`` is a warm-up, not timed)."""
    from retrieval.engine.loading import embed_loader
    from retrieval.engine.parts import build_parts

    parts = build_parts(cfg)
    dataset, retriever = parts.dataset, parts.retriever.eval()
    size = min(int(cfg.loader.batch_size), len(dataset.image_ids))
    count = min(len(dataset.image_ids), size * batches)
    ids = dataset.image_ids[:count]
    loader = embed_loader(dataset, retriever.image_transform, ids, size, num_workers=0)
    seconds, images, reps = 0.0, 0, 0.0
    dim = 0
    for i, batch in enumerate(loader):
        pixels = batch["pixels"]
        if pixels is None:  # every image of the batch unreadable
            continue
        start = time.perf_counter()
        out = retriever.encode_images(pixels)
        if i == 0 and count > size:
            continue
        seconds += time.perf_counter() - start
        images += len(out.mask)
        reps += float(out.mask.sum())
        dim = out.embeddings.shape[-1]
    return seconds / max(images, 1), reps / max(images, 1) * bytes_per_rep(dim, cfg.store.dtype)


def estimate(run: PlannedRun, sizes: DatasetSizes, measure: bool = False) -> Estimate:
    """A run's images left, disk and (with ``measure``, for a backbone run) time."""
    have, per_image = stored(run)
    ids = sizes.image_ids(run.cfg)
    left = None if ids is None else int((~np.isin(ids, have)).sum())
    if run.status == "done":
        left = 0
    exact = per_image is not None
    seconds = None
    if measure and run.uses_backbone and left:
        seconds, measured = calibrate(run.cfg)
        per_image, exact = per_image or measured, True
    at_most = False
    if per_image is None:
        per_image, at_most = bytes_guess(run.cfg)
    images = None if ids is None else len(ids)
    return Estimate(images, left, per_image, exact, seconds, at_most)
