"""Weights & Biases: one run per (retriever, dataset) evaluation, offline by default.

Conventions, so runs line up in one dashboard:

- one wandb run per evaluation (``job_type="eval"``), named after the run folder;
  ``retrieval compare --wandb offline`` adds one ``job_type="compare"`` run;
- ``group`` = ``logger.wandb.group``, default the dataset (``data.name``), so a group
  holds every retriever on one benchmark;
- ``tags`` = ``logger.wandb.tags`` plus the retriever name, backbone and dataset, so any
  of them filters the runs table;
- headline numbers (the same keys as ``metrics.json``) and costs in ``run.summary``;
- the per-category table under the fixed key ``per_category``;
- plots as ``wandb.Image`` under ``plots/<name>``.

Offline runs land in ``<run folder>/wandb/offline-run-*``; ``wandb sync`` uploads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import DictConfig

from retrieval.config import as_dict

if TYPE_CHECKING:
    from retrieval.report.compare import Comparison

PER_CATEGORY_TABLE = "per_category"
COMPARISON_TABLE = "comparison"
PLOTS_PREFIX = "plots/"
WandbMode = Literal["online", "offline", "disabled", "shared"]


def run_tags(cfg: DictConfig) -> list[str]:
    """The config's tags, then retriever name, backbone and dataset (no repeats)."""
    wanted = [
        *cfg.logger.wandb.tags,
        cfg.retriever.get("name"),
        cfg.retriever.get("backbone"),
        cfg.data.name,
    ]
    tags: list[str] = []
    for tag in wanted:
        if tag not in (None, "") and str(tag) not in tags:
            tags.append(str(tag))
    return tags


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What goes into ``run.summary``: every scalar metric plus the cost figures."""
    scalars: dict[str, Any] = {
        k: v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }
    reps = summary.get("reps_per_image") or {}
    timing = summary.get("timing") or {}
    scalars.update(
        reps_per_image=reps.get("mean"),
        reps_per_image_max=reps.get("max"),
        images_per_second=timing.get("extract_images_per_second"),
        score_ms_per_image=timing.get("score_ms_per_image"),
        random_weights=bool(summary.get("random_weights")),
    )
    return {k: v for k, v in scalars.items() if v is not None}


def _table(rows: Sequence[Mapping[str, Any]]) -> Any:
    import wandb

    columns = list(rows[0])
    header: list[str | int] = [*columns]
    return wandb.Table(columns=header, data=[[r.get(c) for c in columns] for r in rows])


def _images(plots: Mapping[str, Path] | None) -> dict[str, Any]:
    import wandb

    return {f"{PLOTS_PREFIX}{name}": wandb.Image(str(path)) for name, path in (plots or {}).items()}


def log_to_wandb(
    cfg: DictConfig,
    run_dir: Path,
    summary: dict[str, Any],
    rows: list[dict],
    plots: Mapping[str, Path] | None = None,
) -> Path | None:
    """Logs one evaluation: config, summary numbers, per-category table and plots.

    Args:
        cfg: the resolved run config (``logger.wandb.*`` decides mode, group, tags).
        run_dir: the run folder; the wandb run is written under ``run_dir/wandb``.
        summary: the scalar part of ``metrics.json``.
        rows: ``metrics.json``'s ``per_category`` rows.
        plots: name -> PNG (``retrieval.report.plots.plot_run``).

    Returns:
        The wandb run folder (``wandb sync`` it when offline), or None when
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
        group=opts.group or str(cfg.data.name),
        tags=run_tags(cfg),
        job_type="eval",
        name=Path(cfg.run.output_dir).name,
        dir=str(run_dir),
        config=as_dict(cfg),
        reinit="finish_previous",
    )
    try:
        run.summary.update(summary_scalars(summary))
        logged = _images(plots)
        if rows:
            logged[PER_CATEGORY_TABLE] = _table(rows)
        if logged:
            run.log(logged)
        return Path(run.settings.sync_dir)
    finally:
        run.finish()


def log_comparison(
    comp: Comparison,
    out: Path,
    written: Mapping[str, Path],
    mode: WandbMode = "offline",
    project: str = "object-retrieval",
    group: str | None = None,
) -> Path:
    """Logs a ``retrieval compare`` result as one ``job_type="compare"`` run under ``out``
    (in W&B group ``group``; default: the datasets' names joined by ``+``).

    Returns:
        The wandb run folder.
    """
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    datasets = sorted({r.dataset for r in comp.runs})
    run = wandb.init(
        mode=mode,
        project=project,
        group=group or "+".join(datasets),
        tags=["compare", *datasets],
        job_type="compare",
        name="compare " + " vs ".join(r.label for r in comp.runs),
        dir=str(out),
        config={"runs": [str(r.run_dir) for r in comp.runs], "key": comp.key},
        reinit="finish_previous",
    )
    try:
        logged = _images(
            {k.removesuffix(".png"): p for k, p in written.items() if p.suffix == ".png"}
        )
        logged[COMPARISON_TABLE] = _table(comp.table)
        run.log(logged)
        return Path(run.settings.sync_dir)
    finally:
        run.finish()
