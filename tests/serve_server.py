"""A real ``retrieval serve`` process over tiny built indexes, for the API, load and page
tests and for bench/bench_serve.py.

Use from a test module (pytest puts ``tests/`` on ``sys.path``)::

    from serve_server import served_index, serve_indexes  # noqa: F401 (fixtures)

    def test_something(served_index: str) -> None:
        httpx.get(f"{served_index}/api/indexes")

``served_index`` (session scope) is the base URL (``http://127.0.0.1:PORT``, no trailing
slash) of one server, without a token, serving two indexes built by
``serve_indexes``:

- ``dense``: the conftest ``dense_run`` (Dense-CLIP, random-weight RN-tiny, 4 x 4 cells,
  24 synthetic COCO images) in an ``exact`` index: real embeddings, heatmaps, image
  files, ``image_id`` as its only filter column;
- ``vectors``: the same retriever and image files (ids 1..24), with random unit vectors as the 16
  cell representatives of each image (so images are told apart, which random weights do
  not do) and a collection table with metadata columns ``camera`` ('front' / 'back')
  and ``night`` (bool), in a ``faiss`` index.

For other settings (a token, other indexes) start your own::

    with start_server({"name": index_folder}, token="secret") as url:
        ...

or ``Server(...)`` to start it now and ``wait()`` for it later (two servers then start
side by side).

The server runs as ``python -m retrieval.cli serve`` on a free loopback port, is ready
once ``/healthz`` answers, logs to a temporary file (shown if it fails to start) and is
stopped when the ``with`` block or the session ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.aggregate import grid_cell_boxes
from retrieval.representatives import Representatives
from retrieval.store import ShardStore

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240  # model load on two busy shared cores
GRID = 4  # the conftest dense_run's cells per side (RN-tiny at 128 px)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``retrieval serve`` process, started at construction; :meth:`wait` blocks until
    it answers ``/healthz``. A context manager that stops it on exit.

    Args:
        index_dirs: index name -> index folder.
        token: the API token (``RETRIEVAL_API_TOKEN``), or None for none.
        args: more command-line options (``--max-upload-mb 1``).
    """

    def __init__(
        self, index_dirs: dict[str, Path], token: str | None = None, args: tuple[str, ...] = ()
    ) -> None:
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        env.pop("RETRIEVAL_API_TOKEN", None)
        if token is not None:
            env["RETRIEVAL_API_TOKEN"] = token
        specs = [f"{name}={folder}" for name, folder in index_dirs.items()]
        command = [sys.executable, "-m", "retrieval.cli", "serve", *specs, "--port", str(port)]
        command += ["--log-level", "warning", *args]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        self.ready = False

    def wait(self) -> str:
        """Polls ``/healthz`` until it answers (the server's log in the error if it never
        does); returns the base URL."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready and time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self.ready = httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.25)
        if not self.ready:
            self.log.seek(0)
            raise RuntimeError(
                f"retrieval serve did not start at {self.url} (exit {self.process.poll()}):\n"
                f"{self.log.read()}"
            )
        return self.url

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def start_server(
    index_dirs: dict[str, Path], token: str | None = None, args: tuple[str, ...] = ()
) -> Iterator[str]:
    """Runs ``retrieval serve NAME=FOLDER ...`` (see :class:`Server`) until the block
    ends; yields its base URL once it answers."""
    with Server(index_dirs, token, args) as server:
        yield server.wait()


def write_vector_run(
    source: Path,
    out: Path,
    image_ids: np.ndarray,
    seed: int = 0,
    images_dir: Path | None = None,
    grid: int = GRID,
    whole_image_clip: bool = False,
) -> Path:
    """A run folder whose images have random unit vectors as their ``grid x grid`` cell
    representatives (``grid=1``: one whole-image vector, no cells), embedded (so text
    queries encode) by ``source``'s retriever: its ``config.yaml`` and fingerprint are
    copied. With ``images_dir`` (the source's image
    files, ``000000000007.jpg``), the images are copied beside the run and listed in a
    collection table with metadata columns ``camera`` and ``night``. With
    ``whole_image_clip`` the run names plain CLIP (the same RN-tiny towers, no cells:
    nothing to draw a heatmap on) instead of the source's Dense-CLIP."""
    import fake_runs

    out.mkdir(parents=True)
    shutil.copy(source / "config.yaml", out / "config.yaml")
    fingerprint = ShardStore(source / "embeddings").read_manifest()["fingerprint"]
    if whole_image_clip:
        fingerprint = as_clip(out / "config.yaml", fingerprint)
    store = ShardStore(out / "embeddings")
    dim = ShardStore(source / "embeddings").iter_shards().__next__().reps.embeddings.shape[-1]
    boxes = grid_cell_boxes((grid, grid))
    for n, start in enumerate(range(0, len(image_ids), 4096)):
        ids = torch.as_tensor(image_ids[start : start + 4096], dtype=torch.int64)
        g = torch.Generator().manual_seed(seed + n)
        emb = F.normalize(torch.randn(len(ids), grid * grid, dim, generator=g), dim=-1)
        reps = Representatives.dense(emb, boxes.expand(len(ids), -1, -1).contiguous())
        store.write_shard(f"rank000-{n:05d}", ids, reps)
    store.write_manifest(fingerprint=fingerprint)
    if images_dir is not None:
        photos = out / "photos"
        photos.mkdir()
        for i in image_ids.tolist():
            shutil.copy(images_dir / f"{i:012d}.jpg", photos / f"{i:05d}.jpg")
        columns = {
            "camera": ["front" if i % 2 else "back" for i in image_ids.tolist()],
            "night": (image_ids % 3 == 0).tolist(),
        }
        fake_runs.write_collection(
            out, image_ids, np.zeros(len(image_ids), bool), "photos", columns
        )
        import pyarrow.parquet as pq

        from retrieval.data.collection import ROOT_KEY

        table = pq.read_table(out / "images.parquet")  # paths relative to the root, as embed's
        pq.write_table(
            table.replace_schema_metadata({ROOT_KEY: str(out).encode()}), out / "images.parquet"
        )
    return out


def as_clip(config: Path, fingerprint: dict) -> dict:
    """Rewrites ``config`` (a Dense-CLIP run's) to name plain CLIP with the same backbone;
    returns ``fingerprint`` with that retriever's description."""
    import yaml

    from retrieval.config import load_stored_config
    from retrieval.factory import build_retriever

    data = yaml.safe_load(config.read_text())
    old = data["retriever"]
    data["retriever"] = {"name": "clip", **{k: old[k] for k in ("backbone", "pretrained")}}
    data["retriever"] |= {"resolution": old["resolution"], "cache_dir": None}
    config.write_text(yaml.safe_dump(data))
    built = build_retriever(load_stored_config(config))
    retriever = {"name": "clip", **built.describe()}
    return {**fingerprint, "retriever": retriever, "retriever_options": data["retriever"]}


@pytest.fixture(scope="session")
def serve_indexes(dense_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``dense`` and ``vectors`` (module docstring), built once per session."""
    from retrieval.index import build_index

    root = tmp_path_factory.mktemp("serve")
    images = Path(
        ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]["data"]["images"]
    )
    vectors = write_vector_run(dense_run, root / "vectors_run", np.arange(1, 25), 7, images)
    return {
        "dense": build_index(dense_run, "exact", root / "dense", "cpu", progress=False),
        "vectors": build_index(vectors, "faiss", root / "vectors", "cpu", progress=False),
    }


@pytest.fixture(scope="session")
def served_index(serve_indexes: dict[str, Path]) -> Iterator[str]:
    """Base URL of a server (no token) over ``serve_indexes``; started once per session."""
    with start_server(serve_indexes) as url:
        yield url
