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
        assert Path(hit["path"]).name == hit["file_name"] and Path(hit["path"]).exists()


def test_health_and_index_listing(served_index: str, serve_indexes: dict[str, Path]) -> None:
    """/healthz answers; /api/indexes lists both indexes with what the page needs."""
    assert ok(get(f"{served_index}/healthz")) == {"status": "ok"}
    listed = {i["name"]: i for i in ok(get(f"{served_index}/api/indexes"))["indexes"]}
    assert set(listed) == {"dense", "vectors"}
    dense, vectors = listed["dense"], listed["vectors"]
    assert dense["backend"] == "exact" and vectors["backend"] == "faiss"
    assert dense["retriever"]["name"] == "dense_clip" and dense["embed_dim"] == 64
    assert dense["images"] == 24 and dense["representatives"] == 24 * 16
    assert dense["recall"]["value"] == 1.0 and dense["generation"] == 0
    assert dense["metadata_columns"] == ["image_id"]
    assert {"image_id", "camera", "night", "width"} <= set(vectors["metadata_columns"])
    assert dense["random_weights"] is True
    docs = get(f"{served_index}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
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
    assert body["index"] == name and body["query"] == {"q": query, "where": where}
    assert body["top"] == min(top, 24) and body["took_ms"] > 0
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
    assert found["query"]["positive"] == positive and found["query"]["negative"] == negative


def test_more_like_this_region(served_index: str, local) -> None:
    """A stored representative as the query: its own image comes first, matched by that
    same representative, with cosine ~1 (fp16 storage); the rest follow the reference."""
    index = local["vectors"]
    table = index.backend.table
    pos = int(np.flatnonzero(table.image_ids == 9)[0])
    row = int(table.offsets[pos]) + 5
    body = {"index": "vectors", "image_id": 9, "rep_index": int(table.slots[row]), "top": 5}
    hits = ok(post(f"{served_index}/api/search", json=body))["hits"]
    assert hits[0]["image_id"] == 9 and hits[0]["rep_index"] == int(table.slots[row])
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[0]["box"] == pytest.approx(table.boxes[row].tolist())
    ids, _ = reference_scores(index, table.vectors[row].astype(np.float32))
    assert [h["image_id"] for h in hits] == ids[:5].tolist()
    body["where"] = "image_id != 9"
    assert 9 not in [
        h["image_id"] for h in ok(post(f"{served_index}/api/search", json=body))["hits"]
    ]


def test_search_by_uploaded_picture(served_index: str, local) -> None:
    """An upload's query is the normalised mean of its representatives as the run's
    retriever encodes them (random weights blur images together, so the reference is the
    library's search with that vector, not "the same image first")."""
    index = local["dense"]
    path = image_file(index, 7)
    with open(path, "rb") as f:
        files = {"image": ("photo.jpg", f, "image/jpeg")}
        body = ok(
            post(f"{served_index}/api/search", files=files, data={"index": "dense", "top": "6"})
        )
    retriever = index.retriever()
    with torch.no_grad():
        reps = retriever.encode_images(
            retriever.image_transform(Image.open(path).convert("RGB"))[None]
        )
    q = torch.nn.functional.normalize(reps.embeddings[0][reps.mask[0]].mean(0), dim=0)
    expected = index.search_vectors(q[None], 6)[0]
    assert [h["image_id"] for h in body["hits"]] == [h.image_id for h in expected]
    assert body["query"]["image"] == "photo.jpg" and body["query"]["width"] == 160


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
    assert abs(xs.min() - x0) <= 3 and abs(ys.min() - y0) <= 3
    assert abs(xs.max() - x1) <= 3 and abs(ys.max() - y1) <= 3
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
        r"bad --where expression",
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
        r"needs 'positive'.*'image_id' and 'rep_index'",
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
        {"json": {"index": "vectors", "image_id": 3}},
        422,
        r"'rep_index' is required",
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
    assert isinstance(detail, str) and re.search(message, detail, re.S), detail


@pytest.fixture(scope="session", autouse=True)
def guarded_server(dense_run: Path, tmp_path_factory) -> Iterator[Server]:
    """A second server: a token, a 1 MB upload limit, and a one-vector-per-image index
    (no cell grid: nothing to draw a heatmap on). Autouse, so it is started before the
    shared server and both load side by side."""
    root = tmp_path_factory.mktemp("guarded")
    fingerprint = ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]
    images = Path(fingerprint["data"]["images"])
    run = write_vector_run(dense_run, root / "run", np.arange(1, 25), 3, images, grid=1)
    folders = {"global": build_index(run, "exact", root / "global", "cpu", progress=False)}
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
    assert response.status_code == 413 and "larger than 1 MB" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        yield b"--x\r\nContent-Disposition: form-data; name=image; filename=a.jpg\r\n\r\n"
        for _ in range(40):
            yield b"\xff" * 65536

    response = post(
        f"{guarded}/api/search",
        content=chunks(),
        headers={**bearer, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 413 and "larger than 1 MB" in response.json()["detail"]
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 2**20
    bomb = {"image": ("bomb.png", buffer.getvalue(), "image/png")}
    response = post(f"{guarded}/api/search", files=bomb, headers=bearer)
    assert response.status_code == 413, response.text
    assert "8000 x 6000 = 48,000,000 pixels; the limit is 40,000,000" in response.json()["detail"]
    response = get(f"{guarded}/api/images/global/3/heatmap", params={"q": "a"}, headers=bearer)
    assert response.status_code == 404 and "no cell grid" in response.json()["detail"]


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
    assert queries == 48 and calls < 48


def test_cli_refuses_open_host_without_token(capsys, monkeypatch, tmp_path: Path) -> None:
    """Listening beyond loopback without a token, or two indexes of one name, stop the
    command before anything loads, with one error line saying what to do."""
    monkeypatch.delenv("RETRIEVAL_API_TOKEN", raising=False)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "set RETRIEVAL_API_TOKEN" in capsys.readouterr().err
    assert main(["serve", f"a={tmp_path}", f"a={tmp_path}/x"]) == 2
    assert "two indexes are named 'a'" in capsys.readouterr().err
