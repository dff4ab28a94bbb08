"""The score phase: stored shards -> per-category rankings -> metrics -> run folder.

Cheap and repeatable (new prompts, protocol options or metrics reuse the stored
embeddings) and free of Lightning: it needs the run's retriever only for the text side
and its ``score`` function.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import DictConfig

from retrieval.config import ProtocolConfig, TextConfig, save_run_config
from retrieval.data.base import RetrievalDataset, is_labelled
from retrieval.data.ground_truth import GroundTruth
from retrieval.engine.parts import RunParts, build_parts
from retrieval.engine.settings import RunSettings
from retrieval.errors import ConfigError, StoreError
from retrieval.metrics import RetrievalEvaluation
from retrieval.registry import DATASETS
from retrieval.retrievers.base import Retriever
from retrieval.store import ScoreResult, score_store
from retrieval.store.run_folder import RunFolder
from retrieval.store.shards import read_cache, write_atomic
from retrieval.text import embed_queries

if TYPE_CHECKING:
    from retrieval.engine.embedding import EmbedResult

log = logging.getLogger("retrieval")


@dataclass
class RunResult:
    """What an evaluation produced (rank 0 only)."""

    run_dir: Path
    metrics: dict[str, Any]
    embedded: int  # images embedded by this run; 0 when it only re-scored stored shards


def score(
    cfg: DictConfig, parts: RunParts | None = None, embedded: EmbedResult | None = None
) -> RunResult:
    """Scores the run folder's stored embeddings against the dataset's ground truth and
    writes the results files (metrics.json, per_category.csv, scores.npz, summary.md,
    plots, the wandb run).

    Args:
        cfg: a validated run config.
        parts: the run's retriever and dataset when the caller built them already.
        embedded: the embed phase's result when it ran in this process (its timing
            goes into the results); ``None`` when only scoring.

    Raises:
        StoreError: the run folder holds no embeddings (run ``retrieval embed`` first).
    """
    require_labels(cfg)
    settings = RunSettings.of(cfg)
    parts = parts or build_parts(cfg)
    retriever, dataset = parts.retriever, cast(RetrievalDataset, parts.dataset)
    run_dir = Path(settings.run.output_dir)
    store = embedded.store if embedded else RunFolder(run_dir).store(settings.store.dtype)
    if not store.shard_paths():
        raise StoreError(
            f"{store.root} holds no embeddings to score: run `retrieval embed` (or `retrieval "
            f"eval`) with run.output_dir={run_dir} first"
        )
    from retrieval.report.files import write_run  # report imports wandb: only once scoring

    save_run_config(cfg, run_dir)
    gt_all = dataset.ground_truth()
    queries = [c.query for c in gt_all.categories]
    text = query_embeddings(settings.text, retriever, queries, run_dir)
    scored = score_store(
        store,
        text,
        retriever.score,
        settings.score.device,
        settings.score.max_memory_gb,
        only=dataset.image_ids,
    )
    gt = gt_all.select_images(scored.image_ids)
    metrics = compute_metrics(settings.protocol, gt, scored)
    wanted = set(dataset.image_ids.tolist())
    failures = list(dataset.failures_at_start) + [
        f for f in scored.failures if f["image_id"] in wanted
    ]
    n_embedded = embedded.embedded if embedded else 0
    seconds = embedded.seconds if embedded else 0.0
    name = str(cfg.retriever.name)
    facts = run_facts(settings, name, retriever, scored, failures, seconds, n_embedded, gt.notes)
    metrics.update(facts)
    write_run(cfg, run_dir, metrics, gt, scored)
    return RunResult(run_dir, metrics, embedded=n_embedded)


def require_labels(cfg: DictConfig) -> None:
    """Refuses to score a dataset without ground truth, before any model is built.

    Raises:
        ConfigError: ``data.name`` is an unlabelled collection.
    """
    name = cfg.data.name
    if not is_labelled(DATASETS.get(name)):
        raise ConfigError(
            f"data.name={name} is an unlabelled collection: there is nothing to score. Embed "
            f"it with `retrieval embed`, then `retrieval index build RUN` and `retrieval search`"
        )


def query_embeddings(
    text: TextConfig, retriever: Retriever, queries: list[str], run_dir: Path
) -> torch.Tensor:
    """Text embeddings, cached in the run folder for the same retriever and prompts.

    The cache is only a cache: one that cannot be read (truncated, empty, a pickle, not
    the dict this writes) is rebuilt with a warning. It is written atomically.
    """
    path = run_dir / "text_embeddings.pt"
    key = json.dumps(
        {"queries": queries, "prompts": text.prompts, "retriever": retriever.describe()},
        sort_keys=True,
        default=str,
    )
    cached = read_cache(path)
    if cached is not None and cached.get("key") == key:
        embeddings = cached.get("embeddings")
        if isinstance(embeddings, torch.Tensor) and embeddings.shape[0] == len(queries):
            return embeddings
        log.warning("%s: cached text embeddings have the wrong shape; rebuilding it", path)
    with torch.no_grad():
        emb = embed_queries(retriever.encode_text, queries, text.prompts, text.batch_size)
    write_atomic(path, lambda tmp: torch.save({"key": key, "embeddings": emb.cpu()}, tmp))
    return emb


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compute_metrics(
    protocol: ProtocolConfig, gt: GroundTruth, scored: ScoreResult
) -> dict[str, Any]:
    """Runs the torchmetrics metric over the per-category rankings."""
    metric = RetrievalEvaluation(
        top_k=protocol.top_k,
        large_area=protocol.large_area,
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
    settings: RunSettings,
    retriever_name: str,
    retriever: Retriever,
    scored: ScoreResult,
    failures: list[dict[str, Any]],
    extract_s: float,
    embedded: int,
    gt_notes: dict[str, Any],
) -> dict[str, Any]:
    """Protocol options, cost and provenance that every results file repeats."""
    n = len(scored.image_ids)
    protocol = settings.protocol
    return {
        "protocol": {
            "top_k": protocol.top_k,
            "ap_normalisation": "min(K, P); map@K_hits divides by hits in the top K",
            "large_area": protocol.large_area,
            "small_medium": "images whose largest instance area >= large_area are left out",
            "lvis_federated": protocol.lvis_federated,
            "prompts": settings.text.prompts,
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
        "retriever": {"name": retriever_name, **retriever.describe()},
        "random_weights": retriever.random_weights,
    }
