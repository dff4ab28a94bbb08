"""`index update` holds the index folder's lock: two updates never write one index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import StoreError
from retrieval.index.update import update_index
from retrieval.store.lock import LOCK, RunLock
from tests.test_index_update import answers, build, grow, make_run, queries


def test_a_second_update_stops_at_once_and_the_first_completes(tmp_path: Path) -> None:
    """While one process holds the index's lock, an update fails naming the holder and
    changes nothing; released, the same update goes through and leaves no lock file."""
    run = make_run(tmp_path / "run")
    index = build(run, "faiss-flat", tmp_path / "index")
    grow(run, np.arange(2000, 2010), seed=7)
    before = answers(index, queries(4, 1), 5)
    with RunLock(index), pytest.raises(StoreError, match="another index update") as err:
        update_index(index, progress=False, device="cpu")
    assert str(index / LOCK) in str(err.value)
    assert answers(index, queries(4, 1), 5) == before
    result = update_index(index, progress=False, device="cpu")
    assert result.added == 10
    assert not (index / LOCK).exists()


def test_update_suggests_a_rebuild_when_tombstones_pile_up(tmp_path: Path, capsys) -> None:
    """Removing most images leaves their rows as tombstones: the update says how many
    and how to compact; a rebuild at the same folder leaves none."""
    from retrieval.cli import main
    from tests.test_index_update import shrink

    run = make_run(tmp_path / "run")
    index = build(run, "faiss-flat", tmp_path / "index")
    shrink(run, np.arange(0, 100))
    assert main(["index", "update", str(index), "--no-progress", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "belong to removed images" in out
    assert "to compact it" in out
    from retrieval.index import open_index

    with open_index(index, "cpu") as opened:
        assert opened.backend.require_table().has_removed
    with open_index(build(run, "faiss-flat", index), "cpu") as opened:
        assert not opened.backend.require_table().has_removed
