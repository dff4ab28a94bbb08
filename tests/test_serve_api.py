"""``retrieval serve``'s HTTP API against a real uvicorn process over tiny built indexes:
the hits equal the library's, compound and by-example queries follow their definitions,
pictures are served by id only, every bad request is one JSON message, and the token,
limits and event loop hold. Fixtures: tests/serve_server.py."""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_server import Server, free_port, write_vector_run

from retrieval.cli import main
from retrieval.index import build_index, open_index
from retrieval.store import ShardStore

TOKEN = "s3cret-token"


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=60, **kwargs)


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=60, **kwargs)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def local(serve_indexes: dict[str, Path]):
    """The same indexes opened in this process (the reference the server must match)."""
    opened = {name: open_index(folder, "cpu") for name, folder in serve_indexes.items()}
    yield opened
    for index in opened.values():
        index.close()


def image_file(index, image_id: int) -> Path:
    from retrieval.report.gallery import image_paths

    path = image_paths(index, [image_id])[image_id]
    assert path is not None
    return path


def assert_same_hits(found: list[dict], expected, name: str) -> None:
    """Same images, order, representatives and boxes; scores equal up to float32 noise
    (a batch of texts is encoded in one call, which moves the last bits)."""
    assert [h["image_id"] for h in found] == [h.image_id for h in expected]
    assert [h["rep_index"] for h in found] == [h.rep_index for h in expected]
    assert [h["rank"] for h in found] == list(range(1, len(expected) + 1))
    for hit, want in zip(found, expected, strict=True):
        assert hit["score"] == pytest.approx(want.score, abs=1e-6)
        assert hit["box"] == pytest.approx(list(want.box))
        assert hit["image_url"] == f"/api/images/{name}/{want.image_id}"
        assert Path(hit["path"]).name == hit["file_name"]
        assert Path(hit["path"]).exists()


def test_health_and_index_listing(served_index: str, serve_indexes: dict[str, Path]) -> None:
    """/healthz answers; /api/indexes lists both indexes with what the page needs."""
    assert ok(get(f"{served_index}/healthz")) == {"status": "ok"}
    listed = {i["name"]: i for i in ok(get(f"{served_index}/api/indexes"))["indexes"]}
    assert set(listed) == {"dense", "vectors"}
    dense, vectors = listed["dense"], listed["vectors"]
    assert dense["backend"] == "exact"
    assert vectors["backend"] == "faiss"
    assert dense["retriever"]["name"] == "dense_clip"
    assert dense["embed_dim"] == 64
    assert dense["images"] == 24
    assert dense["representatives"] == 24 * 16
    assert dense["recall"]["value"] == 1.0
    assert dense["generation"] == 0
    assert dense["metadata_columns"] == ["image_id"]
    assert {"image_id", "camera", "night", "width"} <= set(vectors["metadata_columns"])
    assert dense["random_weights"] is True
    docs = get(f"{served_index}/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert not re.search(r"(src|href)=.(https?:)?//", docs.text), "docs load nothing remote"
    for asset in re.findall(r"(?:src|href)=.(/docs/assets/[^'\"]+)", docs.text):
        assert get(f"{served_index}{asset}").status_code == 200, asset
    assert "/api/search" in ok(get(f"{served_index}/openapi.json"))["paths"]


@pytest.mark.parametrize(
    ("name", "query", "top", "where"),
    [
        ("dense", "a red square", 5, None),
        ("dense", "a blue circle", 50, "image_id < 12"),
        ("vectors", "a dog", 7, None),
        ("vectors", "a green triangle", 10, "camera = 'front' AND night = FALSE"),
    ],
)
def test_text_search_equals_the_library(served_index, local, name, query, top, where) -> None:
    """GET /api/search returns exactly open_index(folder).search(q, top, where=where)."""
    params = {"q": query, "top": top, "index": name} | ({"where": where} if where else {})
    body = ok(get(f"{served_index}/api/search", params=params))
    expected = local[name].search(query, top, where=where)
    assert body["index"] == name
    assert body["query"] == {"q": query, "where": where}
    assert body["top"] == min(top, 24)
    assert body["took_ms"] > 0
    assert body["recall"] == local[name].recall
    assert_same_hits(body["hits"], expected, name)


def reference_scores(index, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy: each image's max cosine over its stored representatives, and the
    ranking (ties by ascending id)."""
    table = index.backend.table
    cos = table.vectors.astype(np.float32) @ query
    ids = table.image_ids
    scores = np.array([cos[table.offsets[i] : table.offsets[i + 1]].max() for i in range(len(ids))])
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.mark.parametrize(
    ("positive", "negative", "weights", "negative_weight"),
    [
        (["a red square", "a dog"], ["grass"], [1.0, 0.5], 0.7),
        (["a red square", "a dog", "a car"], [], None, None),
        (["a cat"], ["a dog", "a tree"], None, None),  # default λ = 0.5
    ],
)
def test_compound_query_equals_numpy_reference(
    served_index, local, positive, negative, weights, negative_weight
) -> None:
    """q = normalise(normalise(Σ w_i t_i) - λ normalise(Σ n_j)) scored by max cosine over
    the stored representatives (docs/serve.md), checked against NumPy."""
    index = local["vectors"]
    body = {"index": "vectors", "top": 10, "positive": positive, "negative": negative}
    body |= {"weights": weights} if weights else {}
    body |= {"negative_weight": negative_weight} if negative_weight is not None else {}
    found = ok(post(f"{served_index}/api/search", json=body))
    pos = index.embed(positive).numpy()
    w = np.array(weights or [1.0] * len(positive))[:, None]
    q = unit((w * pos).sum(axis=0))
    if negative:
        lam = 0.5 if negative_weight is None else negative_weight
        q = unit(q - lam * unit(index.embed(negative).numpy().sum(axis=0)))
    ids, scores = reference_scores(index, q.astype(np.float32))
    assert [h["image_id"] for h in found["hits"]] == ids[:10].tolist()
    np.testing.assert_allclose([h["score"] for h in found["hits"]], scores[:10], atol=1e-4)
    assert found["query"]["positive"] == positive
    assert found["query"]["negative"] == negative


def maxsim_reference(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy Chamfer similarity: each image's mean over the queries of the max
    cosine over its stored representatives, and the ranking (ties by ascending id)."""
    table = index.backend.table
    cos = table.vectors.astype(np.float32) @ queries.T  # [rows, Q]
    ids = table.image_ids
    scores = np.array(
        [cos[table.offsets[i] : table.offsets[i + 1]].max(0).mean() for i in range(len(ids))]
    )
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def test_more_like_this_image(served_index: str, local) -> None:
    """An indexed image alone (no ``rep_index``) is a multi-vector query: its stored
    representatives, each image scored by MaxSim. The image itself comes first (score ~1)
    and the ranking equals the NumPy reference and ``SearchIndex.search_like``."""
    index = local["vectors"]
    table = index.backend.table
    pos = int(np.flatnonzero(table.image_ids == 9)[0])
    queries = table.vectors[table.offsets[pos] : table.offsets[pos + 1]].astype(np.float32)
    body = {"index": "vectors", "image_id": 9, "top": 6}
    found = ok(post(f"{served_index}/api/search", json=body))
    hits = found["hits"]
    assert hits[0]["image_id"] == 9
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    ids, scores = maxsim_reference(index, queries)
    assert [h["image_id"] for h in hits] == ids[:6].tolist()
    np.testing.assert_allclose([h["score"] for h in hits], scores[:6], atol=1e-4)
    assert [h["image_id"] for h in hits] == [h.image_id for h in index.search_like(9, top=6)]
    assert found["query"]["rep_index"] is None
    body["where"] = "image_id != 9"
    assert 9 not in [
        h["image_id"] for h in ok(post(f"{served_index}/api/search", json=body))["hits"]
    ]


def test_more_like_this_region(served_index: str, local) -> None:
    """A stored representative as the query: its own image comes first, matched by that
    same representative, with cosine ~1 (fp16 storage); the rest follow the reference."""
    index = local["vectors"]
    table = index.backend.table
    pos = int(np.flatnonzero(table.image_ids == 9)[0])
    row = int(table.offsets[pos]) + 5
    body = {"index": "vectors", "image_id": 9, "rep_index": int(table.slots[row]), "top": 5}
    hits = ok(post(f"{served_index}/api/search", json=body))["hits"]
    assert hits[0]["image_id"] == 9
    assert hits[0]["rep_index"] == int(table.slots[row])
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[0]["box"] == pytest.approx(table.boxes[row].tolist())
    ids, _ = reference_scores(index, table.vectors[row].astype(np.float32))
    assert [h["image_id"] for h in hits] == ids[:5].tolist()
    body["where"] = "image_id != 9"
    assert 9 not in [
        h["image_id"] for h in ok(post(f"{served_index}/api/search", json=body))["hits"]
    ]


def cell_weights(grid: int, box: list[float]) -> np.ndarray:
    """Share of each cell of a grid x grid raster covered by ``box`` (plain loops)."""
    x0, y0, x1, y1 = box
    out = np.zeros((grid, grid))
    for r in range(grid):
        for c in range(grid):
            cx0, cx1, cy0, cy1 = c / grid, (c + 1) / grid, r / grid, (r + 1) / grid
            w = max(0.0, min(cx1, x1) - max(cx0, x0)) * grid
            h = max(0.0, min(cy1, y1) - max(cy0, y0)) * grid
            out[r, c] = w * h
    return out


@pytest.mark.parametrize("box", [[0.1, 0.3, 0.6, 0.9], [0.26, 0.26, 0.49, 0.49], [0, 0, 1, 1]])
def test_drawn_region_is_the_cells_under_it(served_index: str, local, box) -> None:
    """A drawn box's query is normalise(Σ a_c x_c) over the image's stored cells x_c, a_c
    the share of cell c inside the box (NumPy loops here); its hits are the library's
    search with that vector. A box inside one cell is that cell: its image comes first
    with cosine ~1 (these cells are random vectors, so a wide box need not)."""
    index = local["vectors"]
    table = index.backend.table
    pos = int(np.flatnonzero(table.image_ids == 11)[0])
    rows = np.arange(table.offsets[pos], table.offsets[pos + 1])
    cells = table.vectors[rows[np.argsort(table.slots[rows])]].astype(np.float64)  # raster
    weights = cell_weights(4, box).reshape(-1, 1)
    q = unit((weights * cells).sum(axis=0)).astype(np.float32)
    body = {"index": "vectors", "image_id": 11, "box": box, "top": 6}
    found = ok(post(f"{served_index}/api/search", json=body))
    expected = index.search_vectors(torch.from_numpy(q)[None], 6)[0]
    assert [h["image_id"] for h in found["hits"]] == [h.image_id for h in expected]
    np.testing.assert_allclose(
        [h["score"] for h in found["hits"]], [h.score for h in expected], atol=1e-4
    )
    assert found["query"]["box"] == box
    if box == [0.26, 0.26, 0.49, 0.49]:
        assert found["hits"][0]["image_id"] == 11
        assert found["hits"][0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_bad_requests_under_load_fail_alone(served_index: str, local) -> None:
    """200 concurrent requests, every 10th a bad one (a huge integer, 300 nested
    parentheses, a huge region image_id, overflowing weights), batched together: every
    bad one is its own 4xx with its message, every good one the library's answer."""
    index = local["vectors"]
    texts = ["a red square", "a dog", "two cars", "grass", "a blue circle"]
    expected = {t: [h.image_id for h in index.search(t, 5, where="night = FALSE")] for t in texts}
    bad = [
        ({"params": {"q": "a", "where": "image_id = 99999999999999999999999"}}, 400),
        ({"params": {"q": "a", "where": "(" * 300 + "night" + ")" * 300}}, 400),
        ({"json": {"image_id": 10**23, "rep_index": 0}}, 422),
        ({"json": {"positive": ["a", "b"], "weights": [1e308, 1e308]}}, 422),
    ]

    async def run() -> list[tuple[int, httpx.Response]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=served_index, timeout=300, limits=limits) as http:
            tasks = []
            for i in range(200):
                if i % 10 == 9:
                    kwargs, _ = bad[(i // 10) % len(bad)]
                    kwargs = {k: {**v, "index": "vectors"} for k, v in kwargs.items()}
                    method = "POST" if "json" in kwargs else "GET"
                else:
                    params = {"q": texts[i % 5], "index": "vectors", "top": 5}
                    kwargs, method = {"params": params | {"where": "night = FALSE"}}, "GET"
                tasks.append(http.request(method, "/api/search", **kwargs))
            return list(enumerate(await asyncio.gather(*tasks)))

    for i, response in asyncio.run(run()):
        if i % 10 == 9:
            _, status = bad[(i // 10) % len(bad)]
            assert response.status_code == status, (i, response.text)
            assert isinstance(response.json()["detail"], str)
        else:
            assert response.status_code == 200, (i, response.text)
            ids = [h["image_id"] for h in response.json()["hits"]]
            assert ids == expected[texts[i % 5]], i


def test_search_by_uploaded_picture(served_index: str, local) -> None:
    """An upload is a multi-vector query: its representatives as the run's retriever
    encodes them, MaxSim over each image's (random ResNet weights blur images together,
    so the reference is the library's search_picture, not "the same image first";
    tests/test_multivector.py shows pictures finding themselves)."""
    index = local["dense"]
    path = image_file(index, 7)
    with open(path, "rb") as f:
        files = {"image": ("photo.jpg", f, "image/jpeg")}
        body = ok(
            post(f"{served_index}/api/search", files=files, data={"index": "dense", "top": "6"})
        )
    expected = index.search_picture(path, 6)
    assert [h["image_id"] for h in body["hits"]] == [h.image_id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected])
    assert body["query"]["image"] == "photo.jpg"
    assert body["query"]["width"] == 160


def decode(response: httpx.Response, kind: str) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == kind
    return Image.open(io.BytesIO(response.content))


def test_pictures_boxes_and_heatmaps(served_index: str, local) -> None:
    """Images by id: the file as is (JPEG), fitted into ``size``, a representative's box
    drawn in the gallery's yellow; the heatmap is a PNG of the same size."""
    base = f"{served_index}/api/images/vectors/4"
    assert decode(get(base), "image/jpeg").size == (160, 128)
    plain = decode(get(base, params={"size": 80}), "image/jpeg")
    assert plain.size == (80, 64)
    table = local["vectors"].backend.table
    row = int(table.offsets[np.flatnonzero(table.image_ids == 4)[0]]) + 5  # cell (1, 1)
    boxed = decode(get(base, params={"size": 80, "rep": int(table.slots[row])}), "image/jpeg")
    changed = np.abs(np.asarray(boxed, float) - np.asarray(plain, float)).sum(-1) > 90
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = table.boxes[row] * [80, 64, 80, 64]
    assert abs(xs.min() - x0) <= 3
    assert abs(ys.min() - y0) <= 3
    assert abs(xs.max() - x1) <= 3
    assert abs(ys.max() - y1) <= 3
    r, g, b = np.asarray(boxed.convert("RGB"), float)[changed].mean(0)
    assert r > g > b  # yellow on black (the gallery's box), not a random change
    heat = decode(get(f"{base}/heatmap", params={"q": "a dog", "size": 80}), "image/png")
    assert heat.size == (80, 64)
    dense = get(f"{served_index}/api/images/dense/3/heatmap", params={"q": "a red square"})
    assert decode(dense, "image/png").size == (160, 128)


BAD_REQUESTS = [
    ("GET", "/api/search", {"index": "dense"}, 422, r"query parameter 'q' is required"),
    ("GET", "/api/search", {"index": "dense", "q": "  "}, 422, r"q is empty"),
    (
        "GET",
        "/api/search",
        {"index": "dense", "q": "x" * 501},
        422,
        r"501 characters.*limit is 500",
    ),
    (
        "GET",
        "/api/search",
        {"index": "dense", "q": "a", "top": 0},
        422,
        r"'top'.*greater than or equal to 1",
    ),
    (
        "GET",
        "/api/search",
        {"index": "dense", "q": "a", "top": 1001},
        422,
        r"'top'.*less than or equal to 1000",
    ),
    (
        "GET",
        "/api/search",
        {"index": "dense", "q": "a", "top": "ten"},
        422,
        r"'top'.*valid integer.*'ten'",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a"},
        422,
        r"several indexes are served \(dense, vectors\): pass index=NAME",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a", "index": "nope"},
        404,
        r"unknown index 'nope'; served: dense, vectors",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a", "index": "vectors", "where": "colour = 'red'"},
        400,
        r"unknown column 'colour'.*camera",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a", "index": "vectors", "where": "camera = "},
        400,
        r"bad filter expression",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a", "index": "dense", "where": "width > 3"},
        400,
        r"only image_id can be filtered",
    ),
    (
        "POST",
        "/api/search",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        422,
        r"not valid JSON",
    ),
    ("POST", "/api/search", {"json": ["a dog"]}, 422, r"must be a JSON object"),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense"}},
        422,
        r"needs 'positive'.*'image_id'.*'rep_index'.*'box'",
    ),
    (
        "POST",
        "/api/search",
        {
            "json": {"index": "dense", "positive": []},
        },
        422,
        r"'positive'.*at least 1 item",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense", "positive": ["a"], "colour": 1}},
        422,
        r"'colour'.*[Ee]xtra inputs",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense", "positive": ["a", "b"], "weights": [1.0]}},
        422,
        r"weights has 1 values for 2 positive texts",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense", "positive": ["a"], "weights": [0.0]}},
        400,
        r"cancel out",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense", "positive": ["a"] * 17}},
        422,
        r"17 texts.*at most 16",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense", "positive": ["a"], "negative": [""]}},
        422,
        r"negative\[0\] is empty",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 999, "rep_index": 0}},
        404,
        r"image 999 is not in this index \(index 'vectors'\)",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 3, "rep_index": 99}},
        404,
        r"image 3 has no representative 99; its representatives are 0, 1",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 999}},
        404,
        r"image 999 is not in this index \(index 'vectors'\)$",
    ),
    (
        "POST",
        "/api/search",
        {"content": b"a dog", "headers": {"content-type": "text/plain"}},
        415,
        r"application/json.*multipart/form-data",
    ),
    (
        "POST",
        "/api/search",
        {"data": {"index": "dense"}, "files": {"other": ("a.txt", b"x")}},
        422,
        r"'image' is required",
    ),
    (
        "POST",
        "/api/search",
        {"data": {"index": "dense"}, "files": {"image": ("a.jpg", b"not an image at all")}},
        400,
        r"not an image",
    ),
    (
        "POST",
        "/api/search",
        {"data": {"index": "dense", "top": "0"}, "files": {"image": ("a.jpg", b"x")}},
        422,
        r"'top'",
    ),
    ("GET", "/api/images/vectors/999", {}, 404, r"image 999 is not in index 'vectors'"),
    ("GET", "/api/images/vectors/abc", {}, 422, r"'image_id'.*valid integer.*'abc'"),
    ("GET", "/api/images/vectors/..%2F..%2Fetc%2Fpasswd", {}, 404, r"no such endpoint"),
    ("GET", "/api/images/vectors/%2e%2e", {}, 422, r"'image_id'.*valid integer"),
    ("GET", "/api/images/vectors/3", {"size": 5000}, 422, r"'size'.*less than or equal to 2048"),
    ("GET", "/api/images/vectors/3", {"rep": 99}, 404, r"image 3 has no representative 99"),
    ("GET", "/api/images/nope/3", {}, 404, r"unknown index 'nope'"),
    ("GET", "/api/images/vectors/3/heatmap", {}, 422, r"'q' is required"),
    (
        "POST",
        "/api/search",
        {
            "content": b'{"positive": ["a"], "weights": [NaN]}',
            "headers": {"content-type": "application/json"},
        },
        422,
        r"'weights.0'.*finite",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "dense", "positive": ["a", "b"], "weights": [1e308, 1e308]}},
        422,
        r"not a finite number",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a", "index": "vectors", "where": "image_id = 99999999999999999999999"},
        400,
        r"integer 99999999999999999999999 is out of range",
    ),
    (
        "GET",
        "/api/search",
        {"q": "a", "index": "vectors", "where": "(" * 300 + "night" + ")" * 300},
        400,
        r"nested more than 64 levels deep",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 10**23, "rep_index": 0}},
        422,
        r"'image_id'.*less than or equal to 9223372036854775807",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 10**23, "box": [0, 0, 1, 1]}},
        422,
        r"'image_id'.*less than or equal to",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 3, "box": [0.5, 0.2, 0.5, 0.9]}},
        422,
        r"box \[0.5, 0.2, 0.5, 0.9\] has no area",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 3, "box": [0, 0, 1.5, 1]}},
        422,
        r"'box.2'.*less than or equal to 1",
    ),
    (
        "POST",
        "/api/search",
        {"json": {"index": "vectors", "image_id": 999, "box": [0, 0, 1, 1]}},
        404,
        r"image 999 is not in index 'vectors'",
    ),
    ("GET", "/api/images/vectors/99999999999999999999999", {}, 422, r"'image_id'.*less than"),
    ("GET", "/api/nothing", {}, 404, r"no such endpoint: /api/nothing"),
    ("DELETE", "/api/search", {}, 405, r"DELETE is not allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_one_json_message(served_index, method, path, kwargs, status, message):
    """Every malformed request is a 4xx whose body is {"detail": "one message"}."""
    if method == "GET" and kwargs:
        kwargs = {"params": kwargs}
    response = httpx.request(method, f"{served_index}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str), detail
    assert re.search(message, detail, re.S), detail


@pytest.fixture(scope="session", autouse=True)
def guarded_server(dense_run: Path, tmp_path_factory) -> Iterator[Server]:
    """A second server: a token, a 1 MB upload limit, ``global`` (plain CLIP, one vector
    per image: nothing to draw a heatmap on) and ``pooled`` (a Dense-CLIP retriever whose
    run stored one pooled vector per image instead of its cells, as Cluster-CLIP stores
    cluster means: cells are computed on demand). Autouse, so it is started before the
    shared server and both load side by side."""
    root = tmp_path_factory.mktemp("guarded")
    fingerprint = ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]
    images = Path(fingerprint["data"]["images"])
    run = write_vector_run(
        dense_run, root / "run", np.arange(1, 25), 3, images, grid=1, whole_image_clip=True
    )
    pooled = write_vector_run(dense_run, root / "pooled_run", np.arange(1, 25), 5, images, grid=1)
    folders = {
        "global": build_index(run, "exact", root / "global", "cpu", progress=False),
        "pooled": build_index(pooled, "exact", root / "pooled", "cpu", progress=False),
    }
    with Server(folders, token=TOKEN, args=("--max-upload-mb", "1")) as server:
        yield server


@pytest.fixture
def guarded(guarded_server: Server) -> str:
    return guarded_server.wait()


def test_token_guards_the_api_only(guarded: str) -> None:
    """With a token every /api request needs 'Authorization: Bearer TOKEN' (images may
    take ?token=); the health check, the page and the API docs stay open."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/api/indexes", "/api/search?q=a", "/api/images/global/3", "/api/stats"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = get(f"{guarded}{path}", headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "Authorization: Bearer TOKEN" in response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"
    assert ok(get(f"{guarded}/api/indexes", headers=bearer))["indexes"][0]["name"] == "global"
    assert get(f"{guarded}/api/images/global/3", params={"token": TOKEN}).status_code == 200
    assert get(f"{guarded}/api/images/global/3", params={"token": "wrong"}).status_code == 401
    assert get(f"{guarded}/api/search", params={"q": "a", "token": TOKEN}).status_code == 401
    assert get(f"{guarded}/healthz").status_code == 200
    assert get(f"{guarded}/docs").status_code == 200
    assert get(f"{guarded}/").status_code in (200, 404)  # the page, once installed


def test_upload_limits_and_global_heatmap(guarded: str) -> None:
    """Past --max-upload-mb: 413; a small file of too many pixels (a decompression bomb):
    413 before it is decoded; an index without cells: no heatmap, saying why."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    big = {"image": ("big.jpg", b"\xff" * (2 * 2**20), "image/jpeg")}
    response = post(f"{guarded}/api/search", files=big, headers=bearer)
    assert response.status_code == 413
    assert "larger than 1 MB" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        yield b"--x\r\nContent-Disposition: form-data; name=image; filename=a.jpg\r\n\r\n"
        for _ in range(40):
            yield b"\xff" * 65536

    response = post(
        f"{guarded}/api/search",
        content=chunks(),
        headers={**bearer, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 413
    assert "larger than 1 MB" in response.json()["detail"]
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 2**20
    bomb = {"image": ("bomb.png", buffer.getvalue(), "image/png")}
    response = post(f"{guarded}/api/search", files=bomb, data={"index": "global"}, headers=bearer)
    assert response.status_code == 413, response.text
    assert "8000 x 6000 = 48,000,000 pixels; the limit is 40,000,000" in response.json()["detail"]
    response = get(f"{guarded}/api/images/global/3/heatmap", params={"q": "a"}, headers=bearer)
    detail = response.json()["detail"]
    assert response.status_code == 404
    assert "whole-image embeddings, with no cells" in detail
    assert "Cluster-CLIP indexes have them" in detail
    assert "(exact)" not in detail


def test_heatmaps_without_stored_cells_are_computed_once(guarded: str) -> None:
    """An index whose run stored no cells (``pooled``; Cluster-CLIP alike) answers
    heatmaps by one backbone pass per image, cached: two queries on one image cost two
    text encodes and one pass; the PNG is the photo's size."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    before = ok(get(f"{guarded}/api/stats", headers=bearer))["indexes"]["pooled"]
    base = f"{guarded}/api/images/pooled/5"
    photo = decode(get(base, params={"size": 96}, headers=bearer), "image/jpeg")
    for q in ("a dog", "a red square"):
        heat = decode(
            get(f"{base}/heatmap", params={"q": q, "size": 96}, headers=bearer), "image/png"
        )
        assert heat.size == photo.size
    after = ok(get(f"{guarded}/api/stats", headers=bearer))["indexes"]["pooled"]
    assert after["model_calls"] - before["model_calls"] == 3


def test_computed_cells_equal_the_retrievers_forward_pass(serve_indexes, tmp_path) -> None:
    """ImageFiles.cells of an image whose run stored no cells is the retriever's own
    encode_dense of that picture (open_clip's forward pass, reshaped [h, w, D]), kept
    for the next call (one model call for two)."""
    from retrieval.data.images import load_image
    from retrieval.serve.images import ImageFiles
    from retrieval.serve.queries import Counters

    dense = open_index(serve_indexes["dense"], "cpu")
    counters = Counters()
    files = ImageFiles("dense", dense, counters)
    files._shard_rows = {}  # as if the run had stored no cells: computed from the picture
    path = image_file(dense, 4)
    retriever = dense.retriever()
    with torch.no_grad():
        out = retriever.encode_dense(retriever.image_transform(load_image(path))[None])
    expected = out.embeddings[0].reshape(*out.grid, -1)
    cells = files.cells(4)
    torch.testing.assert_close(cells, expected.float())
    assert files.cells(4) is cells
    assert counters.model_calls == 1
    stored = ImageFiles("dense", dense).cells(4)  # the run's own cells: the same features
    torch.testing.assert_close(stored, expected.float(), atol=2e-3, rtol=0)  # fp16 storage


def test_a_picture_swapped_for_a_symlink_out_of_the_root_is_refused(
    served_index: str, local, tmp_path: Path
) -> None:
    """After indexing, an image file replaced by a symlink to a file outside the run's
    image root is refused (403, saying why) for the picture and its heatmap, as the
    embed phase refuses it; put back, it is served again."""
    path = image_file(local["vectors"], 23)
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(secret)
    kept = path.with_name(".kept.jpg")
    path.rename(kept)
    path.symlink_to(secret)
    try:
        for url in ("/api/images/vectors/23", "/api/images/vectors/23/heatmap?q=a+dog"):
            response = get(f"{served_index}{url}")
            assert response.status_code == 403, response.text
            assert "outside the image root" in response.json()["detail"]
    finally:
        path.unlink()
        kept.rename(path)
    assert get(f"{served_index}/api/images/vectors/23").status_code == 200


def test_health_answers_while_batches_run(served_index: str) -> None:
    """Searches run off the event loop: /healthz answers while 48 heavy compound queries
    (16 distinct texts each) are in flight, and they share model calls (batching)."""
    before = ok(get(f"{served_index}/api/stats"))

    async def run() -> tuple[list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(base_url=served_index, timeout=120) as client:
            bodies = [
                {"index": "dense", "top": 24, "positive": [f"thing {i} {j}" for j in range(16)]}
                for i in range(48)
            ]
            tasks = [asyncio.create_task(client.post("/api/search", json=b)) for b in bodies]
            health = []
            while not all(t.done() for t in tasks):
                start = time.perf_counter()
                assert (await client.get("/healthz")).status_code == 200
                if not all(t.done() for t in tasks):
                    health.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)
            return [t.result() for t in tasks], health

    responses, health = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert health, "the searches finished before /healthz could be asked"
    after = ok(get(f"{served_index}/api/stats"))
    queries = after["queries"] - before["queries"]
    calls = after["indexes"]["dense"]["model_calls"] - before["indexes"]["dense"]["model_calls"]
    assert queries == 48
    assert calls < 48


def test_cli_refuses_open_host_without_token(capsys, monkeypatch, tmp_path: Path) -> None:
    """Listening beyond loopback without a token, or two indexes of one name, stop the
    command before anything loads, with one error line saying what to do."""
    monkeypatch.delenv("RETRIEVAL_API_TOKEN", raising=False)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "set RETRIEVAL_API_TOKEN" in capsys.readouterr().err
    assert main(["serve", f"a={tmp_path}", f"a={tmp_path}/x"]) == 2
    assert "two indexes are named 'a'" in capsys.readouterr().err
