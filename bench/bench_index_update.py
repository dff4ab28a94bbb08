"""`index update` against a full rebuild, side by side in one run, per backend.

A run folder is written directly (fp16 shards of synthetic clustered representatives:
Zipf-frequent concepts on the sphere plus noise, ``--reps`` per image, and an
``images.parquet`` collection table), each backend builds an index over it, then:

1. grow: a new shard with 10% new images (new ids, rows added to the collection);
   ``update_index`` is timed, then a fresh ``build_index`` over the grown run;
2. shrink: 10% of the live images marked removed; the same two timings.

Both sides are the whole public call (``update_index`` / ``build_index``: reading the
shards, the table, the backend's structure, and recall on held-out queries, as each
records it: a build tunes the search settings on half its queries, an update keeps
them and measures on fresh ones; faiss flat is exact by construction), on the same
run, one after the other. The ratio update / rebuild is the goal's measure (<= 0.2).
"open" is the first ``open_index`` plus one search afterwards, on the updated and on
the rebuilt index: an update defers work to it (faiss merges its segments and drops
removed rows when it loads them; LanceDB scans the rows it has not indexed).

    python bench/bench_index_update.py --images 2000 --reps 16 --dim 512
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from retrieval.index import build_index, open_index, update_index
from retrieval.representatives import Representatives
from retrieval.store import ShardStore

SHARD_IMAGES = 2000
CONCEPTS = 2000


def reps(ids: np.ndarray, r: int, centres: torch.Tensor, seed: int) -> Representatives:
    """``r`` noisy concept vectors per image (concepts drawn Zipf(1.1)), fp16."""
    g = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, len(centres) + 1).double() ** 1.1
    pick = torch.multinomial(freq / freq.sum(), len(ids) * r, replacement=True, generator=g)
    noise = F.normalize(torch.randn(len(ids) * r, centres.shape[1], generator=g), dim=1)
    emb = F.normalize(centres[pick] + 0.8 * noise, dim=1).view(len(ids), r, -1)
    return Representatives.dense(emb.half())


def write_shards(store: ShardStore, ids: np.ndarray, r: int, centres: torch.Tensor) -> None:
    for start in range(0, len(ids), SHARD_IMAGES):
        part = ids[start : start + SHARD_IMAGES]
        name = f"rank000-{len(store.shard_paths()):05d}"
        store.write_shard(name, torch.from_numpy(part), reps(part, r, centres, int(part[0])))


def write_collection(run: Path, ids: np.ndarray, removed: np.ndarray) -> None:
    n = len(ids)
    pq.write_table(
        pa.table(
            {
                "image_id": pa.array(ids.astype(np.int64)),
                "path": [f"img_{i}.jpg" for i in ids],
                "size_bytes": np.full(n, 100_000, np.int64),
                "mtime_ns": np.zeros(n, np.int64),
                "width": np.full(n, 1024, np.int32),
                "height": np.full(n, 768, np.int32),
                "removed": pa.array(removed),
            }
        ),
        run / "images.parquet",
    )


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def open_and_search(folder: Path, dim: int) -> float:
    """Seconds to open an index and answer one query (top 50)."""
    q = F.normalize(torch.randn(1, dim, generator=torch.Generator().manual_seed(1)))
    start = time.perf_counter()
    with open_index(folder, "cpu") as index:
        index.search_vectors(q, 50)
    return time.perf_counter() - start


def bench_backend(
    backend: str, root: Path, images: int, r: int, dim: int, options: dict[str, Any]
) -> list[dict[str, Any]]:
    centres = F.normalize(torch.randn(CONCEPTS, dim, generator=torch.Generator().manual_seed(0)))
    run = root / f"run-{backend}"
    store = ShardStore(run / "embeddings")
    ids = np.arange(images)
    write_shards(store, ids, r, centres)
    store.write_manifest(fingerprint={"retriever": {"name": "bench", "dim": dim}})
    write_collection(run, ids, np.zeros(images, bool))
    build = dict(device="cpu", progress=False, **options)
    index, first_s = timed(build_index, run, backend, root / f"ix-{backend}", **build)
    rows = []
    tenth = images // 10
    new = np.arange(images, images + tenth)
    write_shards(store, new, r, centres)
    all_ids = np.concatenate([ids, new])
    removed = np.zeros(len(all_ids), bool)
    write_collection(run, all_ids, removed)
    steps = [("add 10%", None)]
    rng = np.random.default_rng(0)
    steps.append(("remove 10%", rng.choice(all_ids, tenth, replace=False)))
    for step, gone in steps:
        if gone is not None:
            removed |= np.isin(all_ids, gone)
            write_collection(run, all_ids, removed)
        result, update_s = timed(update_index, index, progress=False, device="cpu")
        rebuilt, rebuild_s = timed(build_index, run, backend, root / f"re-{backend}", **build)
        fresh = json.loads((rebuilt / "index.json").read_text())
        open_updated, open_rebuilt = open_and_search(index, dim), open_and_search(rebuilt, dim)
        rows.append(
            {
                "backend": backend,
                "step": step,
                "images": result.images,
                "representatives": fresh["representatives"],
                "added": result.added,
                "removed": result.removed,
                "update_s": update_s,
                "rebuild_s": rebuild_s,
                "ratio": update_s / rebuild_s,
                "open_updated_s": open_updated,
                "open_rebuilt_s": open_rebuilt,
                "update_recall": result.recall["value"],
                "rebuild_recall": fresh["recall"]["value"],
                "first_build_s": first_s,
                "settings": fresh["backend_state"],
            }
        )
        shutil.rmtree(rebuilt)
        print(
            f"{backend:12s} {step:10s} update {update_s:7.2f} s  rebuild {rebuild_s:7.2f} s  "
            f"ratio {update_s / rebuild_s:.3f}  recall update {result.recall['value']:.3f} "
            f"rebuild {fresh['recall']['value']:.3f}  open {open_updated:.2f} / "
            f"{open_rebuilt:.2f} s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=16, help="representatives per image")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["faiss", "faiss-ivfpq", "lancedb"])
    parser.add_argument("--recall-k", type=int, default=50)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_update_") as tmp:
        for backend in args.backends:
            rows += bench_backend(
                backend,
                Path(tmp),
                args.images,
                args.reps,
                args.dim,
                {"recall_k": args.recall_k},
            )
    print()
    print(
        "| backend | step | images | reps | update s | rebuild s | update / rebuild | "
        "recall update | recall rebuild | open+search updated s | rebuilt s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['step']} | {r['images']:,} | {r['representatives']:,} | "
            f"{r['update_s']:.2f} | {r['rebuild_s']:.2f} | {r['ratio']:.3f} | "
            f"{r['update_recall']:.3f} | {r['rebuild_recall']:.3f} | "
            f"{r['open_updated_s']:.2f} | {r['open_rebuilt_s']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
