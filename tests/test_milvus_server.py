"""The milvus backend against a real Milvus 2.3.5 server (tests/milvus_server.py).

2.3 ignores ``group_by_field``, hangs indexing fp16 vectors and answers FLAT over fp16
wrongly, so there the backend groups by image itself and stores float32. The
invariants: FLAT answers equal the exact backend's (ids, order, scores), each image
once; HNSW holds the recall it recorded; an update follows the run as a rebuild does; a
refused token, a missing collection, a hung server, a server stopped mid-build or
mid-search is one clear error, and the index (its data persisted by the server, the
run's shards untouched) works again once the server is back. The restarts come last:
they change the server under the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from milvus_server import MilvusTestServer, milvus_server  # noqa: F401 - the fixture
from test_index_update import (
    answers,
    assert_update_equals_rebuild,
    exact_truth,
    grow,
    make_run,
    near_queries,
    queries,
    shrink,
)

import retrieval.index.milvus_backend as milvus_backend
from retrieval.errors import ConfigError, IndexFileError
from retrieval.index import build_index, open_index, update_index
from retrieval.index.milvus_server_caps import lite_capabilities, server_capabilities
from retrieval.store import ShardStore

pymilvus = pytest.importorskip("pymilvus")
EVERY_INDEX = {"FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"}


@pytest.fixture(scope="module")
def server(milvus_server: MilvusTestServer) -> Iterator[MilvusTestServer]:  # noqa: F811
    """The session's server, with its token in ``MILVUS_TOKEN`` for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MILVUS_TOKEN", milvus_server.token)
        yield milvus_server


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def build(run: Path, out: Path, server: MilvusTestServer, collection: str, **options: Any) -> Path:
    """A milvus index of ``run`` in ``collection`` on the server (FLAT unless given)."""
    options = {"index_type": "FLAT", **options}
    return build_index(
        run,
        "milvus",
        out,
        "cpu",
        recall_k=10,
        recall_target=0.9,
        num_queries=100,
        progress=False,
        uri=server.uri,
        collection=collection,
        **options,
    )


@pytest.fixture(scope="module")
def flat(run: Path, server: MilvusTestServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(run, tmp_path_factory.mktemp("flat") / "ix", server, "flat")


@pytest.fixture(scope="module")
def exact(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exact") / "ix"
    return build_index(run, "exact", out, "cpu", progress=False)


def same_answers(got: Path, want: Path, q: torch.Tensor, k: int) -> None:
    """Same images in the same order with the same scores; each image once."""
    got_ids, got_scores = answers(got, q, k)
    want_ids, want_scores = answers(want, q, k)
    assert all(len(set(ids)) == len(ids) == k for ids in got_ids)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


@pytest.mark.parametrize(
    ("reported", "lite", "group_by", "fp16"),
    [
        ("v2.3.5-lite", False, False, set()),  # the PyPI milvus server tested here
        ("v2.4.0", False, True, EVERY_INDEX),
        ("Zilliz Cloud (compatible with Milvus 2.5)", False, True, EVERY_INDEX),
        ("unknown", False, False, set()),
        ("3.2.2", True, True, set()),  # milvus-lite 3.x: pure Python, float32
        ("2.5.1", True, True, {"FLAT", "IVF_FLAT"}),
        ("2.4.10", True, False, set()),
    ],
)
def test_capabilities_from_version(
    reported: str, lite: bool, group_by: bool, fp16: set[str]
) -> None:
    """What the backend decides from a version: group-by from 2.4 (and milvus-lite 2.5
    on), fp16 only where known to work; anything unknown gets the safe choices."""
    caps = lite_capabilities(reported) if lite else server_capabilities(reported)
    assert (caps.group_by, caps.fp16_indexes) == (group_by, fp16)


def test_server_is_2_3_on_loopback_and_backend_records_its_choices(
    server: MilvusTestServer, flat: Path
) -> None:
    """The server reports 2.3; every component advertises loopback, so all its traffic
    stays there (each connection's both ends), and etcd listens on loopback only. The
    index records the engine, the client grouping and float32 vectors."""
    client = pymilvus.MilvusClient(uri=server.uri, token=server.token, timeout=10)
    assert client.get_server_version(timeout=10).startswith("v2.3.5")
    client.close()
    listening = {row[2] for row in server.sockets("listening")}  # local address:port
    for key in ("etcd_port", "etcd_peer_port"):
        assert f"127.0.0.1:{server.ports[key]}" in listening
    assert f"*:{server.ports['proxy_port']}" in listening  # 2.3: not configurable
    connected = server.sockets("established")
    assert connected
    assert all(
        e.rsplit(":", 1)[0].strip("[]").endswith("127.0.0.1") for r in connected for e in r[2:4]
    )
    state = json.loads((flat / "index.json").read_text())["backend_state"]
    assert state["engine"] == "Milvus server v2.3.5-lite"
    assert (state["grouping"], state["vector_type"]) == ("client", "float")
    assert "token" not in json.dumps(state).lower()


def test_server_ignores_group_by(server: MilvusTestServer, flat: Path) -> None:
    """Why the backend groups itself on 2.3: a grouped search returns images again."""
    client = pymilvus.MilvusClient(uri=server.uri, token=server.token, timeout=10)
    q = queries(5, seed=1).numpy()
    found = client.search(
        "flat", data=list(q), limit=20, group_by_field="image", output_fields=["image"]
    )
    client.close()
    assert any(len({h["entity"]["image"] for h in hits}) < 20 for hits in found)


@pytest.mark.parametrize("k", [10, 60])
def test_flat_equals_exact(flat: Path, exact: Path, k: int) -> None:
    """FLAT + client grouping answers as the exact backend does, at a top the tuned
    over-fetch covers and at one that needs fetching again."""
    same_answers(flat, exact, queries(30, seed=2), k)
    assert json.loads((flat / "index.json").read_text())["recall"]["value"] == 1.0


def test_client_grouping_refetches_and_falls_back(
    flat: Path, exact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An over-fetch of one representative per image fetches again until k images come;
    capped below k images (Milvus's top-k limit), a query is answered exactly. Filtered
    searches (Milvus's own filter on the image field) equal the exact backend's too."""
    q = queries(20, seed=3)
    want = [[h.image_id for h in f] for f in open_index(exact, "cpu").search_vectors(q, 25)]
    with open_index(flat, "cpu") as index:
        index.backend.engine.options.overfetch = 1
        assert [[h.image_id for h in f] for f in index.search_vectors(q, 25)] == want
        monkeypatch.setattr(milvus_backend, "LIMIT_MAX", 30)
        assert [[h.image_id for h in f] for f in index.search_vectors(q, 25)] == want
        monkeypatch.undo()
        allowed = np.arange(0, 1120, 3)
        got = index.backend.search(q, 15, allowed=allowed)
    with open_index(exact, "cpu") as index:
        truth = index.backend.search(q, 15, allowed=allowed)
    assert [[h.image_id for h in f] for f in got] == [[h.image_id for h in f] for f in truth]


@pytest.mark.slow
def test_hnsw_recall_meets_recorded(run: Path, server: MilvusTestServer, tmp_path: Path) -> None:
    """HNSW (float32 on 2.3), tuned at build, holds its recorded recall
    on 200 fresh queries of the kind it was measured with, within sampling noise."""
    index = build(run, tmp_path / "hnsw", server, "hnsw", index_type="HNSW")
    manifest = json.loads((index / "index.json").read_text())
    state, recorded = manifest["backend_state"], manifest["recall"]
    assert (state["vector_type"], state["grouping"]) == ("float", "client")
    assert recorded["queries"] > 0
    assert recorded["value"] >= 0.85
    q = near_queries(index, 200, seed=14)
    found, _ = answers(index, q, 10)
    truth = exact_truth(index, q, 10)
    recall = np.mean([len(set(f) & t) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= recorded["value"] - 0.05
    assert all(len(set(f)) == 10 for f in found)


def test_fp16_and_server_group_by_are_refused(
    run: Path, server: MilvusTestServer, tmp_path: Path
) -> None:
    """What 2.3 cannot do is refused before a collection is made, naming the fix: fp16
    vectors (it hangs indexing them, and FLAT over them answers wrongly) and its own
    group-by."""
    for kind in ("HNSW", "FLAT"):
        with pytest.raises(
            ConfigError,
            match=rf"v2\.3\.5-lite at {server.uri} cannot store float16 vectors for a {kind} "
            r"index: pass --option vector_type=auto",
        ):
            build(run, tmp_path / kind, server, "fp16", index_type=kind, vector_type="float16")
    with pytest.raises(ConfigError, match="ignores group_by_field .* group_by=auto"):
        build(run, tmp_path / "grouped", server, "grouped", group_by="server")
    client = pymilvus.MilvusClient(uri=server.uri, token=server.token, timeout=10)
    assert not {"fp16", "grouped"} & set(client.list_collections())
    client.close()
    assert not any(tmp_path.iterdir())


def test_wrong_token_and_unknown_collection(
    flat: Path, server: MilvusTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line each, naming the server and what to do."""
    monkeypatch.setenv("MILVUS_TOKEN", "root:wrong")
    with pytest.raises(IndexFileError) as refused:
        open_index(flat, "cpu")
    assert str(refused.value) == (
        f"Milvus at {server.uri} refused the token (MILVUS_TOKEN is set) when asked to "
        f"connect: set MILVUS_TOKEN to a valid 'user:password' or API key"
    )
    monkeypatch.setenv("MILVUS_TOKEN", server.token)
    copy = tmp_path / "copy"
    shutil.copytree(flat, copy)
    manifest = json.loads((copy / "index.json").read_text())
    manifest["backend_state"]["collection"] = "nope"
    (copy / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError) as missing:
        open_index(copy, "cpu")
    assert str(missing.value) == (
        f"Milvus collection 'nope' is missing from {server.uri}; rebuild the index with "
        f"`retrieval index build RUN_DIR --backend milvus --out {copy}`"
    )
    manifest["backend_state"].update(collection="flat", vector_type="float16")  # an old build
    (copy / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(
        IndexFileError,
        match=f"stores float16 vectors with a FLAT index, which "
        f"Milvus server v2.3.5-lite at {server.uri} does not search correctly",
    ):
        open_index(copy, "cpu")


def test_hung_server_times_out(flat: Path, server: MilvusTestServer) -> None:
    """A server that stops answering (SIGSTOP) ends a search at the timeout with one
    clear error, and the index answers again once it resumes."""
    q = queries(3, seed=7)
    with open_index(flat, "cpu") as index:
        before = [[h.image_id for h in f] for f in index.search_vectors(q, 10)]
        index.backend.engine.options.timeout = 2
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(IndexFileError) as hung:
                index.search_vectors(q, 10)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert str(hung.value).startswith(
            f"Milvus at {server.uri} did not search collection 'flat' within 2 s: it is down, "
            f"hung or still starting"
        )
        index.backend.engine.options.timeout = 60
        assert [[h.image_id for h in f] for f in index.search_vectors(q, 10)] == before


@pytest.mark.slow
def test_update_equals_rebuild(server: MilvusTestServer, tmp_path: Path) -> None:
    """Insert and delete on the server follow the run as a rebuild does: the same top
    images and scores (FLAT), a new image found at once, a removed one never."""
    run = make_run(tmp_path / "run")
    index = build(run, tmp_path / "ix", server, "upd")
    grow(run, np.arange(2000, 2024), seed=9)
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (24, 0, 1)
    assert_update_equals_rebuild("exact", index, build(run, tmp_path / "re1", server, "re1"))
    store = ShardStore(run / "embeddings")  # a query at a new image's representative
    shard = store.read_shard(store.shard_paths()[-1])
    probe = shard.reps.embeddings[3][shard.reps.mask[3]][0].float()
    found, _ = answers(index, probe.unsqueeze(0), 10)
    assert int(shard.image_ids[3]) in found[0]
    gone = np.concatenate([np.arange(0, 120, 5), [2001, 2002]])
    shrink(run, gone)
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (0, 25, 2)
    assert_update_equals_rebuild("exact", index, build(run, tmp_path / "re2", server, "re2"))
    returned, _ = answers(index, queries(40, seed=3), 200)
    assert set(gone.tolist()).isdisjoint({i for f in returned for i in f})


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stop_on(
    monkeypatch: pytest.MonkeyPatch, server: MilvusTestServer, verb: str, calls: int
) -> None:
    """Stops the server as the backend makes its ``calls``-th request whose description
    starts with ``verb`` (after the earlier ones went through)."""
    real = milvus_backend.MilvusBackend._call
    seen = []

    def call(self: Any, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        if what.startswith(verb):
            seen.append(what)
            if len(seen) == calls:
                server.stop()
        return real(self, what, method, *args, **kwargs)

    monkeypatch.setattr(milvus_backend.MilvusBackend, "_call", call)


@pytest.mark.slow
def test_server_stopped_mid_search_then_back(
    flat: Path, server: MilvusTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server dies between two batches of one search: a clear error naming it. Once
    it is back, the index opens and answers as before (the server persisted it)."""
    q = queries(100, seed=5)  # two requests of SEARCH_QUERIES
    before = answers(flat, q, 10)
    with open_index(flat, "cpu") as index:
        stop_on(monkeypatch, server, "search", 2)
        with pytest.raises(IndexFileError, match=f"cannot reach Milvus at {server.uri} to search"):
            index.search_vectors(q, 10)
        monkeypatch.undo()
    server.start()
    assert answers(flat, q, 10) == before


@pytest.mark.slow
def test_server_stopped_mid_build_then_back(
    run: Path,
    flat: Path,
    server: MilvusTestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server dies while a build inserts: a clear error naming it, no index folder
    (nor a half one) left, the run's shards untouched. Once it is back, the earlier
    index answers as before and the build succeeds."""
    q = queries(30, seed=6)
    before = answers(flat, q, 10)
    shards = digest(run)
    out = tmp_path / "crashed"
    monkeypatch.setattr(milvus_backend, "INSERT_ROWS", 200)
    stop_on(monkeypatch, server, "insert", 2)
    with pytest.raises(IndexFileError, match=f"cannot reach Milvus at {server.uri} to insert"):
        build(run, out / "ix", server, "crashed")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) in ([], [out])
    assert not any(out.iterdir())
    assert digest(run) == shards
    server.start()
    assert answers(flat, q, 10) == before
    rebuilt = build(run, out / "ix", server, "crashed")
    same_answers(rebuilt, flat, q, 10)
