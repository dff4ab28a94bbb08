"""The run folder's contract: one atomic write for every run and index file, and one
id -> file map that the collection, the gallery (and search --json, serve) and export
all answer with."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fake_runs import random_reps
from PIL import Image

import retrieval
from retrieval.cli.search import hit_records
from retrieval.data.folder import FolderDataset
from retrieval.errors import StoreError
from retrieval.index import Hit, build_index, open_index
from retrieval.report.gallery import image_paths
from retrieval.store import ShardStore
from retrieval.store.atomic import partial_glob, replace_atomically, write_atomic
from retrieval.store.export import export_run
from retrieval.store.run_folder import RunFolder
from retrieval.store.run_images import RunImages

DIM = 8
RETRIEVER = "retriever:\n  name: clip\n"  # a valid stored config names one
PACKAGE = Path(retrieval.__file__).parent


class Killed(Exception):
    pass


@pytest.mark.parametrize("form", ["path", "file"])
def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path: Path, form: str) -> None:
    """A write that fails after writing part of the new content leaves the old file
    byte for byte, and no temporary file beside it; one that succeeds replaces it whole
    with the permissions a plain ``open`` gives (not a temporary file's private ones)."""
    target = tmp_path / "index.json"
    target.write_text('{"old": true}')

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"new": tr')
        raise Killed

    def half_then_fail_file(f) -> None:
        f.write(b'{"new": tr')
        raise Killed

    def fail() -> None:
        if form == "path":
            write_atomic(target, half_then_fail)
        else:
            replace_atomically(target, half_then_fail_file)

    with pytest.raises(Killed):
        fail()
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]

    if form == "path":
        write_atomic(target, lambda tmp: tmp.write_text('{"new": true}'))
    else:
        replace_atomically(target, lambda f: f.write(b'{"new": true}'))
    assert target.read_text() == '{"new": true}'
    plain = tmp_path / "plain"
    plain.write_text("")
    assert target.stat().st_mode == plain.stat().st_mode
    assert not list(tmp_path.glob(partial_glob()))


def test_racing_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Two writers of one target (DDP ranks writing one images.parquet) each write their
    own temporary file: the second's content never mixes into the first's."""
    target = tmp_path / "images.parquet"
    seen: list[Path] = []

    def outer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("first")
        write_atomic(target, inner)
        assert tmp.read_text() == "first"

    def inner(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("second")

    write_atomic(target, outer)
    assert seen[0] != seen[1]
    assert target.read_text() == "first"


ALLOWED_RENAMES = {
    "store/atomic.py": "the one atomic write",
    "store/export.py": "an export's OUT (a folder or a streamed file) renamed whole",
    "index/build.py": "the index folder swapped in whole by renames",
    "data/download.py": "downloads (not run or index files)",
}


def _renames(path: Path) -> list[str]:
    """Calls in ``path`` that rename files or make temporary files: ``os.replace`` /
    ``os.rename``, ``Path.replace(x)`` / ``Path.rename(x)`` (one argument, unlike
    ``str.replace``), ``tempfile.mkstemp`` / ``NamedTemporaryFile``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if owner == "dataclasses":  # dataclasses.replace(obj): not a file
            continue
        if name in ("mkstemp", "NamedTemporaryFile") or (
            name in ("replace", "rename")
            and (owner == "os" or (len(node.args) == 1 and not node.keywords))
        ):
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    return found


def test_every_run_and_index_file_is_written_by_the_one_atomic_write() -> None:
    """No module renames files into place or makes temporary files itself, except the
    atomic-write module and the few that move whole folders or downloads: a new writer of
    a run or index file goes through retrieval.store.atomic (fsync, rename, fsync)."""
    found = [
        call
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in ALLOWED_RENAMES
        for call in _renames(path)
    ]
    assert found == []
    assert _renames(PACKAGE / "store/atomic.py")  # the scan does see a rename


def test_config_yaml_has_one_writer(tmp_path: Path) -> None:
    """config.yaml has one writer (RunFolder.write_config, atomic, through
    config.save_run_config): no module writes the file by its name itself."""
    run = RunFolder(tmp_path / "run")
    run.write_config("a: 1\n")
    assert run.config.read_text() == "a: 1\n"
    writers = [
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        if '"config.yaml").write' in p.read_text() or "CONFIG).write" in p.read_text()
    ]
    assert writers == []


# the one id -> file map --------------------------------------------------------------
def _stored(run: Path, ids: np.ndarray) -> None:
    """Shards for ``ids`` and a fingerprint: enough for export and an exact index."""
    store = ShardStore(run / "embeddings")
    store.write_shard("rank000-00000", torch.from_numpy(ids), random_reps(len(ids), 3, 0, DIM))
    store.write_manifest(fingerprint={"retriever": {"name": "fake", "dim": DIM}})


def _surfaces(run: Path, ids: list[int], tmp_path: Path) -> dict[str, dict[int, str | None]]:
    """Each surface's file for ``ids``: the gallery (and search --json), the run's map,
    and export's ``path`` column."""
    index = open_index(build_index(run, "exact", tmp_path / "ix", "cpu", progress=False), "cpu")
    hits = [Hit(i, 1.0, 0, None) for i in ids]

    def text(paths: dict[int, Path | None]) -> dict[int, str | None]:
        return {i: None if p is None else str(p) for i, p in paths.items()}

    export_run(run, tmp_path / "rows.parquet", progress=False)
    rows = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    return {
        "gallery": text(image_paths(index, ids)),
        "search --json": {r["image_id"]: r["path"] for r in hit_records(index, hits)},
        "run": text(RunImages.open(run).paths(ids)),
        "export": {r["image_id"]: r["path"] for r in rows if r["image_id"] in ids},
    }


def test_a_folder_runs_files_are_one_map(tmp_path: Path) -> None:
    """For a folder run, the collection (what the embed phase opens), the gallery,
    search --json and export all name each id's file as the images root joined with the
    path images.parquet stores (read here with pyarrow, independently)."""
    images = tmp_path / "images"
    for k, name in enumerate(["b.jpg", "sub/a.png", "sub/deeper/c.jpg"]):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + k, 10), (k * 40, 0, 0)).save(images / name)
    run = tmp_path / "run"
    dataset = FolderDataset(images=str(images), run_dir=str(run), progress=False)
    dataset.collection.sync()  # the embed phase's write of the collection table
    table = pq.read_table(run / "images.parquet")
    root = Path(table.schema.metadata[b"root"].decode())
    expected = {
        i: str(root / p)
        for i, p in zip(table["image_id"].to_pylist(), table["path"].to_pylist(), strict=True)
    }
    ids = sorted(expected)
    assert {i: str(dataset.image_path(i)) for i in ids} == expected
    _stored(run, np.array(ids))
    RunFolder(run).write_config(f"{RETRIEVER}data:\n  name: folder\n  images: {images}\n")
    for surface, files in _surfaces(run, ids, tmp_path).items():
        assert files == expected, surface


def test_a_labelled_runs_files_are_one_map(tmp_path: Path, synthetic_coco) -> None:
    """For a labelled (COCO-format) run, the gallery, search --json and export name each
    id's file as the annotations' file_name under data.images (read here from the
    annotations file, independently)."""
    annotations, images = synthetic_coco
    coco = json.loads(Path(annotations).read_text())
    expected = {im["id"]: str(Path(images) / im["file_name"]) for im in coco["images"][:5]}
    ids = sorted(expected)
    run = tmp_path / "run"
    _stored(run, np.array(ids))
    RunFolder(run).write_config(
        f"{RETRIEVER}data:\n  name: coco\n  annotations: {annotations}\n  images: {images}\n"
    )
    for surface, files in _surfaces(run, ids, tmp_path).items():
        assert files == expected, surface


def test_an_id_the_run_never_assigned_has_no_file(tmp_path: Path) -> None:
    """The map names no file for an id the collection table never assigned (null in an
    export, None for a hit; a KeyError for the dataset), and an absolute stored path
    stays as it is; one id at a time it answers as for many."""
    run = tmp_path / "run"
    run.mkdir()
    table = pa.table({"image_id": [5, 2], "path": ["/abs/x.jpg", "y.jpg"]})
    pq.write_table(table.replace_schema_metadata({b"root": b"/root"}), run / "images.parquet")
    files = RunImages.open(run).paths([2, 5, 7])
    assert files == {2: Path("/root/y.jpg"), 5: Path("/abs/x.jpg"), 7: None}
    one_by_one = RunFolder(run).image_files  # what the embed phase asks, id by id
    assert one_by_one is not None
    assert {i: one_by_one.path(i) for i in (2, 5)} == {2: files[2], 5: files[5]}
    with pytest.raises(KeyError, match="image id 7"):
        one_by_one.path(7)
    shutil.rmtree(run)
    os.makedirs(run)
    assert RunImages.open(run).paths([2]) == {2: None}  # no table, no config: unknown


def test_which_images_the_shards_hold_is_read_by_one_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every question about which images a run's shards hold (index info's staleness,
    an update's wanted ids, the gallery's and the service's shard rows, resume's and the
    sweep's accounting) is answered through ShardStore.scan_ids, and they agree; a shard
    that cannot be read is skipped only where asked (a staleness note)."""
    from retrieval.index.manifest import run_changes
    from retrieval.report.gallery import _locate

    run = tmp_path / "run"
    _stored(run, np.arange(6))
    index = build_index(run, "exact", tmp_path / "ix", "cpu", progress=False)
    store = ShardStore(run / "embeddings")
    store.write_shard("rank000-00001", torch.arange(6, 9), random_reps(3, 3, 1, DIM))
    calls: list[int] = []
    scan = ShardStore.scan_ids

    def counted(self: ShardStore, skip_damaged: bool = False):
        calls.append(1)
        return scan(self, skip_damaged)

    monkeypatch.setattr(ShardStore, "scan_ids", counted)
    answers = {
        "index info": lambda: run_changes(index).added,
        "run": lambda: RunFolder(run).indexable_ids().tolist(),
        "gallery": lambda: sorted(_locate(store, list(range(10)))),
        "serve": lambda: sorted(store.locate()),
        "resume": lambda: sorted(store.contents()[0].tolist()),
        "sweep": lambda: sorted(store.accounted_ids().tolist()),
    }
    got = {}
    for name, ask in answers.items():
        calls.clear()
        got[name] = ask()
        assert calls, f"{name} read the shards' ids without ShardStore.scan_ids"
    assert got["index info"] == 3
    for name in ("run", "gallery", "serve", "resume", "sweep"):
        assert got[name] == list(range(9)), name
    (store.root / "rank000-00001.safetensors").write_bytes(b"not a shard")
    assert RunFolder(run).indexable_ids(skip_damaged=True).tolist() == list(range(6))
    with pytest.raises(StoreError, match="rank000-00001"):
        RunFolder(run).indexable_ids()
