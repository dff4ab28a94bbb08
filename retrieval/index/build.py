"""``retrieval index build``: a run's stored representatives -> an index folder.

The index folder holds the representative table, the backend's files, a copy of the
run's ``config.yaml`` (so text queries need only the index) and ``index.json``: the
run, the retriever fingerprint, embedding size, backend and its tuned settings, build
time, bytes per image, and recall@K against exact search on held-out queries. It is
built in a temporary folder and renamed, so a killed build leaves no half index; a
rebuild replaces only the files the project wrote and keeps the user's (:func:`_replace`).

Only the run's live images are indexed: for an unlabelled run, the ids its collection
table (``images.parquet``) has not marked removed; for a labelled run, every stored
image. ``retrieval index update`` (:mod:`retrieval.index.update`) later follows the run
as it grows and shrinks; a build is generation 0.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import retrieval
from retrieval.errors import ConfigError, IndexFileError
from retrieval.index.base import Backend, create_backend
from retrieval.index.kernels import exact_search
from retrieval.index.manifest import FORMAT, MANIFEST, META, VECTORS, IndexFolder, IndexManifest
from retrieval.index.table import RepTable
from retrieval.index.tuning import recall_at_k
from retrieval.outputs import check_output
from retrieval.representatives import Representatives
from retrieval.store.atomic import PARTIAL_SUFFIX
from retrieval.store.run_folder import RunFolder
from retrieval.store.shards import ShardReader, ShardStore, open_run_store, read_cache

READ_IMAGES = 1024  # images read from a shard at once
SCORE_RULE = "max cosine over an image's representatives"


def embed_dim(store: ShardStore) -> int:
    with ShardReader(store.shard_paths()[0]) as shard:
        return int(shard.rows(0, 1).embeddings.shape[2])


def read_images(
    store: ShardStore, wanted: np.ndarray | None, progress: bool
) -> Iterator[tuple[np.ndarray, Representatives]]:
    """The stored images whose ids are in ``wanted`` (every one when None), shard by
    shard, ``READ_IMAGES`` at a time; shards holding none of them are not read."""
    paths = store.shard_paths()
    for path in tqdm(paths, desc="reading shards", unit="shard", disable=not progress):
        with ShardReader(path) as shard:
            keep = None if wanted is None else np.isin(shard.image_ids, wanted)
            if keep is not None and not keep.any():
                continue
            for start in range(0, shard.num_images, READ_IMAGES):
                ids = shard.image_ids[start : start + READ_IMAGES]
                if keep is None:
                    yield ids, shard.rows(start, start + READ_IMAGES)
                    continue
                part = keep[start : start + READ_IMAGES]
                if part.all():
                    yield ids, shard.rows(start, start + READ_IMAGES)
                elif part.any():
                    rows = shard.rows(start, start + READ_IMAGES)
                    yield ids[part], rows.select(torch.from_numpy(part))


def add_run(
    backend: Backend, store: ShardStore, progress: bool, live: np.ndarray | None = None
) -> None:
    """Streams the shards' images (those in ``live`` when given) into ``backend``."""
    for ids, reps in read_images(store, live, progress):
        backend.add(ids, reps)


def recall_queries(
    run_dir: Path | None, table: RepTable, count: int, seed: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """Queries to measure recall with: the run's own text queries (its categories), topped
    up with stored representatives (each with noise, so it is not its own exact match).

    Returns:
        ``(queries [Q, D], source)``, ``source`` counting each kind.
    """
    parts, source = [], {"text": 0, "representatives": 0}
    cached = read_cache(run_dir / "text_embeddings.pt") if run_dir else None
    text = cached.get("embeddings") if cached else None
    if isinstance(text, torch.Tensor) and text.ndim == 2:
        text = text.float()
        if text.shape[1] == table.dim:
            parts.append(text[:count])
            source["text"] = len(parts[0])
    missing = count - source["text"]
    if missing > 0:
        g = torch.Generator().manual_seed(seed)
        live = table.live_rows  # all rows but a removed image's
        rows = live[torch.randint(len(live), (missing,), generator=g).numpy()]
        reps = table.float_rows(np.sort(rows))
        noise = F.normalize(torch.randn(reps.shape, generator=g), dim=1)
        parts.append(F.normalize(reps + 0.5 * noise, dim=1))
        source["representatives"] = missing
    queries = torch.cat(parts)
    order = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))
    return queries[order], source


def measure(
    backend: Backend,
    queries: torch.Tensor,
    k: int,
    target: float,
    device: str,
    tune: bool = True,
) -> dict[str, Any]:
    """Tunes ``backend`` on half the queries, then measures recall@k on the other half.

    With ``tune=False`` (an update) the settings stay as they are and only the held-out
    half is searched. A backend whose answers are exact by construction (its engine is
    not ``approximate``: exact, faiss flat) is not searched at all, unless it has
    settings to tune at build (faiss flat's over-fetch: measured as it was tuned).
    """
    table = backend.require_table()
    k = min(k, table.searchable_images)
    if not backend.approximate and not (tune and backend.engine.tunable):
        return {"k": k, "value": 1.0, "queries": 0, "method": "exact search (by construction)"}
    half = max(len(queries) // 2, 1)
    tune_q, held_q = queries[:half], queries[half:]
    if not len(held_q):  # a single query: measured on the one it was tuned on
        held_q = tune_q

    def exact(q: torch.Tensor) -> list[np.ndarray]:
        return [table.owner[rows] for rows, _ in exact_search(table, q, k, device)]

    tune_s = 0.0
    if tune:
        truth = exact(queries)
        held_truth = truth[half:] if len(queries) > half else truth
        start = time.perf_counter()
        backend.tune(tune_q, truth[:half], k, target)
        tune_s = time.perf_counter() - start
    else:  # the held-out half only: nothing is tuned
        held_truth = exact(held_q)
    start = time.perf_counter()
    found = backend.search_rows(held_q, k)
    ms = 1000 * (time.perf_counter() - start) / len(held_q)
    return {
        "k": k,
        "value": recall_at_k(found, held_truth, table.owner),
        "queries": len(held_q),
        "target": target,
        "method": "held-out queries vs exact search"
        + ("" if tune else " (settings as tuned before)"),
        "tune_seconds": tune_s,
        "ms_per_query": ms,
    }


def folder_bytes(folder: Path, paths: list[Path]) -> dict[str, int]:
    """Size of each file, keyed by its path inside the index folder."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in paths}


def sizes(index: Backend, folder: Path) -> dict[str, Any]:
    """The manifest's counts and sizes of ``index`` (its table's live images and rows)."""
    table = index.require_table()
    images = len(table.live_images)
    return {
        "images": images,
        "representatives": table.num_live_rows,
        "removed_representatives": table.num_rows - table.num_live_rows,
        "disk_bytes_per_image": index.disk_bytes() / images,
        "memory_bytes_per_image": index.memory_bytes() / images,
        "files": folder_bytes(folder, index.files()),
    }


def check_out(out: Path) -> None:
    """Refuses an ``--out`` the build may not replace: anything but a missing path, an
    empty folder or an index folder this project wrote (:meth:`IndexFolder.is_index`), and any
    path a folder cannot be made at (:func:`retrieval.outputs.check_output`)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise IndexFileError(f"--out {out} is {kind}, not an index folder: choose another --out")
    check_output(out, "--out", "folder")
    if not out.exists():
        return
    if any(out.iterdir()) and not IndexFolder(out).is_index():
        raise IndexFileError(
            f"--out {out} is a non-empty folder that is not an index made by `retrieval index "
            f"build` (no {MANIFEST} of format {FORMAT}); nothing was changed: choose another "
            f"--out or empty the folder"
        )


def own_names(out: Path, new: Path) -> set[str]:
    """Top-level names in the index folder ``out`` that this project wrote: the manifest,
    config copy and lock, each file its manifest lists, every generation of the table's
    and the built-in backends' files (and their temporary names), and whatever the new
    build ``new`` holds. Anything else in ``out`` is the user's."""
    from retrieval.index.faiss_backend import FAISS_FILE
    from retrieval.index.lancedb_backend import LANCE_DIR
    from retrieval.index.milvus_backend import LITE_DIR
    from retrieval.store.lock import LOCK

    index = IndexFolder(out)
    names = {MANIFEST, index.config.name, LOCK, LANCE_DIR, LITE_DIR}
    names |= {p.name for p in new.iterdir()}
    names |= {Path(name).parts[0] for name in index.recorded_files() if Path(name).parts}
    generations = "|".join(
        re.escape(stem) + r"(\.\d+)?\." + re.escape(suffix)
        for stem, _, suffix in (n.partition(".") for n in (VECTORS, META, FAISS_FILE))
    )
    partial = rf"\.[0-9a-f]+{re.escape(PARTIAL_SUFFIX)}"  # store.atomic's temporary names
    pattern = re.compile(
        rf"\.?({generations}|{'|'.join(map(re.escape, names))})({partial}|\.lock)?"
    )
    return {p.name for p in out.iterdir() if pattern.fullmatch(p.name)}


def _replace(out: Path, new: Path) -> None:
    """Puts the finished index folder ``new`` at ``out``, checking ``out`` again first (it
    may have changed during the build). The user's own files in an old index folder (a
    gallery page, notes: whatever the project did not write, :func:`own_names`) are moved
    into the new folder first and so kept; the old index is then moved aside and deleted.
    If the swap fails, they are moved back."""
    check_out(out)
    if not out.exists():
        new.rename(out)
        return
    kept = sorted({p.name for p in out.iterdir()} - own_names(out, new))
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    moved: list[str] = []
    try:
        for name in kept:
            (out / name).rename(new / name)
            moved.append(name)
        out.rename(aside / out.name)
        try:
            new.rename(out)
        except BaseException:
            (aside / out.name).rename(out)
            raise
    except BaseException:
        for name in moved:
            (new / name).rename(out / name)
        with contextlib.suppress(OSError):
            aside.rmdir()  # empty again once the old index is back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def build_index(
    run_dir: str | Path,
    backend: str = "exact",
    out: str | Path | None = None,
    device: str = "auto",
    recall_k: int = 50,
    recall_target: float = 0.99,
    num_queries: int = 100,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Builds an index over a run's stored representatives.

    Args:
        run_dir: the run folder (``embeddings/``, ``config.yaml``).
        backend: a registered backend (``exact``, ``faiss``, ``faiss-flat``, ...).
        out: the index folder (default ``RUN_DIR/index/BACKEND``); an index this
            project built there is replaced (files in it the project did not write are
            kept), any other non-empty folder (or a file) is refused and left as it is.
        device: where exact scoring runs (``auto``: GPU when present).
        recall_k: K of the recall@K recorded against exact search.
        recall_target: recall an approximate backend is tuned to reach.
        num_queries: queries for tuning and measuring recall (half each).
        progress: show progress bars.
        options: backend settings (e.g. ``nprobe``, ``overfetch``).

    Returns:
        The index folder.
    """
    if not 0 < recall_target <= 1 or recall_k < 1:
        raise ConfigError(
            f"recall target {recall_target} / K {recall_k}: the target is a fraction in "
            f"(0, 1] (e.g. --recall-target 0.99) and K at least 1 (e.g. --recall-k 50)"
        )
    run_dir = Path(run_dir).resolve()
    store = open_run_store(run_dir)
    out = Path(out) if out else run_dir / "index" / backend
    check_out(out)  # never replaces what the project did not write
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    index: Backend | None = None
    try:
        start = time.perf_counter()
        dim = embed_dim(store)
        index = create_backend(backend, tmp, dim, device, **options)
        add_run(index, store, progress, RunFolder(run_dir).live_ids())
        index.finish(progress)
        table = index.table
        if table is None or table.num_rows == 0:  # finish() always sets the table
            raise IndexFileError(f"{run_dir}: no image has a valid representative to index")
        build_s = time.perf_counter() - start
        queries, source = recall_queries(run_dir, table, num_queries, seed=0)
        recall = measure(index, queries, recall_k, recall_target, device)
        if recall["queries"]:
            recall["source"] = source
        config = RunFolder(run_dir).config
        if config.exists():
            shutil.copy(config, IndexFolder(tmp).config)
        fingerprint = store.read_manifest()["fingerprint"]
        manifest = IndexManifest(
            format=FORMAT,
            code_version=retrieval.__version__,
            run=str(run_dir),
            fingerprint=fingerprint,
            retriever=fingerprint.get("retriever"),
            embed_dim=dim,
            backend=backend,
            backend_state=index.state(),
            approximate=index.approximate,
            score_rule=SCORE_RULE,
            generation=0,
            recall=recall,
            recall_settings={"k": recall_k, "target": recall_target, "queries": num_queries},
            build_seconds=build_s,
            **sizes(index, tmp),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            history=[],
        )
        IndexFolder(tmp).write_manifest(manifest)
    except BaseException:
        if index is not None:
            index.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index.close()  # before the rename: an embedded engine holds the folder open
    try:
        _replace(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
