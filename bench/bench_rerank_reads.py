"""Disk reads of an exact re-rank from the memory-mapped fp16 table, with and without
``RepTable.advise_random``, side by side in one run.

An approximate engine (faiss IVF kinds) re-scores a few thousand scattered rows a query
from ``vectors.f16``. Without advice, each row read pulls the kernel's readahead window,
so a handful of queries reads most of the table from disk; the advice makes a row read
fetch its own pages. Each side starts from a cold page cache (``drop_caches``: needs
root; without it the numbers are those of a warm cache and say so) and reads the rows of
``--queries`` re-ranks (``--rows`` sorted random rows each).

    python bench/bench_rerank_reads.py --rows-total 1000000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.index.table import RepTable, TableWriter
from retrieval.representatives import Representatives

REPS = 16


def write_table(folder: Path, rows: int, dim: int) -> None:
    writer = TableWriter(folder, dim)
    g = torch.Generator().manual_seed(0)
    for start in range(0, rows // REPS, 4096):
        n = min(4096, rows // REPS - start)
        emb = torch.nn.functional.normalize(torch.randn(n, REPS, dim, generator=g), dim=-1)
        writer.append(np.arange(start, start + n), Representatives.dense(emb.half()))
    writer.close()


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("read_bytes"))


def cold() -> bool:
    """Drops the page cache (root only); whether it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        return False
    return True


def measure(folder: Path, dim: int, advise: bool, args: argparse.Namespace) -> dict:
    dropped = cold()
    table = RepTable.open(folder, dim)
    if advise:
        table.advise_random()
    rng = np.random.default_rng(1)
    before, start = read_bytes(), time.perf_counter()
    for _ in range(args.queries):
        rows = np.sort(rng.choice(table.num_rows, args.rows, replace=False))
        table.vectors[rows].astype(np.float32)
    return {
        "advise_random": advise,
        "cold_cache": dropped,
        "read_mb": (read_bytes() - before) / 2**20,
        "seconds": time.perf_counter() - start,
        "table_mb": table.vectors.nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows-total", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2600, help="rows one re-rank reads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_table(Path(tmp), args.rows_total, args.dim)
        results = [measure(Path(tmp), args.dim, advise, args) for advise in (False, True)]
    for r in results:
        print(json.dumps(r))
    plain, advised = results
    print(
        f"{args.queries} re-ranks of {args.rows} rows over {plain['table_mb']:.0f} MB: "
        f"{plain['read_mb']:.0f} MB read from disk without advice, {advised['read_mb']:.0f} MB "
        f"with it ({plain['read_mb'] / max(advised['read_mb'], 1e-9):.1f}x less); "
        f"{plain['seconds']:.2f} s vs {advised['seconds']:.2f} s"
        + ("" if plain["cold_cache"] else " (warm cache: drop_caches needs root)")
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
