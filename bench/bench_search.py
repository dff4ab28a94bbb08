"""Search backends side by side: build and query time, memory, recall@K against exact.

Every backend indexes the same synthetic clustered representatives in one run (concepts
on the sphere with a Zipf frequency, so some are rare, as in mining; each image holds
``--reps`` noisy concept vectors), and answers the same queries (concepts plus a larger
noise, standing in for text). Half the queries tune approximate backends to
``--target``; recall@K is measured on the other half against the exact backend, whose
times every ratio divides. Query time is one query at a time (the latency a user sees).
Indexing rate is representatives per second of build; for Milvus the insert requests'
own rate is shown beside it (its build also flushes, indexes and loads).

``milvus`` is milvus-lite in the index folder; ``milvus-server`` a real Milvus server
(the PyPI ``milvus`` package, 2.3.5 here) started in a temporary folder for the run
(``--milvus-server``, on when that package is installed; tests/milvus_server.py starts
it, on loopback), one collection per size.

    python bench/bench_search.py --sizes 10000 100000 1000000 --dim 512
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.index import Backend, create_backend
from retrieval.index.kernels import exact_search
from retrieval.index.milvus_backend import MilvusBackend
from retrieval.index.tuning import recall_at_k
from retrieval.representatives import Representatives

BATCH_IMAGES = 4096


def concepts(
    count: int, dim: int, seed: int, zipf: float = 1.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept centres and their Zipf(``zipf``) frequencies."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(count, dim, generator=g), dim=1)
    freq = 1.0 / torch.arange(1, count + 1).double() ** zipf
    return centres, freq / freq.sum()


def batches(
    rows: int, reps: int, centres: torch.Tensor, freq: torch.Tensor, seed: int
) -> Iterator[tuple[np.ndarray, Representatives]]:
    """The same images every call: ``rows // reps`` images of ``reps`` representatives."""
    images = rows // reps
    for start in range(0, images, BATCH_IMAGES):
        n = min(BATCH_IMAGES, images - start)
        g = torch.Generator().manual_seed(seed + start)
        pick = torch.multinomial(freq, n * reps, replacement=True, generator=g)
        noise = F.normalize(torch.randn(n * reps, centres.shape[1], generator=g), dim=1)
        emb = F.normalize(centres[pick] + 0.8 * noise, dim=1).view(n, reps, -1)
        yield np.arange(start, start + n), Representatives.dense(emb.half())


def make_queries(
    count: int, centres: torch.Tensor, seed: int, noise_norm: float = 1.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(centres), (count,), generator=g)
    noise = F.normalize(torch.randn(count, centres.shape[1], generator=g), dim=1)
    return F.normalize(centres[pick] + noise_norm * noise, dim=1)


SERVER = "milvus-server"  # the milvus backend on the run's Milvus server


@contextmanager
def milvus_server(enabled: bool) -> Iterator[Any]:
    """A Milvus server in a temporary folder for the run, or None."""
    if not enabled:
        yield None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from milvus_server import MilvusTestServer

    with tempfile.TemporaryDirectory(prefix="bench_milvus_") as tmp:
        server = MilvusTestServer(Path(tmp))
        server.start()
        os.environ["MILVUS_TOKEN"] = server.token
        try:
            yield server
        finally:
            server.stop()


# Opens a built index in a fresh process and answers the queries one at a time, as a
# server would: its resident memory then (anonymous: what it holds; file: pages of the
# memory-mapped table and files it read) and the peak, after the imports' share.
MEMORY_PROBE = """
import json, sys
import numpy as np, torch
from retrieval.index import open_backend
def status():
    lines = open("/proc/self/status").read().splitlines()
    return {k: 1024 * int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in lines)
            if k in ("RssAnon", "RssFile", "VmHWM")}
torch.set_grad_enabled(False)
name, folder, dim, state, queries, k = sys.argv[1:7]
before = status()
backend = open_backend(name, folder, int(dim), "cpu", **json.loads(state))
for q in torch.from_numpy(np.load(queries)):
    backend.search_rows(q.unsqueeze(0), int(k))
after = status()
print(json.dumps({"rss_anon_bytes": after["RssAnon"], "rss_file_bytes": after["RssFile"],
                  "peak_rss_bytes": after["VmHWM"], "imports_rss_anon_bytes": before["RssAnon"]}))
"""


def process_memory(name: str, backend: Backend, queries: torch.Tensor, k: int) -> dict:
    """:data:`MEMORY_PROBE`'s numbers for ``backend`` (built, in its folder)."""
    path = backend.folder.parent / f"{backend.folder.name}-queries.npy"
    np.save(path, queries.numpy())
    argv = [name, str(backend.folder), str(backend.dim), json.dumps(backend.state())]
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *argv, str(path), str(k)],
        capture_output=True,
        text=True,
        check=True,
    )
    path.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (the Milvus server's, which holds its collections)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return 1024 * int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")))


def timed_inserts(backend: Backend) -> list[float]:
    """Seconds the milvus backend spends in insert requests (a one-item list, filled
    during the build); empty for other backends."""
    engine = backend.engine
    if not isinstance(engine, MilvusBackend):
        return []
    spent, insert = [0.0], engine._insert

    def timed(rows: np.ndarray, progress: bool) -> None:
        start = time.perf_counter()
        insert(rows, progress)
        spent[0] += time.perf_counter() - start

    engine._insert = timed  # type: ignore[method-assign]
    return spent


def build(
    name: str, folder: Path, data: Iterator, dim: int, device: str, options: dict[str, Any]
) -> tuple[Backend, float, list[float]]:
    start = time.perf_counter()
    backend = create_backend(name, folder, dim, device, **options)
    inserts = timed_inserts(backend)
    for ids, reps in data:
        backend.add(ids, reps)
    backend.finish(progress=False)
    return backend, time.perf_counter() - start, inserts


def backend_options(name: str, rows: int, args: argparse.Namespace) -> tuple[str, dict]:
    """The registered backend behind a bench name, and its options."""
    if name != SERVER:
        return name, {}
    options = {"uri": args.milvus.uri, "collection": f"bench_{rows}"}
    return "milvus", {**options, "index_type": args.milvus_server_index}


def latency_ms(backend: Backend, queries: torch.Tensor, k: int) -> float:
    """Median time of one single-query search over ``queries``, in milliseconds."""
    backend.search_rows(queries[:1], k)  # warm-up (page cache, GPU upload)
    times = []
    for q in queries:
        start = time.perf_counter()
        backend.search_rows(q.unsqueeze(0), k)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure_size(rows: int, args: argparse.Namespace, root: Path) -> list[dict]:
    centres, freq = concepts(args.concepts, args.dim, seed=0, zipf=args.zipf)
    queries = make_queries(args.queries, centres, seed=1, noise_norm=args.query_noise)
    half = len(queries) // 2
    tune_q, held_q = queries[:half], queries[half:]
    results, exact = [], None
    for name in args.backends:
        folder = root / f"{rows}-{name}"
        data = batches(rows, args.reps, centres, freq, seed=2)
        kind, options = backend_options(name, rows, args)
        backend, build_s, inserts = build(kind, folder, data, args.dim, args.device, options)
        table = backend.require_table()
        k = min(args.k, table.num_images)
        truth = [table.owner[r] for r, _ in exact_search(table, queries, k, args.device)]
        start = time.perf_counter()
        backend.tune(tune_q, truth[:half], k, args.target)
        tune_s = time.perf_counter() - start
        recall = recall_at_k(backend.search_rows(held_q, k), truth[half:], table.owner)
        # exact streams the whole table per query: capped where that takes seconds
        timed_q = held_q[: args.exact_latency_queries] if name == "exact" else held_q
        disk = backend.disk_bytes()
        row = {
            "representatives": table.num_rows,
            "images": table.num_images,
            "backend": name,
            "build_s": build_s,
            "rows_per_s": table.num_rows / build_s,
            "insert_rows_per_s": table.num_rows / inserts[0] if inserts else None,
            "tune_s": tune_s,
            "query_ms": latency_ms(backend, timed_q, k),
            "query_count": len(timed_q),
            f"recall@{k}": recall,
            "memory_bytes_per_image": backend.memory_bytes() / table.num_images,
            "disk_bytes_per_image": disk / table.num_images,
            "settings": {k_: v for k_, v in backend.state().items() if k_ != "train_size"},
        }
        if name == SERVER:  # its collections live in the server process, not this one
            row["server_rss_bytes"] = rss_bytes(args.milvus.pid)
        elif args.process_memory:
            row |= process_memory(kind, backend, timed_q, k)
        exact = exact or row
        row["query_speedup_vs_exact"] = exact["query_ms"] / row["query_ms"]
        row["memory_vs_exact"] = row["memory_bytes_per_image"] / exact["memory_bytes_per_image"]
        row["build_vs_exact"] = row["build_s"] / exact["build_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
        if (
            isinstance(backend.engine, MilvusBackend) and not backend.engine.lite
        ):  # else kept loaded
            backend.engine.client.drop_collection(options["collection"], timeout=60)
        backend.close()
        del backend, table  # the table maps its vectors: the folder's disk comes back
        shutil.rmtree(folder, ignore_errors=True)
    return results


def markdown(rows: list[dict], k: int) -> str:
    head = (
        f"| reps | backend | build s | rows/s (insert) | query ms | x exact | recall@{k} | "
        "mem B/img | x exact | disk B/img | settings |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        recall = next(v for key, v in r.items() if key.startswith("recall@"))
        insert = f" ({r['insert_rows_per_s']:,.0f})" if r["insert_rows_per_s"] else ""
        lines.append(
            f"| {r['representatives']:,} | {r['backend']} | {r['build_s']:.2f} | "
            f"{r['rows_per_s']:,.0f}{insert} | "
            f"{r['query_ms']:.2f} | {r['query_speedup_vs_exact']:.1f} | {recall:.3f} | "
            f"{r['memory_bytes_per_image']:,.0f} | {r['memory_vs_exact']:.2f} | "
            f"{r['disk_bytes_per_image']:,.0f} | {json.dumps(r['settings'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["exact", "faiss-flat", "faiss-ivfpq", "lancedb", "milvus", SERVER],
        help=f"exact first: the others' ratios divide by it ({SERVER}: see --milvus-server)",
    )
    parser.add_argument(
        "--milvus-server",
        action=argparse.BooleanOptionalAction,
        default=importlib.util.find_spec("milvus") is not None,
        help=f"start a Milvus server for {SERVER} (default: when `milvus` is installed)",
    )
    parser.add_argument(
        "--milvus-server-index", default="HNSW", help=f"{SERVER}'s index_type (default HNSW)"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=16, help="representatives per image")
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.1, help="concept frequency exponent")
    parser.add_argument(
        "--query-noise", type=float, default=1.0, help="norm of a query's noise (text-like)"
    )
    parser.add_argument(
        "--exact-latency-queries",
        type=int,
        default=50,
        help="held-out queries exact is timed on (it reads the whole table per query)",
    )
    parser.add_argument(
        "--process-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each index's resident memory in a fresh process that searches it",
    )
    parser.add_argument("--queries", type=int, default=100, help="half tune, half measure")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.95, help="recall to tune for")
    parser.add_argument("--device", default="cpu", help="exact backend's device")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.backends[0] != "exact":
        parser.error("--backends must start with exact (the reference)")
    if SERVER in args.backends and not args.milvus_server:
        print(f"{SERVER} skipped: no Milvus server (pip install milvus, or --milvus-server)")
        args.backends.remove(SERVER)
    torch.set_grad_enabled(False)
    rows = []
    server = args.milvus_server and SERVER in args.backends
    with milvus_server(server) as args.milvus, tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows += measure_size(size, args, Path(tmp))
    print(markdown(rows, args.k))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
