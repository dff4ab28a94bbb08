"""The end of a sweep: one table of its rows, ``retrieval compare`` over them, one W&B group.

The table has the headline metrics of every finished row, plus, per category group of
the sweep file (e.g. the scenes' held-out pairs), the mean AP over those categories.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from retrieval.sweep.plan import PlannedRun
from retrieval.sweep.spec import Sweep

HEADLINE = (("map@50", "mAP@50"), ("map@50_s-m", "mAP@50 s-m"), ("map", "mAP"))
GROUP_METRICS = (("ap@50", "mAP@50"), ("ap@50_s-m", "mAP@50 s-m"))


def group_means(metrics: dict[str, Any], names: Sequence[str], prefix: str) -> dict[str, float]:
    """Means of per-category APs over ``names`` (categories skipped by the protocol left
    out), keyed ``<prefix>.m<metric>``."""
    wanted = set(names)
    rows = [r for r in metrics.get("per_category", []) if r["name"] in wanted]
    out = {}
    for key in ("ap@50", "ap@50_s-m", "ap"):
        values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        out[f"{prefix}.m{key}"] = sum(values) / len(values) if values else math.nan
    return out


def columns(groups: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(key, title) of every table column but the run name and reps / image."""
    out = list(HEADLINE)
    for group in groups:
        out += [(f"{group}.m{key}", f"{group} {title}") for key, title in GROUP_METRICS]
    return out


def table_rows(runs: Sequence[PlannedRun], groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per finished table run: metrics (fractions) and reps per image."""
    rows = []
    for run in runs:
        path = run.run_dir / "metrics.json"
        if run.hidden or not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        for group, names in groups.items():
            metrics.update(group_means(metrics, names, group))
        row: dict[str, Any] = {"run": run.name, "run_dir": str(run.run_dir)}
        row.update({key: metrics.get(key) for key, _ in columns(groups)})
        row["reps_per_image"] = metrics["reps_per_image"]["mean"]
        row["random_weights"] = bool(metrics.get("random_weights"))
        rows.append(row)
    return rows


def _pct(value: Any) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]], groups: dict[str, list[str]]) -> str:
    cols = columns(groups)
    header = ["retriever", *(title for _, title in cols), "reps / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"], *(_pct(row[key]) for key, _ in cols), f"{row['reps_per_image']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(
    rows: Sequence[dict[str, Any]], groups: dict[str, list[str]], title: str, console: Console
) -> None:
    table = Table(title=title)
    table.add_column("retriever", no_wrap=True, min_width=16)
    cols = columns(groups)
    for _, name in cols:
        table.add_column(name, justify="right")
    table.add_column("reps / image", justify="right")
    for row in rows:
        table.add_row(
            row["run"], *(_pct(row[key]) for key, _ in cols), f"{row['reps_per_image']:.1f}"
        )
    console.print(table)


def summarise(
    sweep: Sweep,
    runs: Sequence[PlannedRun],
    console: Console | None = None,
    plots: bool = True,
    title: str | None = None,
) -> dict[str, Path]:
    """Prints and writes the sweep's table (``summary.md``) and ``retrieval compare``'s
    files under ``sweep.out``; logs the comparison to the sweep's W&B group (the runs'
    ``logger.wandb.mode``). Returns name -> written path (empty: nothing finished)."""
    from retrieval.report.compare import build_comparison, print_comparison, write_comparison

    console = console or Console()
    order = {e.name: i for i, e in enumerate(sweep.experiments)}  # the table's own order
    rows = table_rows(sorted(runs, key=lambda r: order.get(r.name, -1)), sweep.category_groups)
    if not rows:
        console.print("no finished runs to summarise")
        return {}
    title = title or f"sweep {sweep.name}: {len(rows)} runs; percent"
    print_table(rows, sweep.category_groups, title, console)
    sweep.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, sweep.category_groups)
    summary = sweep.out / "summary.md"
    summary.write_text(f"# Sweep {sweep.name}\n\n{title}.\n\n{table}\n")
    comparison = build_comparison([Path(r["run_dir"]) for r in rows], sweep.reference)
    written = {"summary.md": summary, **write_comparison(comparison, sweep.out, plots=plots)}
    print_comparison(comparison, console)
    shown = [run for run in runs if not run.hidden]
    mode = str(shown[0].cfg.logger.wandb.mode) if shown else "disabled"
    if mode != "disabled":
        from retrieval.report.wandb_log import log_comparison

        project = str(shown[0].cfg.logger.wandb.project)
        log_comparison(comparison, sweep.out, written, mode, project, group=sweep.name)  # type: ignore[arg-type]
    return written
