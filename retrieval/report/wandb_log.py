"""Weights & Biases: one run per evaluation, offline by default (sync later)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from retrieval.config import as_dict

PER_CATEGORY_TABLE = "per_category"


def log_to_wandb(
    cfg: DictConfig, run_dir: Path, summary: dict[str, Any], rows: list[dict]
) -> str | None:
    """Logs config, headline numbers (``run.summary``) and the per-category table.

    Returns the wandb run folder (``wandb sync`` it later when offline), or None when
    ``logger.wandb.mode=disabled``.
    """
    opts = cfg.logger.wandb
    if opts.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        mode=opts.mode,
        project=opts.project,
        entity=opts.entity,
        group=opts.group or f"{cfg.data.name}",
        tags=list(opts.tags),
        name=Path(cfg.run.output_dir).name,
        dir=str(run_dir),
        config=as_dict(cfg),
        reinit="finish_previous",
    )
    try:
        scalars = {
            k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None
        }
        scalars["reps_per_image"] = summary["reps_per_image"]["mean"]
        run.summary.update(scalars)
        if rows:
            columns = list(rows[0])
            run.log({PER_CATEGORY_TABLE: wandb.Table(columns=columns,
                                                    data=[[r[c] for c in columns] for r in rows])})
        return run.dir
    finally:
        run.finish()
