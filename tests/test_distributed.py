"""Multi-process embedding and crash recovery, run as real subprocesses (Lightning's
ddp strategy inside pytest re-launches the pytest command itself for rank 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.data.synthetic import make_synthetic_coco
from retrieval.store import ShardStore

pytestmark = pytest.mark.slow


def _cli(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    ann, images = data
    return [
        sys.executable,
        "-m",
        "retrieval.cli",
        "eval",
        "demo",
        f"data.annotations={ann}",
        f"data.images={images}",
        f"run.output_dir={out}",
        "run.progress=false",
        "loader.num_workers=0",
        "loader.batch_size=1",
        "store.dtype=float32",
        "logger.wandb.mode=disabled",
        "trainer.accelerator=cpu",
        *extra,
    ]


# Lightning gives each DDP process cpu_count / world_size threads unless OMP_NUM_THREADS
# is set, and the thread count changes BLAS reduction order (last-bit differences). One
# thread everywhere makes "bit for bit" a property of the framework, not of the kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _metrics(run: Path) -> dict:
    """metrics.json without what depends on how work was split (time, shard overhead)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("timing")
    metrics.pop("bytes_per_image")
    return metrics


def _stored_ids(run: Path) -> list[int]:
    return [
        int(i) for shard in ShardStore(run / "embeddings").iter_shards() for i in shard.image_ids
    ]


def test_two_processes_equal_one(synthetic_coco, tmp_path: Path) -> None:
    """DDP over 2 CPU processes (gloo) embeds every image exactly once, each rank into
    its own shards, and gives bit-identical fp32 scores and identical metrics."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_cli(synthetic_coco, one))
    _run(_cli(synthetic_coco, two, "trainer.devices=2", "trainer.strategy=ddp"))

    ranks = {p.name.split("-")[0] for p in ShardStore(two / "embeddings").shard_paths()}
    assert ranks == {"rank000", "rank001"}
    ids = _stored_ids(two)
    assert len(ids) == len(set(ids)) == 24
    a, b = np.load(one / "scores.npz"), np.load(two / "scores.npz")
    np.testing.assert_array_equal(a["image_ids"], b["image_ids"])
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert _metrics(one) == _metrics(two)


def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    """A run killed with SIGKILL mid-extraction is completed by rerunning the same
    command: it embeds only the missing images, ends with exactly the dataset's ids (no
    duplicates) and the same scores as an uninterrupted run."""
    data = make_synthetic_coco(tmp_path / "data", num_images=120, seed=11)
    slow = ("store.shard_size=2",)  # 60 shards: seconds of extraction to kill into
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_cli(data, full, *slow))

    proc = subprocess.Popen(
        _cli(data, killed, *slow), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((killed / "embeddings").glob("*.safetensors"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _stored_ids(killed)
    assert 0 < len(before) < 120
    assert not (killed / "metrics.json").exists()

    done = _run(_cli(data, killed, *slow))
    assert f"{120 - len(before)} images embedded now, {len(before)} reused" in done.stderr
    ids = _stored_ids(killed)
    assert sorted(ids) == sorted(set(ids))
    assert len(ids) == 120
    a, b = np.load(full / "scores.npz"), np.load(killed / "scores.npz")
    np.testing.assert_array_equal(a["image_ids"], b["image_ids"])
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert _metrics(full) == _metrics(killed)
