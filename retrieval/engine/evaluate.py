"""One evaluation run: embed (Lightning predict, shards) -> score (exact) -> metrics -> report.

The two phases stay separate: embedding writes shards under ``<run>/embeddings``;
scoring reads them back. A rerun whose image embeddings would be identical (same
retriever options, same images) re-scores from the stored shards without running the
backbone, so new prompts or protocol options cost seconds.
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader, Subset

import retrieval
from retrieval.config import ConfigError, as_dict, build_retriever, to_yaml
from retrieval.data.registry import create_dataset, dataset_parameters
from retrieval.engine.module import EmbedModule
from retrieval.engine.progress import ImageProgress
from retrieval.engine.reaggregate import dense_source, reaggregate
from retrieval.engine.writer import ShardWriter
from retrieval.metrics import RetrievalEvaluation
from retrieval.retrievers.base import Retriever
from retrieval.store import ScoreResult, ShardStore, score_store
from retrieval.text import embed_queries

log = logging.getLogger("retrieval")


@dataclass
class RunResult:
    """What an evaluation produced (rank 0 only)."""

    run_dir: Path
    metrics: dict[str, Any]
    embedded: int  # images embedded by this run; 0 when it only re-scored stored shards


def build_dataset(cfg: DictConfig, transform: Any):
    options = as_dict(cfg.data)
    name = options.pop("name")
    missing = [k for k in ("annotations", "images") if options.get(k) in (None, "")]
    if missing:
        raise ConfigError(
            f"data.{missing[0]} is not set: pass data.{missing[0]}=PATH on the command line "
            f"(see `retrieval data check` and the README's dataset section)"
        )
    if "federated" in dataset_parameters(name):  # LVIS: a protocol option, not a data one
        options["federated"] = cfg.protocol.lvis_federated
    return create_dataset(name, transform=transform, **options)


def embedding_fingerprint(cfg: DictConfig, retriever: Retriever) -> dict:
    """Everything that determines the stored embeddings; a mismatch means re-embedding."""
    return {
        "retriever": {"name": cfg.retriever.name, **retriever.describe()},
        "retriever_options": as_dict(cfg.retriever),
        "dtype": cfg.store.dtype,
        "data": {
            "name": cfg.data.name,
            "annotations": str(Path(cfg.data.annotations).resolve()),
            "images": str(Path(cfg.data.images).resolve()),
        },
        "precision": cfg.trainer.precision,
        "dense_from": str(Path(cfg.store.dense_from).resolve()) if cfg.store.dense_from else None,
    }


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return keys


def plan_embedding(
    store: ShardStore, fingerprint: dict, image_ids: np.ndarray, resume: str
) -> np.ndarray:
    """The image ids still to embed, after checking the stored shards may be reused.

    ``run.resume``: ``auto`` reuses shards made with the same settings and embeds only
    the missing images; ``never`` refuses to touch a folder that holds shards; ``force``
    reuses shards even where settings differ (warning with the differences).

    Raises:
        ConfigError: the shards cannot be reused; nothing is deleted or mixed.
    """
    if not store.shard_paths():
        return image_ids
    if resume == "never":
        raise ConfigError(
            f"run.resume=never but {store.root} already holds embeddings. Choose another "
            f"run.output_dir, delete that folder, or use run.resume=auto to reuse them."
        )
    diff = _differences(store.read_manifest().get("fingerprint") or {}, fingerprint)
    if diff and resume == "auto":
        raise ConfigError(
            f"{store.root} holds embeddings made with different settings:\n  "
            + "\n  ".join(diff)
            + "\nSet another run.output_dir, delete that folder to re-embed, or pass "
            "run.resume=force if the difference cannot change the embeddings."
        )
    for line in diff:
        log.warning("run.resume=force: reusing shards despite %s", line)
    stored = store.accounted_ids()
    if len(np.unique(stored)) != len(stored):
        raise ConfigError(f"{store.root}: an image appears in two shards; delete the folder")
    return image_ids[~np.isin(image_ids, stored)]


def make_trainer(cfg: DictConfig, writer: ShardWriter) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        logger=False,
        callbacks=[writer, ImageProgress()] if cfg.run.progress else [writer],
        enable_progress_bar=False,
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
    fingerprint = embedding_fingerprint(cfg, retriever)
    todo = plan_embedding(store, fingerprint, dataset.image_ids, cfg.run.resume)
    writer = ShardWriter(store, cfg.store.shard_size, cfg.store.shard_mb)
    trainer = make_trainer(cfg, writer)

    source = dense_source(cfg.store.dense_from) if cfg.store.dense_from else None
    extract_s = 0.0
    if len(todo):
        if trainer.is_global_zero:
            store.remove_partial_files()
            store.write_manifest(
                fingerprint=fingerprint, format=1, code_version=retrieval.__version__
            )
    if len(todo) and source is not None:
        if not trainer.is_global_zero:
            return None
        start = time.perf_counter()
        reaggregate(
            *source,
            store,
            retriever,
            todo,
            cfg.score.device,
            cfg.loader.batch_size,
            cfg.run.progress,
        )
        extract_s = time.perf_counter() - start
    elif len(todo):
        position = {int(i): k for k, i in enumerate(dataset.image_ids)}
        subset = Subset(dataset, [position[int(i)] for i in todo])
        loader = DataLoader(
            subset,
            batch_size=cfg.loader.batch_size,
            num_workers=cfg.loader.num_workers,
            collate_fn=dataset.collate,
        )
        start = time.perf_counter()
        trainer.predict(EmbedModule(retriever, policy), loader, return_predictions=False)
        extract_s = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    reused = len(dataset.image_ids) - len(todo)
    log.info(
        "embeddings in %s: %d images embedded now%s, %d reused from stored shards",
        store.root,
        len(todo),
        f" (aggregated from {source[0].root})" if source else "",
        reused,
    )
    if len(todo):
        store.record_checksums()

    from retrieval.report.files import write_run  # report imports wandb: keep it off ranks > 0

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    gt_all = dataset.ground_truth()
    text = query_embeddings(cfg, retriever, [c.query for c in gt_all.categories], run_dir)
    scored = score_store(
        store,
        text,
        retriever.score,
        cfg.score.device,
        cfg.score.max_memory_gb,
        only=dataset.image_ids,
    )
    gt = gt_all.select_images(scored.image_ids)
    metrics = compute_metrics(cfg, gt, scored)
    wanted = set(dataset.image_ids.tolist())
    failures = list(dataset.failures_at_start) + [
        f for f in scored.failures if f["image_id"] in wanted
    ]
    metrics.update(run_facts(cfg, retriever, scored, failures, extract_s, len(todo), gt.notes))
    write_run(cfg, run_dir, metrics, gt, scored)
    return RunResult(run_dir, metrics, embedded=len(todo))


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
    embedded: int,
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
            "extract_images_per_second": embedded / extract_s if extract_s else None,
            "images_embedded": embedded,
            "score_seconds": scored.seconds,
            "score_ms_per_image": 1000 * scored.seconds / max(n, 1),
            "reused_embeddings": n - embedded,
            "peak_memory_mb": peak_memory_mb(),
        },
        "retriever": {"name": cfg.retriever.name, **retriever.describe()},
        "random_weights": retriever.random_weights,
    }
