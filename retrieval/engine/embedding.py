"""The embed phase: a dataset through a retriever into a run folder's shards.

Expensive, distributed and resumable: a Lightning predict loop over every device, each
process writing its own shards; or, with ``store.dense_from``, Cluster-CLIP aggregated
from a Dense-CLIP run's shards without the backbone. Images already in the store are
not embedded again, and no Trainer is built when nothing is left to embed.
"""

from __future__ import annotations

import csv
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

import retrieval
from retrieval.config import TrainerConfig, as_dict, save_run_config
from retrieval.data.base import ImageDataset, file_identity
from retrieval.data.collection import Collection
from retrieval.engine.loading import bad_images_passed_on, embed_loader
from retrieval.engine.module import EmbedModule
from retrieval.engine.parts import RunParts, build_parts
from retrieval.engine.progress import ImageProgress
from retrieval.engine.reaggregate import dense_source, reaggregate
from retrieval.engine.settings import RunSettings
from retrieval.engine.writer import ShardWriter
from retrieval.errors import ConfigError, differences
from retrieval.factory import data_fingerprint
from retrieval.retrievers.base import Retriever
from retrieval.store import ShardStore
from retrieval.store.lock import RunLock, make_folder
from retrieval.store.run_folder import RunFolder

log = logging.getLogger("retrieval")


@dataclass
class EmbedResult:
    """What the embed phase did in this process."""

    store: ShardStore
    embedded: int  # images embedded now (all ranks); 0 when every image was stored
    reused: int  # images found in the store from earlier runs (or recorded unreadable)
    seconds: float  # wall time of the backbone or re-aggregation pass
    is_global_zero: bool  # this process is the one that scores and reports
    skipped: int = 0  # images read now that could not be (listed in SKIPPED), not embedded
    skipped_total: int = 0  # every image of the dataset left out, as SKIPPED lists them


def embedding_fingerprint(cfg: DictConfig, retriever: Retriever) -> dict:
    """Everything that determines the stored embeddings; a mismatch means re-embedding."""
    return {
        "retriever": {"name": cfg.retriever.name, **retriever.describe()},
        "retriever_options": as_dict(cfg.retriever),
        "dtype": cfg.store.dtype,
        "data": data_fingerprint(cfg),
        "precision": cfg.trainer.precision,
        "dense_from": str(Path(cfg.store.dense_from).resolve()) if cfg.store.dense_from else None,
    }


def plan_embedding(
    store: ShardStore,
    fingerprint: dict,
    image_ids: np.ndarray,
    resume: str,
    verify: str = "fast",
    on_bad_image: str = "skip",
) -> np.ndarray:
    """The image ids still to embed, after checking the stored shards may be reused.

    ``run.resume``: ``auto`` reuses shards made with the same settings and embeds only
    the missing images; ``never`` refuses to touch a folder that holds shards; ``force``
    reuses shards even where settings differ (warning with the differences).
    ``run.verify``: every reused shard is checked against the checksums in the manifest
    (``fast``: hashed only when its size or mtime changed; ``full``: always hashed). A
    listed shard that is gone is fine here: its images are simply embedded again.

    An image a shard records as unreadable counts as done (skipped) only while its file
    is the one that failed (same size and mtime as recorded) and ``on_bad_image`` is
    ``skip``; otherwise it is embedded again (a fixed file into a new shard, whose row
    supersedes the old record; a still-bad one raises under ``error``).

    Raises:
        ConfigError: the shards cannot be reused; nothing is deleted or mixed.
        StoreError: a stored shard was altered or cannot be read (names it and the fix).
    """
    if not store.shard_paths():
        return image_ids
    if resume == "never":
        raise ConfigError(
            f"run.resume=never but {store.root} already holds embeddings. Choose another "
            f"run.output_dir, delete that folder, or use run.resume=auto to reuse them."
        )
    diff = differences(store.read_manifest().get("fingerprint") or {}, fingerprint)
    if diff and resume == "auto":
        raise ConfigError(
            f"{store.root} holds embeddings made with different settings:\n  "
            + "\n  ".join(diff)
            + "\nSet another run.output_dir, delete that folder to re-embed, or pass "
            "run.resume=force if the difference cannot change the embeddings."
        )
    for line in diff:
        log.warning("run.resume=force: reusing shards despite %s", line)
    store.verify(verify, allow_missing=True)
    embedded, failures = store.contents()
    if len(np.unique(embedded)) != len(embedded):
        raise ConfigError(f"{store.root}: an image appears in two shards; delete the folder")
    skipped = [int(f["image_id"]) for f in failures if not _retry(f, on_bad_image)]
    done = np.concatenate([embedded, np.array(skipped, dtype=np.int64)])
    todo = image_ids[~np.isin(image_ids, done)]
    retried = np.isin(todo, [int(f["image_id"]) for f in failures]).sum()
    if retried:
        why = "data.on_bad_image=error" if on_bad_image == "error" else "their files changed"
        log.info("retrying %d image(s) recorded as unreadable: %s", retried, why)
    return todo


def _retry(failure: dict, on_bad_image: str) -> bool:
    """Whether a stored failure record is to be tried again: always under ``error``;
    under ``skip`` when its file is no longer the one that failed (a record without the
    file's identity, written before shards kept it, is kept as it is)."""
    if on_bad_image == "error":
        return True
    return "file" in failure and file_identity(failure.get("path")) != failure["file"]


def make_trainer(t: TrainerConfig, writer: ShardWriter, progress: bool) -> L.Trainer:
    """The predict-only Trainer of ``trainer.*`` (no logger, checkpoints or summary),
    with a progress bar when ``progress`` (``run.progress``)."""
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=cast(Any, t.precision),  # one of config.PRECISIONS (validated)
        logger=False,
        callbacks=[writer, ImageProgress()] if progress else [writer],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=True,
    )


def global_rank() -> int:
    """This process's global rank, which Lightning sets on ``rank_zero_only`` at import."""
    # lightning_utilities declares rank_zero_only as a function; ``rank`` is set on it later.
    return rank_zero_only.rank  # type: ignore[attr-defined]


def embed(cfg: DictConfig, parts: RunParts | None = None, locked: bool = False) -> EmbedResult:
    """Embeds every image of the configured dataset not yet in ``<run>/embeddings``.

    Args:
        cfg: a validated run config (``load_config``).
        parts: the run's retriever and dataset when the caller built them already.
        locked: the caller already holds the run folder's lock (``evaluate`` takes it
            before building the model and keeps it through scoring).

    Global rank 0 holds the run folder's lock (``<run>/.lock``) from before it reads the
    stored shards until their checksums are recorded; another run into the same folder
    stops at once naming the holder. Under it, rank 0 records an unlabelled dataset's
    collection table (:func:`sync_collection`) before embedding. The other ranks of a
    distributed run (started by rank 0's Trainer, after that) read the table it wrote and
    write their own shards under rank 0's lock.

    Returns:
        What was done; ``is_global_zero`` tells the one process that goes on to score.

    Raises:
        StoreError: another run holds the folder's lock, or a stored shard was altered.
    """
    settings = RunSettings.of(cfg)
    run_dir = Path(settings.run.output_dir)
    if global_rank() != 0:
        return _embed(cfg, settings, parts or build_parts(cfg))
    with (
        nullcontext() if locked else RunLock(run_dir)
    ):  # before the model is built: a second run stops at once
        make_folder(RunFolder(run_dir).embeddings, "run.output_dir")
        parts = parts or build_parts(cfg)
        sync_collection(parts.dataset)
        return _embed(cfg, settings, parts)


def sync_collection(dataset: ImageDataset) -> bool:
    """Writes an unlabelled dataset's collection table into the run folder when it
    changed (the dataset's constructor only computed it); whether it wrote. Called on
    global rank 0 under the run lock; a dataset without a collection has nothing to do.

    Raises:
        StoreError: the run holds embeddings but no table, so their ids name no files.
    """
    collection = getattr(dataset, "collection", None)
    return isinstance(collection, Collection) and collection.sync()


def _embed(cfg: DictConfig, settings: RunSettings, parts: RunParts) -> EmbedResult:
    retriever, dataset = parts.retriever, parts.dataset
    run, store_cfg, loader = settings.run, settings.store, settings.loader
    run_dir = Path(run.output_dir)
    store = RunFolder(run_dir).store(store_cfg.dtype)
    fingerprint = embedding_fingerprint(cfg, retriever)
    policy = dataset.on_bad_image
    todo = plan_embedding(store, fingerprint, dataset.image_ids, run.resume, run.verify, policy)
    if not len(todo):
        if global_rank() != 0:
            return EmbedResult(store, 0, len(dataset.image_ids), 0.0, False)
        tally = _tally(store, dataset, todo, run_dir)
        log.info("embeddings in %s: %s", store.root, tally.describe(run_dir))
        return EmbedResult(store, 0, tally.reused, 0.0, True, 0, tally.listed)

    source = dense_source(store_cfg.dense_from) if store_cfg.dense_from else None
    start = time.perf_counter()
    if source is not None:  # no backbone: one process aggregates stored dense features
        if global_rank() != 0:
            return EmbedResult(store, 0, len(dataset.image_ids) - len(todo), 0.0, False)
        _start_store(store, fingerprint, run_dir, cfg)
        reaggregate(
            *source, store, retriever, todo, settings.score.device, loader.batch_size, run.progress
        )
        is_zero = True
    else:
        writer = ShardWriter(store, store_cfg.shard_size, store_cfg.shard_mb)
        trainer = make_trainer(settings.trainer, writer, run.progress)
        if trainer.is_global_zero:
            _start_store(store, fingerprint, run_dir, cfg)
        with bad_images_passed_on(dataset):  # the module applies the policy itself
            batches = embed_loader(
                dataset, retriever.image_transform, todo, loader.batch_size, loader.num_workers
            )
            trainer.predict(EmbedModule(retriever, policy), batches, return_predictions=False)
        is_zero = trainer.is_global_zero
    seconds = time.perf_counter() - start
    if not is_zero:
        return EmbedResult(store, len(todo), len(dataset.image_ids) - len(todo), seconds, False)
    store.record_checksums()
    tally = _tally(store, dataset, todo, run_dir)
    how = f" (aggregated from {source[0].root})" if source else ""
    log.info("embeddings in %s%s: %s", store.root, how, tally.describe(run_dir))
    return EmbedResult(
        store, tally.embedded, tally.reused, seconds, True, tally.skipped, tally.listed
    )


SKIPPED = "skipped.csv"
"""The run folder's list of the images left out: ``path``, ``reason``, ``image_id``
(empty for a listed file that was not found), one row each; absent when none was."""


@dataclass
class Tally:
    """The dataset's images after an embed phase, counted apart."""

    embedded: int  # embedded now
    skipped: int  # read now and unreadable: left out
    reused: int  # embedded by earlier runs
    listed: int  # every image left out, now or before, as :data:`SKIPPED` lists them

    def describe(self, run_dir: Path) -> str:
        text = f"{self.embedded} images embedded now, {self.reused} reused from stored shards"
        if self.skipped:
            text += f", {self.skipped} unreadable now (left out)"
        if self.listed:
            text += f"; {self.listed} left out in all, listed in {run_dir / SKIPPED}"
        return text


def _tally(store: ShardStore, dataset: ImageDataset, todo: np.ndarray, run_dir: Path) -> Tally:
    """Counts the phase's images apart and writes :data:`SKIPPED` for those left out
    (missing when listed, or recorded unreadable in a shard), or removes a stale list.

    Only failure records that still count (:meth:`ShardStore.contents`: a file that
    reads now is no longer one) of the dataset's current images are listed."""
    ids, wanted = dataset.image_ids, set(dataset.image_ids.tolist())
    failed = [f for f in store.contents()[1] if int(f["image_id"]) in wanted]
    failed_ids = [int(f["image_id"]) for f in failed]
    skipped = int(np.isin(todo, failed_ids).sum())
    rows = list(dataset.failures_at_start) + failed
    path = run_dir / SKIPPED
    if rows:
        with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason", "image_id"])
            for row in rows:
                image_id = row.get("image_id")
                writer.writerow([row["path"], row["reason"], "" if image_id is None else image_id])
    else:
        path.unlink(missing_ok=True)
    reused = int((~np.isin(ids, todo) & ~np.isin(ids, failed_ids)).sum())
    return Tally(len(todo) - skipped, skipped, reused, len(rows))


def _start_store(store: ShardStore, fingerprint: dict, run_dir: Path, cfg: DictConfig) -> None:
    """Clears half-written files of a killed run, then records what the shards hold."""
    store.remove_partial_files()
    store.write_manifest(fingerprint=fingerprint, format=1, code_version=retrieval.__version__)
    save_run_config(cfg, run_dir)
