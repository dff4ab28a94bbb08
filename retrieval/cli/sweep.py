"""``retrieval sweep SWEEP [key=value ...]``: a whole table, planned, in one command."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from retrieval.cli.output import follow_libraries

if TYPE_CHECKING:
    from rich.console import Console

    from retrieval.sweep.plan import PlannedRun


def _retriever(run: PlannedRun) -> str:
    r = run.cfg.retriever
    text = f"{r.name} {r.get('backbone', '')}@{r.get('resolution') or 'native'}"
    if r.name == "cluster_clip":
        text += f" {r.aggregate.method}"
    if r.get("with_global"):
        text += f" +global({r.global_pass})"
    return text


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"


def print_plan(runs: list[PlannedRun], calibrate: bool, console: Console) -> None:
    """The plan as a table: each run, what it reuses, images left, disk and time."""
    from rich.table import Table

    from retrieval.report.plots import human_bytes
    from retrieval.sweep.estimate import DatasetSizes, Estimate, estimate

    sizes = DatasetSizes()
    table = Table(title="sweep plan")
    for column in ("run", "retriever", "features from", "status", "images left", "disk"):
        table.add_column(column, justify="right" if column in ("images left", "disk") else "left")
    if calibrate:
        table.add_column("time (measured)", justify="right")
    estimates: dict[str, Estimate] = {}
    for run in runs:
        found = estimates[run.name] = estimate(run, sizes, calibrate)
        name = f"({run.name})" if run.hidden else run.name
        status = run.status + (f": {run.detail}" if run.status == "changed" else "")
        source = "backbone" if run.source is None else f"{run.source} (no backbone)"
        cells = [name, _retriever(run), source, status]
        approx = "" if found.exact_bytes else "<=" if found.at_most else "~"
        left = "?" if found.left is None else f"{found.left:,} of {found.images:,}"
        if found.disk is not None:
            disk = approx + human_bytes(found.disk)
        elif found.bytes_per_image is not None:
            disk = f"{approx}{human_bytes(found.bytes_per_image)} / image"
        else:
            disk = "?"
        cells += [left, disk]
        if calibrate:
            cells.append("-" if found.seconds is None else _seconds(found.seconds))
        table.add_row(*cells)
    console.print(table)
    known = list(estimates.values())
    backbone = [r for r in runs if r.uses_backbone and r.status != "done"]
    embed = sum(estimates[r.name].left or 0 for r in backbone)
    unknown = sum(estimates[r.name].left is None for r in runs)
    disk_total = sum(e.disk or 0.0 for e in known)
    line = (
        f"{len(runs)} runs ({sum(r.hidden for r in runs)} hidden extractions), "
        f"{sum(r.status == 'done' for r in runs)} done; {len(backbone)} backbone passes over "
        f"{embed:,} images; disk {human_bytes(disk_total)}"
        + (f" (+ {unknown} runs whose data cannot be read yet)" if unknown else "")
    )
    if calibrate:
        line += f"; time {_seconds(sum(e.seconds or 0 for e in known))} (measured per-image rate)"
    console.print(line + "; (hidden) runs are extractions the planner added")


def _sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from retrieval.engine.embedding import global_rank
    from retrieval.sweep.plan import plan_sweep
    from retrieval.sweep.run import run_sweep
    from retrieval.sweep.spec import list_sweeps, load_sweep
    from retrieval.sweep.summary import summarise

    follow_libraries(args.verbose)

    console = Console(quiet=global_rank() != 0)  # under DDP every process walks the plan
    if args.list:
        for name in list_sweeps():
            console.print(f"{name}: {load_sweep(name).description}")
        return 0
    sweep = load_sweep(args.sweep, args.overrides)
    console.print(f"sweep {sweep.name} ({sweep.path}): {sweep.description}")
    runs = plan_sweep(sweep, prepare_data=not args.dry_run)
    if args.dry_run:
        if sweep.prepare:
            from retrieval.sweep.prepare import describe

            for line in describe(sweep.prepare, [r.cfg for r in runs]):
                console.print(line, markup=False)
        print_plan(runs, args.calibrate, console)
        return 0
    outcome = run_sweep(runs, args.fail_fast, console)
    if global_rank() != 0:
        return 0
    summarise(sweep, runs, console)
    for failure in outcome.failed:
        console.print(f"[red]{failure.name} {failure.state}: {failure.message.splitlines()[-1]}")
    counts = {s: sum(o.state == s for o in outcome.outcomes) for s in ("ran", "skipped")}
    console.print(
        f"sweep {sweep.name}: {counts['ran']} run, {counts['skipped']} already done, "
        f"{len(outcome.failed)} failed or blocked; results in {sweep.out}"
    )
    return 1 if outcome.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``retrieval sweep SWEEP [key=value ...]``."""
    parser = subparsers.add_parser(
        "sweep",
        help="run a whole table (configs/sweep/ or a YAML path): shared extractions, "
        "finished runs skipped, one comparison at the end",
    )
    parser.add_argument("sweep", nargs="?", help="a name under configs/sweep/ or a YAML path")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value for every run; out=DIR, data.root=DIR and prepare=none set the sweep",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and what a prepare step would write; write nothing",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="with --dry-run: time one real batch per backbone run for a time estimate",
    )
    parser.add_argument(
        "--fail-fast", action="store_true", help="stop at the first failed run (default: go on)"
    )
    parser.add_argument("--list", action="store_true", help="list the shipped sweeps")
    parser.set_defaults(func=_sweep)
