"""One evaluation run: embed (Lightning predict, shards) -> score (exact) -> metrics -> report.

The two phases stay separate: embedding writes shards under ``<run>/embeddings``;
scoring reads them back. A rerun whose image embeddings would be identical (same
retriever options, same images) re-scores from the stored shards without running the
backbone, so new prompts or protocol options cost seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from retrieval.config import ConfigError, as_dict, to_yaml
from retrieval.data.registry import create_dataset
from retrieval.engine.module import EmbedModule
from retrieval.engine.writer import ShardWriter
from retrieval.metrics import RetrievalEvaluation
from retrieval.retrievers.base import Retriever
from retrieval.retrievers.registry import create_retriever
from retrieval.store import ScoreResult, ShardStore, score_store
from retrieval.text import embed_queries

log = logging.getLogger("retrieval")


@dataclass
class RunResult:
    """What an evaluation produced (rank 0 only)."""

    run_dir: Path
    metrics: dict[str, Any]
    embedded: bool  # False when the stored shards were re-scored


def build_retriever(cfg: DictConfig) -> Retriever:
    options = as_dict(cfg.retriever)
    return create_retriever(options.pop("name"), **options)


def build_dataset(cfg: DictConfig, transform: Any):
    options = as_dict(cfg.data)
    name = options.pop("name")
    missing = [k for k in ("annotations", "images") if options.get(k) in (None, "")]
    if missing:
        raise ConfigError(
            f"data.{missing[0]} is not set: pass data.{missing[0]}=PATH on the command line "
            f"(see `retrieval data check` and the README's dataset section)"
        )
    return create_dataset(name, transform=transform, **options)


def embedding_fingerprint(cfg: DictConfig, retriever: Retriever, image_ids: np.ndarray) -> dict:
    """Everything that determines the stored embeddings; a mismatch means re-embedding."""
    return {
        "retriever": {"name": cfg.retriever.name, **retriever.describe()},
        "retriever_options": as_dict(cfg.retriever),
        "dtype": cfg.store.dtype,
        "data": {
            "name": cfg.data.name,
            "annotations": str(Path(cfg.data.annotations).resolve()),
            "images": str(Path(cfg.data.images).resolve()),
            "num_images": int(len(image_ids)),
            "image_ids_sha256": hashlib.sha256(image_ids.astype(np.int64).tobytes()).hexdigest(),
        },
        "precision": cfg.trainer.precision,
    }


def _stored_ids(store: ShardStore) -> set[int]:
    ids: set[int] = set()
    for shard in store.iter_shards():
        ids.update(int(i) for i in shard.image_ids)
        ids.update(int(f["image_id"]) for f in shard.failures)
    return ids


def reuse_stored(store: ShardStore, fingerprint: dict, image_ids: np.ndarray) -> bool:
    """True when complete shards for exactly this fingerprint exist (score-only path).

    Raises:
        ConfigError: shards exist but were made by different options or are incomplete;
            they are never mixed with new ones.
    """
    if not store.shard_paths():
        return False
    stored = store.read_manifest().get("fingerprint")
    if stored != fingerprint:
        diff = sorted(
            k for k in set(fingerprint) | set(stored or {})
            if (stored or {}).get(k) != fingerprint.get(k)
        )
        raise ConfigError(
            f"{store.root} holds embeddings made with different settings ({', '.join(diff)}). "
            f"Set another run.output_dir, or delete that folder to re-embed."
        )
    if _stored_ids(store) != {int(i) for i in image_ids}:
        raise ConfigError(
            f"{store.root} holds an incomplete embedding run (an interrupted job?). Delete "
            f"the folder to start over, or set another run.output_dir."
        )
    return True


def make_trainer(cfg: DictConfig, writer: ShardWriter) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        logger=False,
        callbacks=[writer],
        enable_progress_bar=cfg.run.progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=True,
    )


def query_embeddings(cfg: DictConfig, retriever: Retriever, queries: list[str], run_dir: Path):
    """Text embeddings, cached in the run folder for the same retriever and prompts."""
    path = run_dir / "text_embeddings.pt"
    key = {"queries": queries, "prompts": cfg.text.prompts, "retriever": retriever.describe()}
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == json.dumps(key, sort_keys=True, default=str):
            return cached["embeddings"]
    with torch.no_grad():
        emb = embed_queries(retriever.encode_text, queries, cfg.text.prompts, cfg.text.batch_size)
    torch.save({"key": json.dumps(key, sort_keys=True, default=str), "embeddings": emb.cpu()}, path)
    return emb


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(cfg: DictConfig) -> RunResult | None:
    """Runs one evaluation; returns the result on global rank 0, None on other ranks."""
    L.seed_everything(cfg.run.seed, verbose=False)
    run_dir = Path(cfg.run.output_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retriever = build_retriever(cfg)
    for w in caught:
        log.warning("%s", w.message)
    dataset = build_dataset(cfg, retriever.image_transform)
    policy = cfg.data.on_bad_image
    dataset.on_bad_image = "skip"  # the module applies the policy in the main process
    store = ShardStore(run_dir / "embeddings", cfg.store.dtype)
    fingerprint = embedding_fingerprint(cfg, retriever, dataset.image_ids)
    writer = ShardWriter(store, cfg.store.shard_size)
    trainer = make_trainer(cfg, writer)
    reuse = reuse_stored(store, fingerprint, dataset.image_ids)

    extract_s = 0.0
    if not reuse:
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            store.write_manifest(fingerprint=fingerprint, format=1)
        loader = DataLoader(
            dataset,
            batch_size=cfg.loader.batch_size,
            num_workers=cfg.loader.num_workers,
            collate_fn=dataset.collate,
            persistent_workers=False,
        )
        start = time.perf_counter()
        trainer.predict(EmbedModule(retriever, policy), loader, return_predictions=False)
        extract_s = time.perf_counter() - start
        if not trainer.is_global_zero:
            return None
        store.record_checksums()
    elif not trainer.is_global_zero:
        return None
    log.info("%s %s", "re-scoring stored embeddings in" if reuse else "embedded into", store.root)

    from retrieval.report.files import write_run  # report imports wandb: keep it off ranks > 0

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    gt_all = dataset.ground_truth()
    text = query_embeddings(cfg, retriever, [c.query for c in gt_all.categories], run_dir)
    scored = score_store(store, text, retriever.score, cfg.score.device, cfg.score.max_memory_gb)
    gt = gt_all.select_images(scored.image_ids)
    metrics = compute_metrics(cfg, gt, scored)
    failures = list(dataset.failures_at_start) + scored.failures
    metrics.update(
        run_facts(cfg, retriever, scored, failures, extract_s, reused=reuse, gt_notes=gt.notes)
    )
    write_run(cfg, run_dir, metrics, gt, scored)
    return RunResult(run_dir, metrics, embedded=not reuse)


def compute_metrics(cfg: DictConfig, gt, scored: ScoreResult) -> dict[str, Any]:
    """Runs the torchmetrics metric over the per-category rankings."""
    metric = RetrievalEvaluation(
        top_k=cfg.protocol.top_k,
        large_area=cfg.protocol.large_area,
        splits=[c.split for c in gt.categories],
        sync_on_compute=False,
    )
    metric.update(
        torch.from_numpy(scored.scores),
        torch.from_numpy(gt.relevant),
        torch.from_numpy(gt.ignore),
        torch.from_numpy(gt.max_area),
        torch.from_numpy(gt.image_ids),
    )
    return metric.compute()


def run_facts(
    cfg: DictConfig,
    retriever: Retriever,
    scored: ScoreResult,
    failures: list[dict[str, Any]],
    extract_s: float,
    reused: bool,
    gt_notes: dict[str, Any],
) -> dict[str, Any]:
    """Protocol options, cost and provenance that every results file repeats."""
    n = len(scored.image_ids)
    return {
        "protocol": {
            "top_k": cfg.protocol.top_k,
            "ap_normalisation": "min(K, P); map@K_hits divides by hits in the top K",
            "large_area": cfg.protocol.large_area,
            "small_medium": "images whose largest instance area >= large_area are left out",
            "lvis_federated": cfg.protocol.lvis_federated,
            "prompts": cfg.text.prompts,
            "ties": "equal scores are ordered by ascending image id",
            "skipped_categories": "categories with no relevant image are skipped, not AP 0",
            "scale": "fractions in [0, 1]",
            **gt_notes,
        },
        "images": n,
        "skipped_images": failures,
        "reps_per_image": {
            "mean": float(scored.reps_per_image.mean()) if n else 0.0,
            "max": int(scored.reps_per_image.max()) if n else 0,
        },
        "bytes_per_image": scored.bytes_per_image,
        "timing": {
            "extract_seconds": extract_s,
            "extract_images_per_second": n / extract_s if extract_s else None,
            "score_seconds": scored.seconds,
            "score_ms_per_image": 1000 * scored.seconds / max(n, 1),
            "reused_embeddings": reused,
            "peak_memory_mb": peak_memory_mb(),
        },
        "retriever": {"name": cfg.retriever.name, **retriever.describe()},
        "random_weights": retriever.random_weights,
    }
