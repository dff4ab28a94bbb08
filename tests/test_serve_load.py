"""``retrieval serve`` under load: 32 concurrent clients for a fixed time (30 s, or
``SERVE_LOAD_SECONDS``) mixing text, compound and by-example searches over both test
indexes; no server error, every answer equal to the library's for its query, and the
batcher sharing model calls between them."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from retrieval.index import open_index

CLIENTS = 32
SECONDS = float(os.environ.get("SERVE_LOAD_SECONDS", "30"))
TEXTS = ["a red square", "a blue circle", "a dog", "a green triangle", "two cars", "grass"]


def requests_and_answers(folders: dict[str, Path]) -> list[tuple[dict, list[int]]]:
    """A handful of requests (httpx keyword arguments) with the image ids the library
    answers each with."""
    out = []
    with open_index(folders["vectors"], "cpu") as vectors, open_index(folders["dense"], "cpu") as d:
        for i, text in enumerate(TEXTS):
            where = "camera = 'back'" if i % 2 else None
            params = {"q": text, "index": "vectors", "top": 8} | ({"where": where} if where else {})
            hits = vectors.search(text, 8, where=where)
            out.append(({"method": "GET", "params": params}, [h.image_id for h in hits]))
        out.append(
            (
                {"method": "GET", "params": {"q": "a dog", "index": "dense", "top": 5}},
                [h.image_id for h in d.search("a dog", 5)],
            )
        )
        table = vectors.backend.table
        for row in (3, 77, 200):
            image_id = int(table.image_ids[table.owner[row]])
            body = {
                "index": "vectors",
                "image_id": image_id,
                "rep_index": int(table.slots[row]),
                "top": 6,
            }
            q = table.vectors[row].astype(np.float32)
            hits = vectors.search_vectors(q[None], 6)[0]
            out.append(({"method": "POST", "json": body}, [h.image_id for h in hits]))
    return out


@pytest.mark.slow
def test_32_clients_get_the_right_answers(served_index: str, serve_indexes) -> None:
    cases = requests_and_answers(serve_indexes)
    before = httpx.get(f"{served_index}/api/stats").json()
    failures: list[str] = []
    latencies: list[float] = []

    async def client(n: int, until: float, http: httpx.AsyncClient) -> None:
        rng = random.Random(n)
        while time.monotonic() < until:
            kwargs, expected = rng.choice(cases)
            start = time.perf_counter()
            response = await http.request(url="/api/search", **kwargs)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures.append(f"{kwargs}: {response.status_code} {response.text[:200]}")
            elif [h["image_id"] for h in response.json()["hits"]] != expected:
                failures.append(f"{kwargs}: wrong hits {response.json()['hits']}")

    async def run() -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=served_index, timeout=120, limits=limits) as http:
            until = time.monotonic() + SECONDS
            await asyncio.gather(*(client(n, until, http) for n in range(CLIENTS)))

    asyncio.run(run())
    after = httpx.get(f"{served_index}/api/stats").json()
    assert not failures, f"{len(failures)} of {len(latencies)} failed, e.g. {failures[:3]}"
    queries = after["queries"] - before["queries"]
    calls = after["model_calls"] - before["model_calls"]
    assert queries == len(latencies) >= CLIENTS
    assert calls < queries  # concurrent queries shared model calls
    print(
        f"{len(latencies)} queries in {SECONDS:.0f} s by {CLIENTS} clients: "
        f"{len(latencies) / SECONDS:.1f}/s, p50 {1000 * np.median(latencies):.0f} ms, "
        f"p99 {1000 * np.percentile(latencies, 99):.0f} ms, {calls / queries:.2f} model calls "
        f"per query"
    )
