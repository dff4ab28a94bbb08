"""The rebuild command an index error suggests is one the CLI accepts and that mends the
index (issue 24: `index info` once suggested a command that would be refused)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_runs import random_reps, write_collection

from retrieval.cli import main
from retrieval.index import build_index
from retrieval.store import ShardStore


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_suggested_rebuild_command_runs_and_mends_the_index(
    tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated index file -> `index info` fails naming a command; that command, pasted
    as it is, rebuilds the index with its run and backend, and `index info` then works."""
    run = tmp_path / "run"
    ids = np.arange(30)
    store = ShardStore(run / "embeddings")
    store.write_shard("rank000-00000", torch.from_numpy(ids), random_reps(30, 3, seed=1, dim=8))
    store.write_manifest(fingerprint={"retriever": {"name": "fake"}})
    write_collection(run, ids, np.zeros(30, bool))
    folder = build_index(run, backend, tmp_path / "my index", device="cpu", progress=False)
    table = folder / "table.npz"
    table.write_bytes(table.read_bytes()[:100])

    assert main(["index", "info", str(folder)]) == 2
    err = capsys.readouterr().err
    command = re.search(r"`(retrieval index build [^`]+)`", " ".join(err.split()))
    assert command is not None, err
    argv = shlex.split(command.group(1))[1:]
    assert argv[argv.index("--backend") + 1] == backend
    assert main(argv + ["--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(folder)]) == 0
    assert "holds      30 images" in capsys.readouterr().out
