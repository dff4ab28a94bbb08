"""Run folders written directly, for index and search tests that need control over the
stored vectors and the collection table (not the engine's output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from retrieval.representatives import Representatives


def random_reps(images: int, r: int, seed: int, dim: int, valid_slot: int = 1) -> Representatives:
    """Unit vectors around 12 shared centres (images compete for a query), a ragged mask
    (slot indices differ from row order; slot ``valid_slot`` is always valid) and a
    random box per slot."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(12, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    pick = torch.randint(12, (images, r), generator=g)
    noise = F.normalize(torch.randn(images, r, dim, generator=g), dim=-1)
    emb = F.normalize(centres[pick] + 0.5 * noise, dim=-1)
    mask = torch.rand(images, r, generator=g) > 0.3
    mask[:, valid_slot] = True
    xx, yy = torch.rand(2, images, r, 2, generator=g).sort(dim=-1).values
    boxes = torch.stack([xx[..., 0], yy[..., 0], xx[..., 1], yy[..., 1]], dim=-1)
    return Representatives(emb, mask, boxes)


def write_collection(
    run: Path,
    ids: np.ndarray,
    removed: np.ndarray,
    folder: str = "photos",
    columns: dict[str, Any] | None = None,
) -> None:
    """``images.parquet`` in the collection format (retrieval/data/collection.py), with
    fixed file facts and any extra metadata ``columns``."""
    n = len(ids)
    table = {
        "image_id": pa.array(ids.astype(np.int64)),
        "path": [f"{folder}/{i:05d}.jpg" for i in ids],
        "size_bytes": np.full(n, 4096, np.int64),
        "mtime_ns": np.full(n, 1_700_000_000_000_000_000, np.int64),
        "width": pa.array(np.full(n, 640), pa.int32()),
        "height": pa.array(np.full(n, 480), pa.int32()),
        "removed": pa.array(removed.astype(bool)),
        **(columns or {}),
    }
    pq.write_table(pa.table(table), run / "images.parquet")


TINY_DENSE = [
    "run.progress=false",
    "loader.num_workers=0",
    "logger.wandb.mode=disabled",
    "retriever=dense_clip_rn50",
    "retriever.backbone=RN-tiny",
    "retriever.pretrained=null",
    "retriever.resolution=128",
]
"""Quiet, offline overrides for a tiny random-weight RN Dense-CLIP run (128 px = 4 x 4
cells): the suite's and the benches' small real runs."""


def tiny_dense_run(annotations: Path, images: Path, out: Path) -> Path:
    """A real Dense-CLIP run by ``evaluate`` (tiny random-weight RN, 128 px = 4 x 4 cells,
    the single prompt) over a COCO-format set: the suite's ``dense_run`` and the serve
    bench's text encoder."""
    from retrieval.config import load_config
    from retrieval.engine import evaluate

    overrides = [
        f"data.annotations={annotations}",
        f"data.images={images}",
        f"run.output_dir={out}",
        *TINY_DENSE,
        "text.prompts=single",
    ]
    evaluate(load_config("demo", overrides))
    return out
