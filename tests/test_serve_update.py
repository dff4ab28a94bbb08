"""A running `retrieval serve` follows `retrieval index update` without a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import fake_runs
import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from serve_server import GRID, start_server, write_vector_run

from retrieval.aggregate import grid_cell_boxes
from retrieval.index import build_index
from retrieval.index.update import update_index
from retrieval.representatives import Representatives
from retrieval.store import ShardStore

pytestmark = pytest.mark.slow  # its own server: ~20 s to start on two shared cores


def _ids(base: str, query: str) -> set[int]:
    hits = httpx.get(f"{base}/api/search", params={"q": query, "top": 100}, timeout=60)
    hits.raise_for_status()
    return {h["image_id"] for h in hits.json()["hits"]}


def test_a_served_index_follows_an_update(dense_run: Path, tmp_path: Path) -> None:
    """After `index update` adds 4 images and removes one, the same server (no restart)
    returns the new ones and never the removed one, serves the new images' files, 404s
    the removed one, and lists the index at generation 1."""
    images = Path(
        ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]["data"]["images"]
    )
    run = write_vector_run(dense_run, tmp_path / "run", np.arange(1, 17), 3, images)
    index = build_index(run, "faiss", tmp_path / "grow", "cpu", progress=False)
    with start_server({"grow": index}) as base:
        assert _ids(base, "a photo") == set(range(1, 17))

        new = np.arange(17, 21)
        store = ShardStore(run / "embeddings")
        dim = next(store.iter_shards()).reps.embeddings.shape[-1]
        emb = F.normalize(torch.randn(len(new), GRID * GRID, dim), dim=-1)
        boxes = grid_cell_boxes((GRID, GRID)).expand(len(new), -1, -1).contiguous()
        store.write_shard("rank000-00099", torch.from_numpy(new), Representatives.dense(emb, boxes))
        for i in new:
            shutil.copy(images / f"{i:012d}.jpg", run / "photos" / f"{i:05d}.jpg")
        ids = np.arange(1, 21)
        columns = {"camera": ["front"] * 20, "night": [False] * 20}
        fake_runs.write_collection(run, ids, ids == 5, str(run / "photos"), columns)
        assert update_index(index, progress=False, device="cpu").generation == 1

        assert _ids(base, "a photo") == set(range(1, 21)) - {5}
        listed = httpx.get(f"{base}/api/indexes", timeout=60).json()["indexes"][0]
        assert listed["generation"] == 1
        assert listed["images"] == 19
        assert httpx.get(f"{base}/api/images/grow/18", timeout=60).status_code == 200
        gone = httpx.get(f"{base}/api/images/grow/5", timeout=60)
        assert gone.status_code == 404
        assert "detail" in gone.json()
