"""Two costs of a fast-scan query, each measured against the way it was done before.

On one ``faiss-ivfpqfs`` index over ``--rows`` synthetic representatives (bench_search's
clustered data), one query at a time, every list probed, ``--fetch`` candidates:

- the candidate fetch by faiss's own ``index.search`` (faiss scans one query on one
  thread) against :func:`search_ivf` (the probed lists in parts, one per thread);
- converting the fetched fp16 rows to float32 by numpy's ``astype`` against torch's
  conversion (:meth:`RepTable.float_rows`).

Each variant answers every query ``--rounds`` times, one after the other, on the same
index in the same process (its files written back first); it prints its median and the
ratio of the first of its pair to it.

    python bench/bench_faiss_scan.py --rows 1000000 --json results/bench/faiss_scan_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from bench_search import batches, build, concepts, make_queries

from retrieval.index import open_backend
from retrieval.index.faiss_backend import search_ivf


def median_ms(fn: Callable[[int], object], queries: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        for i in range(queries):
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--fetch", type=int, default=1000, help="candidates per query")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    centres, freq = concepts(2000, args.dim, seed=0)
    queries = make_queries(args.queries, centres, seed=1)
    q = queries.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        data = batches(args.rows, 16, centres, freq, seed=2)
        built, build_s, _ = build("faiss-ivfpqfs", Path(tmp) / "ix", data, args.dim, "cpu", {})
        state = {**built.state(), "nprobe": None, "overfetch": args.fetch / 50}
        built.close()  # read back, as a server opens it
        os.sync()  # the new files' writeback is not timed with the queries
        backend = open_backend("faiss-ivfpqfs", Path(tmp) / "ix", args.dim, "cpu", **state)
        engine = backend.engine
        index = engine._built()  # type: ignore[attr-defined] # the bench reads faiss itself
        table = backend.require_table()
        nlist = index.nlist
        index.nprobe = nlist
        fetched = [search_ivf(index, q[i : i + 1], args.fetch, nlist)[1][0] for i in range(len(q))]
        rows = [np.sort(r[r >= 0]) for r in fetched]
        v = table.vectors
        for start in range(0, len(v), 65_536):  # the table in the page cache, as in a server
            np.asarray(v[start : start + 65_536]).sum()
        pairs = {
            "candidate fetch": {
                "faiss index.search": lambda i: index.search(q[i : i + 1], args.fetch),
                "search_ivf (parts)": lambda i: search_ivf(index, q[i : i + 1], args.fetch, nlist),
            },
            "fp16 -> fp32 of the fetched rows": {
                "numpy astype": lambda i: v[rows[i]].astype(np.float32),
                "torch (float_rows)": lambda i: table.float_rows(rows[i]),
            },
        }
        out: dict = {
            "rows": args.rows,
            "dim": args.dim,
            "fetch_k": args.fetch,
            "nlist": nlist,
            "threads": faiss.omp_get_max_threads(),
            "build_s": build_s,
        }
        for name, variants in pairs.items():
            times = {label: median_ms(fn, len(q), args.rounds) for label, fn in variants.items()}
            base = next(iter(times.values()))
            for label, ms in times.items():
                print(f"{name:34s} {label:22s} {ms:8.2f} ms  x{base / ms:5.2f}")
            out[name] = times
        backend.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
