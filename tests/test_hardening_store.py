"""Run folders under careless or concurrent use (issue 15, items 3 and 6 and the store's
share of "tracebacks where a message belongs"): a lock per run folder, checksums checked
on reuse, damaged files named in one message, caches written atomically."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.cli import main
from retrieval.config import TextConfig, load_config
from retrieval.engine.embedding import embedding_fingerprint, plan_embedding
from retrieval.engine.scoring import query_embeddings
from retrieval.errors import ConfigError, StoreError
from retrieval.index.build import build_index
from retrieval.representatives import Representatives
from retrieval.store import ShardStore
from retrieval.store.lock import LOCK, RunLock
from retrieval.store.shards import open_run_store

FINGERPRINT = {"retriever": {"name": "stub"}, "dtype": "float16"}


def _reps(n: int, seed: int) -> Representatives:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, 3, 8, generator=g), dim=-1)
    return Representatives(emb, torch.ones(n, 3, dtype=torch.bool), torch.rand(n, 3, 4))


def _run(root: Path) -> tuple[Path, ShardStore]:
    """A finished run folder: two shards (ids 0..9, 10..19), fingerprint and checksums."""
    store = ShardStore(root / "embeddings")
    for i in range(2):
        store.write_shard(f"rank000-{i:05d}", torch.arange(10 * i, 10 * i + 10), _reps(10, i))
    store.write_manifest(fingerprint=FINGERPRINT)
    store.record_checksums()
    return root, store


def _cli_args(data: tuple[Path, Path], out: Path | str) -> list[str]:
    ann, images = data
    return [
        "embed",
        "demo",
        f"data.annotations={ann}",
        f"data.images={images}",
        f"run.output_dir={out}",
        "run.progress=false",
        "loader.num_workers=0",
        "retriever.pretrained=null",
    ]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


# item 3 --------------------------------------------------------------------------------
HOLD = """
import sys, time
from retrieval.store.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_into_a_locked_folder_stops_naming_the_holder_and_a_dead_lock_recovers(
    synthetic_coco, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant: while one process holds a run folder, a second `retrieval embed` into it
    exits 2 at once with one `error:` line naming the holder's pid and host, and writes
    nothing; once the holder is killed (-9), its lock is taken over with a warning."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "retrieval.cli", *_cli_args(synthetic_coco, run)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert second.returncode == 2, second.stderr[-3000:]
        line = _one_error_line(second.stderr)
        assert f"pid {holder.pid} on host " in line
        assert "in use by another run" in line
        assert time.monotonic() - start < 240
        assert not (run / "embeddings").exists()
        assert not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (run / LOCK).exists()  # the dead holder's file is still there...
    with caplog.at_level(logging.WARNING, logger="retrieval"), RunLock(run):
        assert str(os.getpid()) in (run / LOCK).read_text()
    assert f"stale lock left by pid {holder.pid}" in caplog.text  # ...and recovered
    assert not (run / LOCK).exists()  # released on exit


def test_shard_layout_settings_do_not_change_the_fingerprint(
    synthetic_coco, tmp_path: Path
) -> None:
    """Invariant: store.shard_size / store.shard_mb (how images are split into files)
    are not in the embedding fingerprint, so a run with other values reuses the shards."""
    ann, images = synthetic_coco
    base = [f"data.annotations={ann}", f"data.images={images}", "retriever.pretrained=null"]
    retriever = Namespace(describe=lambda: {"model": "stub"})
    a = embedding_fingerprint(load_config("demo", base), retriever)  # type: ignore[arg-type]
    b = embedding_fingerprint(
        load_config("demo", [*base, "store.shard_size=3", "store.shard_mb=0.5"]),
        retriever,  # type: ignore[arg-type]
    )
    assert a == b
    _, store = _run(tmp_path)
    assert len(plan_embedding(store, FINGERPRINT, np.arange(20), "auto")) == 0


# item 6 --------------------------------------------------------------------------------
def test_altered_or_missing_shard_is_refused_on_reuse_and_by_index_build(tmp_path: Path) -> None:
    """Invariant: a shard whose bytes differ from the manifest's sha256 is never reused
    (embed names it and the fix; `verify=full` catches it even with size and mtime
    restored); index build / update / export refuse a run with a listed shard missing or
    altered; deleting the shard makes resume embed only its images."""
    run, store = _run(tmp_path / "run")
    shard = store.root / "rank000-00001.safetensors"
    stat = shard.stat()
    store.write_shard("rank000-00001", torch.arange(10, 20), _reps(10, 99))  # same size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert len(plan_embedding(store, FINGERPRINT, np.arange(20), "auto")) == 0  # fast path
    with pytest.raises(StoreError, match="rank000-00001.safetensors changed.*Delete"):
        plan_embedding(store, FINGERPRINT, np.arange(20), "auto", verify="full")
    os.utime(shard)  # a new mtime: the fast path hashes it and sees the change
    with pytest.raises(StoreError, match="rank000-00001.safetensors changed"):
        plan_embedding(store, FINGERPRINT, np.arange(20), "auto")
    with pytest.raises(StoreError, match="rank000-00001.safetensors changed"):
        build_index(run, "exact", tmp_path / "ix", "cpu", progress=False)
    with pytest.raises(ConfigError, match="run.verify"):
        store.verify("sometimes")

    shard.unlink()  # the fix: resume embeds exactly the images it held
    assert np.array_equal(plan_embedding(store, FINGERPRINT, np.arange(20), "auto"), range(10, 20))
    with pytest.raises(StoreError, match="rank000-00001.safetensors listed .* are missing"):
        open_run_store(run)  # what index build, index update and export open
    assert main(["index", "build", str(run), "--out", str(tmp_path / "ix")]) == 2
    assert not (tmp_path / "ix").exists()

    store.write_shard("rank000-00001", torch.arange(10, 20), _reps(10, 1))
    store.record_checksums()
    open_run_store(run, verify="full")  # whole again


# tracebacks where a message belongs -----------------------------------------------------
def test_damaged_store_files_are_one_named_error(tmp_path: Path) -> None:
    """Invariant: a truncated, empty or pickled shard and a manifest that is not a JSON
    object each raise a StoreError naming the file (the CLI's one `error:` line), never
    a safetensors / JSON traceback."""
    for name, damage in {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
        "empty": lambda p: p.write_bytes(b""),
        "pickle": lambda p: p.write_bytes(pickle.dumps({"image_ids": [1, 2]})),
    }.items():
        _, store = _run(tmp_path / name)
        shard = store.shard_paths()[0]
        damage(shard)
        with pytest.raises(StoreError, match=f"shard {shard} cannot be read.*Delete that shard"):
            store.accounted_ids()
    run, store = _run(tmp_path / "list")
    store.manifest_path.write_text("[1, 2]")
    with pytest.raises(StoreError, match="manifest.json is not a manifest.*got list"):
        open_run_store(run)
    store.manifest_path.write_text('{"fingerprint": ')
    with pytest.raises(StoreError, match="manifest.json is not a manifest"):
        plan_embedding(store, FINGERPRINT, np.arange(20), "auto")


def test_run_output_dir_that_cannot_be_a_folder_is_one_error(
    synthetic_coco, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: run.output_dir naming a file, a too-long name, or a run whose
    embeddings/ is a file, stops `retrieval embed` with exit 2 and one `error:` line
    naming run.output_dir, before any model is built; the file in the way is kept."""
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    (tmp_path / "run" / "embeddings").parent.mkdir()
    (tmp_path / "run" / "embeddings").write_text("keep me too")
    for out in (a_file, a_file / "sub", tmp_path / ("x" * 300), tmp_path / "run"):
        assert main(_cli_args(synthetic_coco, out)) == 2, out
        line = _one_error_line(capsys.readouterr().err)
        assert "run.output_dir=" in line, line
        assert "choose another run.output_dir" in line, line
    assert a_file.read_text() == "keep me"
    assert (tmp_path / "run" / "embeddings").read_text() == "keep me too"
    assert not (tmp_path / "run" / LOCK).exists()


def _text_cfg() -> TextConfig:
    return TextConfig(prompts="single", batch_size=4)


class _Stub:
    calls = 0

    def describe(self) -> dict:
        return {"model": "stub"}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        _Stub.calls += 1
        return F.normalize(torch.ones(len(texts), 8), dim=-1)


def test_text_cache_unreadable_is_rebuilt_and_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: text_embeddings.pt is only a cache: truncated, empty, pickled or
    non-dict contents are rebuilt (no traceback), and a write that dies half way leaves
    the previous cache intact and no temporary file."""
    path, stub, queries = tmp_path / "text_embeddings.pt", _Stub(), ["cat", "dog"]
    good = query_embeddings(_text_cfg(), stub, queries, tmp_path)  # type: ignore[arg-type]
    intact = path.read_bytes()
    for damaged in (
        intact[:50],
        b"",
        pickle.dumps({"key": "x", "embeddings": Namespace()}),
        pickle.dumps([1, 2, 3]),
    ):
        path.write_bytes(damaged)
        again = query_embeddings(_text_cfg(), stub, queries, tmp_path)  # type: ignore[arg-type]
        assert torch.equal(again, good)
        assert torch.load(path, weights_only=True)["embeddings"].shape == (2, 8)
    calls = _Stub.calls
    query_embeddings(_text_cfg(), stub, queries, tmp_path)  # type: ignore[arg-type]
    assert _Stub.calls == calls  # a good cache is used

    intact = path.read_bytes()

    def dies(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        query_embeddings(_text_cfg(), stub, ["bird"], tmp_path)  # type: ignore[arg-type]
    assert path.read_bytes() == intact
    assert [p.name for p in tmp_path.iterdir()] == ["text_embeddings.pt"]


def test_eval_into_a_locked_folder_stops_before_building_the_model(
    synthetic_coco, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: `evaluate` takes the run folder's lock before the model is built, so a
    second evaluation into a busy folder stops at once (no model built, nothing written)."""
    from retrieval.engine import evaluate
    from retrieval.engine import parts as run_parts
    from retrieval.store.lock import RunLock

    ann, images = synthetic_coco
    run = tmp_path / "run"
    cfg = load_config(
        "demo",
        [f"data.annotations={ann}", f"data.images={images}", f"run.output_dir={run}",
         "run.progress=false", "loader.num_workers=0", "logger.wandb.mode=disabled"],
    )  # fmt: skip
    built: list[int] = []
    monkeypatch.setattr(run_parts, "build_retriever", lambda cfg: built.append(1))
    with RunLock(run), pytest.raises(StoreError, match="is in use by another run"):
        evaluate(cfg)
    assert built == []
    assert not (run / "embeddings").exists()
