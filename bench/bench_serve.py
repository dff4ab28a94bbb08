"""``retrieval serve`` under concurrent text queries: queries/s, p50/p99 latency and model
calls per query at several client concurrencies, over an index of ``--reps``
representatives.

The index: a tiny random-weight Dense-CLIP run (RN-tiny, 24 synthetic images, the test
suite's recipe) gives the retriever, its config and fingerprint; its 16-cell layout is
then filled with random unit vectors for ``--reps / 16`` images (tests/serve_server.py's
``write_vector_run``) and indexed by ``build_index`` (``--backends``, default ``faiss``
then ``exact``), the same build path as any run. So
text queries go through the real (tiny) text encoder and the real search over
``--reps`` rows; the hits mean nothing. The server is a real ``retrieval serve`` process
on a loopback port; the clients are one asyncio + httpx process on the same machine,
each sending its next query when the last one is answered, for ``--seconds`` per
concurrency. Distinct query texts, so no batch is cheap because of repeats.

    python bench/bench_serve.py --reps 100000 --json results/bench/serve_cpu.json \
        --md results/bench/serve_cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the server launcher and run writer the tests use

from fake_runs import tiny_dense_run  # noqa: E402
from serve_server import GRID, start_server, write_vector_run  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["square", "circle", "triangle", "dog", "car", "stroller", "hydrant", "bicycle"]
GOAL = 2.0  # throughput at concurrency 16 over concurrency 1 (issue 17)


def source_run(root: Path) -> Path:
    """The test suite's tiny Dense-CLIP run (tests/conftest.py ``dense_run``)."""
    from retrieval.data.synthetic import make_synthetic_coco

    ann, images = make_synthetic_coco(root / "synthetic", num_images=24, seed=3)
    return tiny_dense_run(ann, images, root / "source")


def queries(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} number {i}" for i in range(count)]


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One keep-alive HTTP/1.1 GET; its status (the body is read and dropped). A client
    this small costs the shared cores little next to the server it measures (httpx's
    own overhead halved the measured throughput here)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def measure(url: str, concurrency: int, seconds: float, texts: list[str], top: int) -> dict:
    """Each of ``concurrency`` clients sends its next query when the last is answered."""
    latencies: list[float] = []
    errors = 0
    stats = httpx.get(f"{url}/api/stats").json()
    address = httpx.URL(url)

    async def client(n: int, until: float) -> None:
        nonlocal errors
        rng = random.Random(n)
        reader, writer = await asyncio.open_connection(address.host, address.port)
        while time.monotonic() < until:
            path = "/api/search?" + urlencode({"q": rng.choice(texts), "top": top})
            start = time.perf_counter()
            status = await get(reader, writer, path)
            latencies.append(time.perf_counter() - start)
            errors += status != 200
        writer.close()

    begin = time.monotonic()
    await asyncio.gather(*(client(n, begin + seconds) for n in range(concurrency)))
    elapsed = time.monotonic() - begin
    after = httpx.get(f"{url}/api/stats").json()
    done = after["queries"] - stats["queries"]
    return {
        "concurrency": concurrency,
        "queries": len(latencies),
        "errors": errors,
        "qps": len(latencies) / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "model_calls_per_query": (after["model_calls"] - stats["model_calls"]) / max(done, 1),
        "searches_per_query": (after["searches"] - stats["searches"]) / max(done, 1),
    }


def library_latency_ms(folder: Path, texts: list[str], top: int) -> float:
    """Median in-process ``open_index(folder).search`` time (with the server's torch
    threads): what a server adds its HTTP and queueing time to."""
    import torch

    from retrieval.index import open_index

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    with open_index(folder, "cpu") as index:
        index.search(texts[0], top)
        times = []
        for text in texts[:30]:
            start = time.perf_counter()
            index.search(text, top)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def markdown(report: dict[str, Any]) -> str:
    ix = report["index"]
    lines = [
        "# `retrieval serve` under concurrent text queries (CPU)",
        "",
        f"`{report['command']}`",
        "",
        f"Index: {ix['representatives']:,} representatives of {ix['images']:,} images, "
        f"D={ix['embed_dim']} ({ix['vectors']}); text encoder: {ix['retriever']}, prompts "
        f"`{report['prompts']}`; top {report['top']}; {report['seconds']:g} s per "
        f"concurrency; machine: {report['machine']}; load average {report['load'][0]:.1f} "
        f"before, {report['load'][1]:.1f} after (other jobs shared the cores).",
        "",
        "| backend | clients | queries | queries/s | p50 ms | p99 ms | model calls / query "
        "| searches / query | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part in report["backends"]:
        for r in part["rows"]:
            lines.append(
                f"| {part['backend']} | {r['concurrency']} | {r['queries']} | {r['qps']:.1f} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['model_calls_per_query']:.3f} | "
                f"{r['searches_per_query']:.3f} | {r['errors']} |"
            )
    lines.append("")
    for part in report["backends"]:
        ratio = part["ratio_16_over_1"]
        lines.append(
            f"- `{part['backend']}`: throughput at 16 clients / at 1 **{ratio:.2f}x** (goal >= "
            f"{GOAL:g}x: {'met' if ratio >= GOAL else 'not met'}); in-process "
            f"`open_index(...).search`, one query at a time: "
            f"{part['library_one_query_ms']:.1f} ms median."
        )
    lines += [
        "",
        "Queries that arrive together share one text-encoder call and one search call "
        "(`retrieval/serve/batching.py`): model calls / query below 1 is that sharing. The "
        "clients (a minimal asyncio HTTP/1.1 client) run on the same cores as the server, "
        "so the numbers are a floor for a server with the machine to itself.",
        "",
    ]
    return "\n".join(lines)


def bench_backend(
    run: Path, backend: str, root: Path, args: argparse.Namespace, texts: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Builds ``backend``'s index of ``run``, serves it and measures every concurrency."""
    from retrieval.index import build_index, open_index

    folder = build_index(run, backend, root / backend, "cpu", progress=False)
    with open_index(folder, "cpu") as index:
        manifest = index.manifest
    part: dict[str, Any] = {"backend": backend, "rows": []}
    part["library_one_query_ms"] = library_latency_ms(folder, texts, args.top)
    with start_server({"bench": folder}) as url:
        asyncio.run(measure(url, 4, 2.0, texts, args.top))  # warm-up
        for concurrency in args.concurrency:
            row = asyncio.run(measure(url, concurrency, args.seconds, texts, args.top))
            part["rows"].append(row)
            print(
                f"{backend:>8} {concurrency:>3} clients: {row['qps']:7.1f} queries/s, p50 "
                f"{row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, "
                f"{row['model_calls_per_query']:.3f} model calls/query",
                flush=True,
            )
    qps = {r["concurrency"]: r["qps"] for r in part["rows"]}
    part["ratio_16_over_1"] = qps[16] / qps[1] if 16 in qps and 1 in qps else float("nan")
    return part, manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=100_000, help="representatives indexed")
    parser.add_argument("--backends", nargs="+", default=["faiss", "exact"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency")
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--md", type=Path, help="write the Markdown table here")
    args = parser.parse_args(argv)

    from retrieval.store import ShardStore

    load = [os.getloadavg()[0]]
    texts = queries(2000, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(tmp)
        source = source_run(root)
        images = args.reps // (GRID * GRID)
        run = write_vector_run(source, root / "vectors", np.arange(1, images + 1), seed=1)
        parts, manifest = [], {}
        for backend in args.backends:
            part, manifest = bench_backend(run, backend, root, args, texts)
            parts.append(part)
        fingerprint = ShardStore(source / "embeddings").read_manifest()["fingerprint"]
    load.append(os.getloadavg()[0])
    cpus = len(os.sched_getaffinity(0))
    report = {
        "command": "python bench/bench_serve.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{cpus} CPUs, server torch threads {max(1, cpus - 1)}",
        "load": load,
        "index": {
            "representatives": manifest.representatives,
            "images": manifest.images,
            "embed_dim": manifest.embed_dim,
            "retriever": f"{fingerprint['retriever']['name']} "
            f"{fingerprint['retriever']['backbone']} (random weights)",
            "vectors": "random unit vectors written as the tiny run's 4 x 4 cells, indexed "
            "by build_index",
        },
        "prompts": "single",
        "top": args.top,
        "seconds": args.seconds,
        "backends": parts,
        "goal": GOAL,
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
