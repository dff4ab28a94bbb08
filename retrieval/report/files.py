"""The run folder: the files docs/architecture.md lists, written from one metrics dict,
each whole or not at all (:mod:`retrieval.store.atomic`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from retrieval.data.ground_truth import GroundTruth
from retrieval.report.console import print_summary, summary_markdown
from retrieval.report.plots import plot_run
from retrieval.report.sizes import PER_SIZE_FILE, ap_by_size, size_bins
from retrieval.report.wandb_log import log_to_wandb
from retrieval.store import ScoreResult
from retrieval.store.atomic import partial_glob, replace_atomically, write_atomic

PER_CATEGORY_KEYS = ("ap@{k}", "ap", "ap@{k}_hits", "ap@{k}_s-m", "ap_s-m")
COUNT_KEYS = ("positives", "positives_s-m")


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def per_category_rows(metrics: dict[str, Any], gt: GroundTruth, top_k: int) -> list[dict]:
    """One row per category: id, names, split, P, and every per-category AP."""
    keys = [k.format(k=top_k) for k in PER_CATEGORY_KEYS]
    rows = []
    for q, cat in enumerate(gt.categories):
        row: dict[str, Any] = {
            "category_id": cat.id,
            "name": cat.name,
            "query": cat.query,
            "split": cat.split or "",
        }
        row.update({k: int(metrics[k][q]) for k in COUNT_KEYS})
        row.update({k: float(metrics[k][q]) for k in keys})
        rows.append(row)
    return rows


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (everything that is not a per-category array)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, np.ndarray)}


def write_run(
    cfg: DictConfig,
    run_dir: Path,
    metrics: dict[str, Any],
    gt: GroundTruth,
    scored: ScoreResult,
) -> None:
    """Writes per_category.csv, scores.npz, summary.md, plots, then metrics.json; prints;
    logs wandb. ``metrics.json`` comes last and whole (a temporary name renamed into
    place): its presence says every results file is there (`retrieval sweep` skips such
    a run), so a run killed while writing them is scored again, not taken as done."""
    top_k = cfg.protocol.top_k
    rows = per_category_rows(metrics, gt, top_k)
    summary = headline(metrics)
    # results of an earlier scoring
    for stale in [run_dir / "metrics.json", *run_dir.glob(partial_glob("metrics.json"))]:
        stale.unlink(missing_ok=True)

    def per_category(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["category_id"])
            out.writeheader()
            out.writerows(rows)

    write_atomic(run_dir / "per_category.csv", per_category)
    replace_atomically(
        run_dir / "scores.npz",
        lambda f: np.savez_compressed(
            f,
            scores=scored.scores.astype(np.float32),
            image_ids=scored.image_ids,
            category_ids=gt.category_ids,
        ),
    )
    if summary["skipped_images"]:
        skipped = "".join(f"{f['path']}\t{f['reason']}\n" for f in summary["skipped_images"])
        write_atomic(run_dir / "skipped_images.txt", lambda tmp: tmp.write_text(skipped))
    per_size = ap_by_size(
        scored.scores,
        gt.relevant,
        gt.ignore,
        gt.max_area,
        gt.image_ids,
        size_bins(large_area=cfg.protocol.large_area),
        top_k=top_k,
    )
    per_size_text = json.dumps(_clean(per_size), indent=2)
    write_atomic(run_dir / PER_SIZE_FILE, lambda tmp: tmp.write_text(per_size_text))
    plots = plot_run(run_dir, rows, per_size, top_k)
    markdown = summary_markdown(cfg, summary, rows)
    write_atomic(run_dir / "summary.md", lambda tmp: tmp.write_text(markdown))
    text = json.dumps(_clean({**summary, "per_category": rows}), indent=2, default=str)
    write_atomic(run_dir / "metrics.json", lambda tmp: tmp.write_text(text))
    print_summary(cfg, summary, rows)
    log_to_wandb(cfg, run_dir, summary, rows, plots)
