"""Indexes that grow and shrink: `retrieval index update` follows a run's collection.

The invariant: after images are added to the run and after some are removed, an updated
index answers as a fresh build over the changed run does (the same top images and
scores on the exact backends; at least its recorded recall on the approximate ones), a
removed image is never returned and a new one is returned right after the update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fake_runs
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from retrieval import registry
from retrieval.errors import IndexFileError
from retrieval.index import build_index, open_index, update_index
from retrieval.index.base import create_backend
from retrieval.index.engine import Engine
from retrieval.index.kernels import RowHits, exact_search
from retrieval.index.manifest import IndexFolder
from retrieval.representatives import Representatives
from retrieval.store import ShardStore

DIM = 32
R = 6
FINGERPRINT = {"retriever": {"name": "fake", "dim": DIM}, "dtype": "float16"}
BACKENDS = ("exact", "faiss-flat", "faiss-ivfpq", "faiss-ivfpqfs", "faiss-rabitq", "lancedb")
EXACT = ("exact", "faiss-flat")
SLACK = 0.1  # recall may fall this far below the recorded value on other queries


def random_reps(images: int, seed: int) -> Representatives:
    return fake_runs.random_reps(images, R, seed, DIM, valid_slot=2)


def write_collection(run: Path, ids: np.ndarray, removed: np.ndarray) -> None:
    fake_runs.write_collection(run, ids, removed)


def read_collection(run: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(run / "images.parquet")
    return table.column("image_id").to_numpy(), table.column("removed").to_numpy(False)


def grow(run: Path, ids: np.ndarray, seed: int) -> None:
    """New files embedded: a new shard with new ids, rows added to the collection."""
    store = ShardStore(run / "embeddings")
    name = f"rank000-{len(store.shard_paths()):05d}"
    store.write_shard(name, torch.from_numpy(ids), random_reps(len(ids), seed))
    old_ids, old_removed = read_collection(run)
    write_collection(
        run, np.concatenate([old_ids, ids]), np.concatenate([old_removed, np.zeros(len(ids))])
    )


def shrink(run: Path, ids: np.ndarray) -> None:
    """Files deleted: their ids marked removed (shards are never rewritten)."""
    all_ids, removed = read_collection(run)
    write_collection(run, all_ids, removed | np.isin(all_ids, ids))


def make_run(root: Path) -> Path:
    """240 images in two shards (ids 0..119, 1000..1119), ids 5 and 1005 removed."""
    store = ShardStore(root / "embeddings")
    parts = [np.arange(120), np.arange(1000, 1120)]
    for i, ids in enumerate(parts):
        store.write_shard(f"rank000-{i:05d}", torch.from_numpy(ids), random_reps(len(ids), i))
    store.write_manifest(fingerprint=FINGERPRINT)
    ids = np.concatenate(parts)
    write_collection(root, ids, np.isin(ids, [5, 1005]))
    return root


def queries(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def answers(folder: Path, q: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    with open_index(folder, "cpu") as index:
        hits = index.search_vectors(q, k)
    return [[h.image_id for h in f] for f in hits], [[h.score for h in f] for f in hits]


def build(run: Path, backend: str, out: Path) -> Path:
    return build_index(
        run, backend, out, "cpu", recall_k=10, recall_target=0.9, num_queries=100, progress=False
    )


def near_queries(folder: Path, n: int, seed: int) -> torch.Tensor:
    """Live representatives of an index plus noise."""
    g = torch.Generator().manual_seed(seed)
    with open_index(folder, "cpu") as index:
        table = index.backend.require_table()
        live = table.live_rows
        rows = live[torch.randint(len(live), (n,), generator=g).numpy()]
        near = torch.from_numpy(table.vectors[rows].astype(np.float32))
    noise = F.normalize(torch.randn(near.shape, generator=g), dim=1)
    return F.normalize(near + 0.5 * noise, dim=1)


def exact_truth(folder: Path, q: torch.Tensor, k: int) -> list[set[int]]:
    """Top ``k`` image ids by exact search over the index's own (live) table."""
    with open_index(folder, "cpu") as index:
        table = index.backend.require_table()
        return [
            set(table.image_ids[table.owner[rows]].tolist())
            for rows, _ in exact_search(table, q, k, "cpu")
        ]


def assert_update_equals_rebuild(backend: str, updated: Path, rebuilt: Path) -> None:
    """Same top images and scores (exact backends), or the recorded recall (approximate)."""
    q = queries(30, seed=7)
    k = 20
    got_ids, got_scores = answers(updated, q, k)
    want_ids, want_scores = answers(rebuilt, q, k)
    up = json.loads((updated / "index.json").read_text())
    re = json.loads((rebuilt / "index.json").read_text())
    assert up["images"] == re["images"]
    assert up["representatives"] == re["representatives"]
    if backend in EXACT:
        assert got_ids == want_ids
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)
        assert up["recall"]["value"] == 1.0
        return
    # the kind of queries recall is recorded with: stored representatives plus noise
    k = up["recall"]["k"]
    q = near_queries(rebuilt, 100, seed=8)
    got_ids, _ = answers(updated, q, k)
    truth = exact_truth(rebuilt, q, k)
    recall = np.mean([len(set(g) & t) / len(t) for g, t in zip(got_ids, truth, strict=True)])
    assert recall >= up["recall"]["value"] - SLACK, (recall, up["recall"])
    assert up["recall"]["queries"] > 0
    assert "source" in up["recall"]


def all_ids(folder: Path) -> set[int]:
    """Every image a search for many queries at a large k returns."""
    ids, _ = answers(folder, queries(40, seed=3), 500)
    return {i for found in ids for i in found}


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_equals_rebuild_after_add_and_delete(backend: str, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    index = build(run, backend, tmp_path / "ix")
    assert json.loads((index / "index.json").read_text())["images"] == 238  # live only
    assert {5, 1005}.isdisjoint(all_ids(index))

    new = np.arange(2000, 2024)  # 10%
    grow(run, new, seed=9)
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (24, 0, 1)
    assert result.added_representatives > 24
    assert result.images == 262
    assert_update_equals_rebuild(backend, index, build(run, backend, tmp_path / "rebuilt1"))
    # a new image is found right after the update: a query at one of its representatives
    store = ShardStore(run / "embeddings")
    shard = store.read_shard(store.shard_paths()[-1])
    probe = shard.reps.embeddings[3][shard.reps.mask[3]][0].float()
    found, _ = answers(index, probe.unsqueeze(0), 10)
    assert int(shard.image_ids[3]) in found[0]

    gone = np.concatenate([np.arange(0, 120, 5), [2001, 2002]])  # 26 images, 10%
    shrink(run, gone)
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (0, 25, 2)  # 5: already gone
    assert_update_equals_rebuild(backend, index, build(run, backend, tmp_path / "rebuilt2"))
    returned = all_ids(index)
    assert set(gone.tolist()).isdisjoint(returned)
    assert {5, 1005}.isdisjoint(returned)

    manifest = json.loads((index / "index.json").read_text())
    assert manifest["generation"] == 2
    assert [h["added"] for h in manifest["history"]] == [24, 0]
    assert [h["removed"] for h in manifest["history"]] == [0, 25]
    assert all(h["seconds"] > 0 for h in manifest["history"])
    assert manifest["removed_representatives"] > 0  # tombstoned rows, until a rebuild
    # the previous generations' tables are gone; faiss keeps its build's segment and
    # one per update that added images (a removal writes none)
    names = {p.name for p in index.iterdir()}
    assert "table.npz" not in names
    assert "table.1.npz" not in names
    assert "table.2.npz" in names
    if backend.startswith("faiss"):
        assert manifest["backend_state"]["segments"] == [0, 1]
        assert {"faiss.index", "faiss.1.index"} <= names
        assert "faiss.2.index" not in names
    assert set(manifest["files"]) <= {str(p.relative_to(index)) for p in index.rglob("*")}


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivfpq", "lancedb"])
def test_several_updates_merge(backend: str, tmp_path: Path) -> None:
    """Two updates that add (two faiss segments, two LanceDB adds), then one removing
    images of both the build and the first update: still what a rebuild answers."""
    run = make_run(tmp_path / "run")
    index = build(run, backend, tmp_path / "ix")
    grow(run, np.arange(2000, 2010), seed=11)
    update_index(index, progress=False, device="cpu")
    grow(run, np.arange(3000, 3010), seed=12)
    update_index(index, progress=False, device="cpu")
    gone = np.array([1, 2, 1001, 2000, 2003, 3005])
    shrink(run, gone)
    result = update_index(index, progress=False, device="cpu")
    assert (result.removed, result.generation) == (6, 3)
    if backend.startswith("faiss"):
        state = json.loads((index / "index.json").read_text())["backend_state"]
        assert state["segments"] == [0, 1, 2]
    assert_update_equals_rebuild(backend, index, build(run, backend, tmp_path / "rebuilt"))
    assert set(gone.tolist()).isdisjoint(all_ids(index))
    assert {2001, 3001} <= all_ids(index)


@pytest.mark.parametrize("backend", ["exact", "faiss-ivfpq"])
def test_unchanged_run_is_a_no_op(backend: str, tmp_path: Path) -> None:
    """Nothing to add or remove: nothing is written, the generation stays."""
    run = make_run(tmp_path / "run")
    index = build(run, backend, tmp_path / "ix")
    before = {p: p.stat().st_mtime_ns for p in index.rglob("*") if p.is_file()}
    result = update_index(index, progress=False, device="cpu")
    assert not result.changed
    assert result.generation == 0
    assert result.images == 238
    assert {p: p.stat().st_mtime_ns for p in index.rglob("*") if p.is_file()} == before
    shrink(run, np.array([7]))
    assert update_index(index, progress=False, device="cpu").generation == 1
    assert not update_index(index, progress=False, device="cpu").changed


def test_update_of_another_run_or_reembedded_run_is_refused(tmp_path: Path) -> None:
    """An index follows the run it was built from, with the embeddings it was built
    from: another run, or the run re-embedded with other settings, is one clear error
    naming both and the rebuild command."""
    run = make_run(tmp_path / "run")
    other = make_run(tmp_path / "other")
    index = build(run, "faiss-flat", tmp_path / "ix")
    with pytest.raises(
        IndexFileError, match=rf"built from run {run}, not {other}.*retrieval index build {other}"
    ):
        update_index(index, progress=False, device="cpu", run_dir=other)
    ShardStore(run / "embeddings").write_manifest(
        fingerprint={"retriever": {"name": "clip", "dim": DIM}, "dtype": "float16"}
    )
    with pytest.raises(
        IndexFileError,
        match=r"retriever \{[^}]*'name': 'fake'\}.*now holds embeddings of \{[^}]*'clip'\}.*"
        rf"retriever.name: stored 'fake', now 'clip'.*retrieval index build {run} "
        rf"--backend faiss-flat --out {index}",
    ):
        update_index(index, progress=False, device="cpu")
    assert json.loads((index / "index.json").read_text())["generation"] == 0


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivfpq", "lancedb"])
def test_killed_update_leaves_previous_index_usable(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update killed after writing everything but the manifest (the commit point):
    the index still opens at its previous generation and answers as before, and the
    next update completes as if the first had never run."""
    run = make_run(tmp_path / "run")
    index = build(run, backend, tmp_path / "ix")
    q = queries(10, seed=5)
    before = answers(index, q, 15)
    grow(run, np.arange(3000, 3030), seed=4)
    shrink(run, np.arange(0, 30))

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexFolder, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        update_index(index, progress=False, device="cpu")
    monkeypatch.undo()
    assert json.loads((index / "index.json").read_text())["generation"] == 0
    assert answers(index, q, 15) == before  # the vectors' tail and new files are ignored
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (30, 29, 1)  # 5: gone
    assert_update_equals_rebuild(backend, index, build(run, backend, tmp_path / "rebuilt"))


def test_labelled_run_grows_by_new_shards(dense_run: Path, tmp_path: Path) -> None:
    """A labelled run (no images.parquet: every stored image is live) updates when new
    shards appear; its images are all kept."""
    run = tmp_path / "run"
    shutil.copytree(dense_run, run, ignore=shutil.ignore_patterns("wandb", "index"))
    index = build_index(run, "exact", tmp_path / "ix", "cpu", progress=False)
    store = ShardStore(run / "embeddings")
    first = store.read_shard(store.shard_paths()[0])
    old_ids = set(ShardStore(run / "embeddings").accounted_ids().tolist())
    new_ids = torch.from_numpy(first.image_ids + 100_000)
    store.write_shard("rank000-99999", new_ids, first.reps)
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (len(new_ids), 0, 1)
    with open_index(index, "cpu") as opened:
        hits = opened.search("circle", top=len(old_ids) + len(new_ids))
        assert {h.image_id for h in hits} == old_ids | set(new_ids.tolist())
        assert "generation 1" in opened.describe()


def test_cli_update_prints_changes_and_info_shows_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retrieval.cli import build_parser

    parser = build_parser()

    def cli(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    run = make_run(tmp_path / "run")
    index = build(run, "faiss-ivfpq", tmp_path / "ix")
    assert json.loads(cli("index", "info", str(index), "--json"))["generation"] == 0
    grow(run, np.arange(5000, 5010), seed=2)
    shrink(run, np.array([1, 2, 3]))
    out = cli("index", "update", str(index), "--no-progress")
    assert "+10 images" in out
    assert "-3 images" in out
    assert "generation 1" in out
    assert "recall@10" in out
    assert json.loads(cli("index", "info", str(index), "--json"))["generation"] == 1
    assert "no change" in cli("index", "update", str(index), "--no-progress")


def test_backend_without_update_hooks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin engine that does not declare itself updatable cannot be grown or shrunk:
    a clear error saying to rebuild, before anything is written."""

    class Plugin(Engine):
        def build(self, progress: bool) -> None:
            pass

        def search(self, queries: torch.Tensor, k: int) -> list[RowHits]:
            return []

    monkeypatch.setitem(registry.INDEX_BACKENDS.factories, "plugin", Plugin)
    monkeypatch.setitem(registry.INDEX_BACKENDS.defaults, "plugin", {})
    backend = create_backend("plugin", tmp_path / "ix", DIM)
    backend.add(np.arange(4), random_reps(4, seed=0))
    backend.finish()
    files = sorted(p.name for p in (tmp_path / "ix").iterdir())
    for change in (
        lambda: backend.add(np.arange(4, 6), random_reps(2, seed=1)),
        lambda: backend.remove(np.arange(2)),
    ):
        with pytest.raises(IndexFileError, match="'plugin' cannot add or remove.*rebuild"):
            change()
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == files


def test_an_index_of_format_1_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    """Index format 1 (before updates: no generation, recall settings or history) was
    never released, so its compatibility branches are gone: opening, updating or
    describing such an index fails with one error naming its format and the command that
    rebuilds it, and leaves the folder as it was; that command then replaces it."""
    from retrieval.cli import main
    from retrieval.index.manifest import FORMAT

    run = make_run(tmp_path / "run")
    index = build(run, "exact", tmp_path / "ix")
    manifest = json.loads((index / "index.json").read_text())
    for key in ("generation", "recall_settings", "history"):
        del manifest[key]
    (index / "index.json").write_text(json.dumps({**manifest, "format": 1}))
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    expected = (
        f"index {index} is in index format 1 ({index / 'index.json'}), which this version no "
        f"longer reads (it reads format {FORMAT}); rebuild it with `retrieval index build "
        f"{run.resolve()} --backend exact --out {index}`"
    )
    for attempt in (
        lambda: open_index(index, "cpu"),
        lambda: update_index(index, progress=False, device="cpu"),
    ):
        with pytest.raises(IndexFileError) as refused:
            attempt()
        assert str(refused.value) == expected
    assert main(["index", "info", str(index)]) == 2
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    build(run, "exact", index)  # the command it names replaces the old index
    assert open_index(index, "cpu").manifest.format == FORMAT


def test_retune_tunes_again(tmp_path: Path) -> None:
    """`retune=True` tunes an approximate backend's settings on fresh queries, as a build
    does; by default an update measures recall with the settings it has."""
    run = make_run(tmp_path / "run")
    index = build(run, "faiss-ivfpq", tmp_path / "ix")
    grow(run, np.arange(6000, 6020), seed=6)
    plain = update_index(index, progress=False, device="cpu").recall
    assert plain["method"].endswith("(settings as tuned before)")
    assert plain["tune_seconds"] == 0
    shrink(run, np.arange(40, 60))
    tuned = update_index(index, progress=False, device="cpu", retune=True).recall
    assert tuned["method"] == "held-out queries vs exact search"
    assert tuned["tune_seconds"] > 0


@pytest.mark.slow
def test_milvus_update_equals_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """milvus-lite (FLAT: exact): insert and delete follow the run as faiss does. Its
    collection changes in place, so an update killed before its commit leaves it out of
    step: opening says to rerun the update, which repairs it."""
    run = make_run(tmp_path / "run")
    options = {"index_type": "FLAT", "recall_k": 10, "progress": False}
    index = build_index(run, "milvus", tmp_path / "ix", "cpu", **options)
    grow(run, np.arange(2000, 2012), seed=9)
    shrink(run, np.arange(0, 120, 10))

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexFolder, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        update_index(index, progress=False, device="cpu")
    monkeypatch.undo()
    with pytest.raises(IndexFileError, match="rerun `retrieval index update"):
        open_index(index, "cpu")
    result = update_index(index, progress=False, device="cpu")
    assert (result.added, result.removed, result.generation) == (12, 12, 1)
    rebuilt = build_index(run, "milvus", tmp_path / "rebuilt", "cpu", **options)
    assert_update_equals_rebuild("exact", index, rebuilt)
