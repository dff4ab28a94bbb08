"""Stale indexes (issue 28.8): an index that was not updated after its run moved on says
so, with how many images were added and removed and the command that catches up, in
``index info``, ``search`` (SearchIndex.run_changes) and ``serve``; ``retrieval index
update RUN`` updates every index of the run, wherever it was built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fake_runs import random_reps, write_collection

from retrieval.cli import main
from retrieval.index import open_index
from retrieval.index.manifest import INDEXES, run_changes, run_indexes
from retrieval.store import ShardStore

DIM = 8


def make_run(root: Path) -> Path:
    """60 images in one shard, id 7 already removed."""
    ids = np.arange(60)
    store = ShardStore(root / "embeddings")
    store.write_shard("rank000-00000", torch.from_numpy(ids), random_reps(60, 3, seed=0, dim=DIM))
    store.write_manifest(fingerprint={"retriever": {"name": "fake"}, "dtype": "float16"})
    write_collection(root, ids, ids == 7)
    return root


def move_on(run: Path, new: np.ndarray, gone: list[int]) -> None:
    """New files embedded (a new shard, new collection rows) and files deleted."""
    store = ShardStore(run / "embeddings")
    name = f"rank000-{len(store.shard_paths()):05d}"
    store.write_shard(name, torch.from_numpy(new), random_reps(len(new), 3, seed=1, dim=DIM))
    table = pq.read_table(run / "images.parquet").to_pydict()
    ids = np.concatenate([np.array(table["image_id"]), new])
    removed = np.concatenate([np.array(table["removed"]), np.zeros(len(new), bool)])
    write_collection(run, ids, removed | np.isin(ids, gone))


def reference(run: Path, index: Path) -> tuple[int, int]:
    """(added, removed) by sets: live stored ids of the run vs live ids of the index."""
    stored = set()
    for shard in ShardStore(run / "embeddings").iter_shards():
        stored |= set(shard.image_ids.tolist())
    table = pq.read_table(run / "images.parquet").to_pydict()
    live = {i for i, r in zip(table["image_id"], table["removed"], strict=True) if not r}
    wanted = stored & live
    with open_index(index, "cpu") as opened:
        held = set(opened.backend.require_table().live_image_ids.tolist())
    return len(wanted - held), len(held - wanted)


@pytest.fixture
def run_with_two_indexes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, ...]:
    run = make_run(tmp_path / "run")
    default = run / "index" / "exact"
    elsewhere = tmp_path / "elsewhere" / "flat"
    for out, backend in ((default, "exact"), (elsewhere, "faiss-flat")):
        argv = ["index", "build", str(run), "--backend", backend, "--out", str(out)]
        assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    return run, default, elsewhere


def test_changes_counted_as_sets_say(run_with_two_indexes: tuple[Path, ...]) -> None:
    """run_changes equals a set difference of live ids (stored and not removed vs held);
    none right after the build."""
    run, default, _ = run_with_two_indexes
    assert not run_changes(default).stale
    move_on(run, np.arange(100, 112), gone=[3, 4, 5, 7])
    changes = run_changes(default)
    assert (changes.added, changes.removed) == reference(run, default) == (12, 3)
    with open_index(default, "cpu") as index:
        assert index.run_changes() == changes
    assert f"retrieval index update {run}" in changes.note()


def test_info_says_stale_and_update_run_updates_every_index(
    run_with_two_indexes: tuple[Path, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """`index info` names the counts and the command; `index update RUN` brings both
    indexes (the default place and one built elsewhere, recorded in RUN/indexes.json)
    to the run; after it neither is stale, and a second update changes nothing."""
    run, default, elsewhere = run_with_two_indexes
    assert set(run_indexes(run)) == {default.resolve(), elsewhere.resolve()}
    assert json.loads((run / INDEXES).read_text()) == sorted(
        str(p.resolve()) for p in (default, elsewhere)
    )
    move_on(run, np.arange(100, 105), gone=[10])
    assert main(["index", "info", str(elsewhere)]) == 0
    info = " ".join(capsys.readouterr().out.split())
    assert "5 images added and 1 removed" in info
    assert f"retrieval index update {run}" in info
    assert main(["index", "update", str(run), "--no-progress", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width
    assert out.count("+5 images") == 2
    assert out.count("-1 images") == 2
    for folder in (default, elsewhere):
        assert not run_changes(folder).stale
        assert reference(run, folder) == (0, 0)
    assert main(["index", "update", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert " ".join(capsys.readouterr().out.split()).count("no change") == 2
    assert main(["index", "info", str(default)]) == 0
    assert "up to date with its run" in capsys.readouterr().out


def test_update_of_a_run_without_index_says_how_to_build_one(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run")
    assert main(["index", "update", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no index yet" in err
    assert f"retrieval index build {run}" in err
