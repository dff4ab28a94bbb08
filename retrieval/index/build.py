"""``retrieval index build``: a run's stored representatives -> an index folder.

The index folder holds the representative table, the backend's files, a copy of the
run's ``config.yaml`` (so text queries need only the index) and ``index.json``: the
run, the retriever fingerprint, embedding size, backend and its tuned settings, build
time, bytes per image, and recall@K against exact search on held-out queries. It is
built in a temporary folder and renamed, so a killed build leaves no half index.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import retrieval
from retrieval.errors import ConfigError, IndexFileError, MissingFileError
from retrieval.factory import create_backend
from retrieval.index.base import Backend
from retrieval.index.exact import ExactBackend, exact_search
from retrieval.index.table import MANIFEST, RepTable
from retrieval.index.tuning import recall_at_k
from retrieval.store.shards import ShardReader, ShardStore

FORMAT = 1
READ_IMAGES = 1024  # images read from a shard at once
SCORE_RULE = "max cosine over an image's representatives"


def run_store(run_dir: Path) -> ShardStore:
    """The run's embedding store, or a clear error naming what is missing."""
    if not run_dir.is_dir():
        raise MissingFileError(f"run folder not found: {run_dir} (made by `retrieval eval`)")
    store = ShardStore(run_dir / "embeddings")
    if not store.shard_paths():
        raise IndexFileError(
            f"{run_dir} holds no embeddings (no {store.root}/*.safetensors): nothing to "
            f"index; run `retrieval eval` with run.output_dir={run_dir} first"
        )
    if not store.read_manifest().get("fingerprint"):
        raise IndexFileError(f"{store.manifest_path} is missing or has no fingerprint")
    return store


def embed_dim(store: ShardStore) -> int:
    with ShardReader(store.shard_paths()[0]) as shard:
        return int(shard.rows(0, 1).embeddings.shape[2])


def add_run(backend: Backend, store: ShardStore, progress: bool) -> None:
    """Streams every shard into ``backend``, ``READ_IMAGES`` images at a time."""
    paths = store.shard_paths()
    for path in tqdm(paths, desc="reading shards", unit="shard", disable=not progress):
        with ShardReader(path) as shard:
            for start in range(0, shard.num_images, READ_IMAGES):
                reps = shard.rows(start, start + READ_IMAGES)
                backend.add(shard.image_ids[start : start + READ_IMAGES], reps)


def recall_queries(
    run_dir: Path | None, table: RepTable, count: int, seed: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """Queries to measure recall with: the run's own text queries (its categories), topped
    up with stored representatives (each with noise, so it is not its own exact match).

    Returns:
        ``(queries [Q, D], source)``, ``source`` counting each kind.
    """
    parts, source = [], {"text": 0, "representatives": 0}
    cached = run_dir / "text_embeddings.pt" if run_dir else None
    if cached is not None and cached.exists():
        text = torch.load(cached, weights_only=True)["embeddings"].float()
        if text.shape[1] == table.dim:
            parts.append(text[:count])
            source["text"] = len(parts[0])
    missing = count - source["text"]
    if missing > 0:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(table.num_rows, (missing,), generator=g).numpy()
        reps = torch.from_numpy(table.vectors[np.sort(rows)].astype(np.float32))
        noise = F.normalize(torch.randn(reps.shape, generator=g), dim=1)
        parts.append(F.normalize(reps + 0.5 * noise, dim=1))
        source["representatives"] = missing
    queries = torch.cat(parts)
    order = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))
    return queries[order], source


def measure(
    backend: Backend, queries: torch.Tensor, k: int, target: float, device: str
) -> dict[str, Any]:
    """Tunes ``backend`` on half the queries, then measures recall@k on the other half."""
    table = backend.require_table()
    k = min(k, table.searchable_images)
    if isinstance(backend, ExactBackend):
        return {"k": k, "value": 1.0, "queries": 0, "method": "exact search (by construction)"}
    truth = [table.owner[rows] for rows, _ in exact_search(table, queries, k, device)]
    half = max(len(queries) // 2, 1)
    start = time.perf_counter()
    backend.tune(queries[:half], truth[:half], k, target)
    tune_s = time.perf_counter() - start
    held_q, held_truth = queries[half:], truth[half:]
    if not len(held_q):  # a single query: measured on the one it was tuned on
        held_q, held_truth = queries, truth
    start = time.perf_counter()
    found = backend.search_rows(held_q, k)
    ms = 1000 * (time.perf_counter() - start) / len(held_q)
    return {
        "k": k,
        "value": recall_at_k(found, held_truth, table.owner),
        "queries": len(held_q),
        "target": target,
        "method": "held-out queries vs exact search",
        "tune_seconds": tune_s,
        "ms_per_query": ms,
    }


def folder_bytes(folder: Path, paths: list[Path]) -> dict[str, int]:
    """Size of each file, keyed by its path inside the index folder."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in paths}


def build_index(
    run_dir: str | Path,
    backend: str = "exact",
    out: str | Path | None = None,
    device: str = "auto",
    recall_k: int = 50,
    recall_target: float = 0.95,
    num_queries: int = 100,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Builds an index over a run's stored representatives.

    Args:
        run_dir: the run folder (``embeddings/``, ``config.yaml``).
        backend: a registered backend (``exact``, ``faiss``, ``faiss-flat``, ...).
        out: the index folder (default ``RUN_DIR/index/BACKEND``); an existing index
            there is replaced, any other non-empty folder is refused.
        device: where exact scoring runs (``auto``: GPU when present).
        recall_k: K of the recall@K recorded against exact search.
        recall_target: recall an approximate backend is tuned to reach.
        num_queries: queries for tuning and measuring recall (half each).
        progress: show progress bars.
        options: backend settings (e.g. ``nprobe``, ``overfetch``).

    Returns:
        The index folder.
    """
    if not 0 < recall_target <= 1 or recall_k < 1:
        raise ConfigError(
            f"recall target {recall_target} / K {recall_k}: the target is a fraction in "
            f"(0, 1] (e.g. --recall-target 0.95) and K at least 1 (e.g. --recall-k 50)"
        )
    run_dir = Path(run_dir).resolve()
    store = run_store(run_dir)
    out = Path(out) if out else run_dir / "index" / backend
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise IndexFileError(f"{out} is a non-empty folder that is not an index: choose --out")
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    index: Backend | None = None
    try:
        start = time.perf_counter()
        dim = embed_dim(store)
        index = create_backend(backend, tmp, dim, device, **options)
        add_run(index, store, progress)
        index.finish(progress)
        table = index.table
        if table is None or table.num_rows == 0:  # finish() always sets the table
            raise IndexFileError(f"{run_dir}: no image has a valid representative to index")
        build_s = time.perf_counter() - start
        queries, source = recall_queries(run_dir, table, num_queries, seed=0)
        recall = measure(index, queries, recall_k, recall_target, device)
        if recall["queries"]:
            recall["source"] = source
        config = run_dir / "config.yaml"
        if config.exists():
            shutil.copy(config, tmp / "config.yaml")
        files = folder_bytes(tmp, index.files())
        fingerprint = store.read_manifest()["fingerprint"]
        manifest = {
            "format": FORMAT,
            "code_version": retrieval.__version__,
            "run": str(run_dir),
            "fingerprint": fingerprint,
            "retriever": fingerprint.get("retriever"),
            "embed_dim": dim,
            "backend": backend,
            "backend_state": index.state(),
            "approximate": index.approximate,
            "score_rule": SCORE_RULE,
            "images": table.num_images,
            "representatives": table.num_rows,
            "recall": recall,
            "build_seconds": build_s,
            "disk_bytes_per_image": index.disk_bytes() / table.num_images,
            "memory_bytes_per_image": index.memory_bytes() / table.num_images,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    except BaseException:
        if index is not None:
            index.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index.close()  # before the rename: an embedded engine holds the folder open
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
