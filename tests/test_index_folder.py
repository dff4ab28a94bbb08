"""The index folder's typed manifest: what index.json holds, read back the same, and every
missing or mistyped key one IndexFileError naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_runs import random_reps

from retrieval.errors import IndexFileError
from retrieval.index import build_index, update_index
from retrieval.index.manifest import FORMAT, MANIFEST, IndexFolder, IndexManifest
from retrieval.store import ShardStore

DIM = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exact index of a 30-image run, updated once (so ``updated`` is set)."""
    run = tmp_path_factory.mktemp("run")
    store = ShardStore(run / "embeddings")
    store.write_shard("rank000-00000", torch.arange(30), random_reps(30, 4, 0, DIM))
    store.write_manifest(fingerprint={"retriever": {"name": "fake", "dim": DIM}})
    folder = build_index(run, "exact", run / "ix", "cpu", progress=False)
    store.write_shard("rank000-00001", torch.arange(30, 35), random_reps(5, 4, 1, DIM))
    update_index(folder, progress=False, device="cpu")
    return folder


def _raw(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def test_the_manifest_holds_exactly_the_files_keys(built: Path) -> None:
    """The dataclass's fields are the keys a built and updated index.json holds (no key
    of the file goes unread, none of the class is missing from the file)."""
    assert [f.name for f in dataclasses.fields(IndexManifest)] == list(_raw(built))


def test_the_manifest_round_trips(built: Path, tmp_path: Path) -> None:
    """Read, written and read again, the manifest is equal and its file byte-identical
    in content; a manifest never updated leaves ``updated`` out of the file."""
    manifest = IndexFolder(built).manifest()
    assert manifest.format == FORMAT
    assert manifest.generation == 1
    assert manifest.to_json() == _raw(built)
    copy = IndexFolder(tmp_path / "copy")
    copy.path.mkdir()
    fresh = dataclasses.replace(manifest, updated=None, history=[], files={})
    copy.write_manifest(fresh)
    assert "updated" not in _raw(copy.path)
    assert copy.manifest() == fresh


def _broken(built: Path, tmp_path: Path, change: Any) -> Path:
    folder = tmp_path / "ix"
    folder.mkdir()
    raw = {**_raw(built), "files": {}}  # the files themselves are not copied
    change(raw)
    (folder / MANIFEST).write_text(json.dumps(raw))
    return folder


FIELDS = [f.name for f in dataclasses.fields(IndexManifest) if f.name not in ("format", "updated")]


@pytest.mark.parametrize("key", FIELDS)
def test_a_missing_key_is_one_error_naming_file_and_key(
    built: Path, tmp_path: Path, key: str
) -> None:
    """Each required key, deleted: one IndexFileError naming index.json, the key and the
    rebuild command (no KeyError traceback later, when something reads it)."""
    folder = _broken(built, tmp_path, lambda raw: raw.pop(key))
    with pytest.raises(IndexFileError) as err:
        IndexFolder(folder).manifest()
    message = str(err.value)
    assert str(folder / MANIFEST) in message
    assert f"key {key!r} missing" in message
    assert "retrieval index build" in message
    assert "\n" not in message


MISTYPED = {
    "run": 7,
    "fingerprint": [],
    "embed_dim": "8",
    "approximate": "no",
    "generation": 1.5,
    "recall": 0.9,
    "build_seconds": "fast",
    "images": True,
    "files": ["index.json"],
    "history": {},
    "updated": 3,
}


@pytest.mark.parametrize(("key", "value"), MISTYPED.items())
def test_a_mistyped_key_is_one_error_naming_file_and_key(
    built: Path, tmp_path: Path, key: str, value: Any
) -> None:
    """A key of the wrong JSON type (a bool is no number, a float no integer): one
    IndexFileError naming index.json and the key."""
    folder = _broken(built, tmp_path, lambda raw: raw.update({key: value}))
    with pytest.raises(IndexFileError) as err:
        IndexFolder(folder).manifest()
    assert str(folder / MANIFEST) in str(err.value)
    assert f"key {key!r} is " in str(err.value)


def test_recall_keys_every_reader_needs_are_checked(built: Path, tmp_path: Path) -> None:
    """``recall`` without ``k``: the error names the nested key."""
    folder = _broken(built, tmp_path, lambda raw: raw["recall"].pop("k"))
    with pytest.raises(IndexFileError, match=r"key 'recall\.k' missing or not a number"):
        IndexFolder(folder).manifest()


def test_not_an_index_folder_is_not_taken_for_one(built: Path, tmp_path: Path) -> None:
    """is_index: a real index is one; an index.json of another shape is not (a build
    then refuses to replace that folder)."""
    assert IndexFolder(built).is_index()
    folder = _broken(built, tmp_path, lambda raw: raw.pop("backend"))
    assert not IndexFolder(folder).is_index()
