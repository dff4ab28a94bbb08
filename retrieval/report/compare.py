"""``retrieval compare RUN_DIR...``: several run folders side by side, and against the paper.

Everything here reads run folders only (``config.yaml``, ``metrics.json``, and
``per_size.json`` or ``scores.npz`` for the size bins), so a comparison never reruns a
model. It writes, under ``--out``: ``compare.md`` and ``compare.csv`` (headline metrics,
representatives, bytes and images per second per run, with the paper's number and the
difference where a run reproduces a row of its table), ``category_deltas.csv`` (every
category's AP change against the first run) and three PNG plots. Metrics in these
files are in percent, the paper's unit (run folders hold fractions).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from rich.console import Console
from rich.table import Table

from retrieval.errors import ConfigError, MissingFileError
from retrieval.report.console import headline_keys, md
from retrieval.report.plots import (
    COST_PNG,
    PER_CATEGORY_PNG,
    SIZE_PNG,
    CostPoint,
    ap_by_size_plot,
    cost_accuracy_plot,
    per_category_bars,
)
from retrieval.report.sizes import load_per_size

PAPER_TABLE = Path(__file__).with_name("paper_table.tsv")
PAPER_IMAGES = {"coco": 5000, "lvis": 19809}
"""Images in the splits the paper evaluates (COCO val2017, LVIS v1 val)."""
PAPER_COLUMNS: dict[str, dict[str, str]] = {
    "coco": {"map@50": "coco_map@50", "map": "coco_map", "map@50_s-m": "coco_map@50_s-m"},
    "lvis": {
        "map@50": "lvis_map@50",
        "map": "lvis_map",
        "rare.map@50": "lvis_rare_map@50",
        "rare.map": "lvis_rare_map",
    },
}
"""Our metric key -> the paper table's column, per ``data.name``."""
AGGREGATOR_ROWS = {"kmeans": "K.M.", "prune": "R.P."}
"""Aggregator name -> the paper's abbreviation (agglomerative is AG-F or AG-T)."""
REPS = "reps / image"
BYTES = "bytes / image"
IMAGES_PER_S = "images / s"
SCORE_MS = "score ms / image"


@dataclass
class Run:
    """A run folder as the comparison reads it."""

    run_dir: Path
    label: str
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("name", "?"))

    @property
    def retriever(self) -> dict[str, Any]:
        """The config's retriever section, updated with what the retriever reported."""
        return {**self.config.get("retriever", {}), **self.metrics.get("retriever", {})}

    @property
    def top_k(self) -> int:
        return int(self.metrics.get("protocol", {}).get("top_k", 50))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.metrics.get("per_category", [])

    def describe(self) -> str:
        r = self.retriever
        annotations = Path(str(self.config.get("data", {}).get("annotations", ""))).name
        weights = ", RANDOM WEIGHTS" if self.metrics.get("random_weights") else ""
        return (
            f"{r.get('name')} {r.get('backbone', '')} on {self.dataset} ({annotations}, "
            f"{self.metrics.get('images')} images){weights}"
        )


@dataclass(frozen=True)
class Reference:
    """The paper's numbers for one run (fractions, like ours), or why there are none."""

    values: dict[str, float]
    note: str


@dataclass
class Comparison:
    """Everything ``compare`` prints and writes."""

    runs: list[Run]
    references: dict[str, Reference]
    table: list[dict[str, Any]]
    columns: list[str]
    deltas: dict[str, list[dict[str, Any]]]  # run label -> its changes vs the first run
    key: str
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    size_notes: dict[str, str] = field(default_factory=dict)


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Reads a run folder's ``config.yaml`` and ``metrics.json``.

    Raises:
        FileNotFoundError: the folder is not a finished run folder.
    """
    run_dir = Path(run_dir)
    missing = [n for n in ("metrics.json", "config.yaml") if not (run_dir / n).is_file()]
    if missing:
        raise MissingFileError(
            f"{run_dir} is not a finished run folder (no {missing[0]}); pass the "
            f"run.output_dir of a completed `retrieval eval`"
        )
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return Run(run_dir, label or run_dir.name, config, metrics)


def unique_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short run names: the folder name, with its parent (or a number) where that repeats."""
    labels = [p.name for p in run_dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" for p in run_dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i + 1}" for i, label in enumerate(labels)]
    return labels


def canonical_backbone(name: Any) -> str:
    """The paper's spelling of a backbone: ``RN50-quickgelu`` -> ``RN50``,
    ``google/owlvit-base-patch32`` or ``ViT-B-32`` -> ``ViT-B/32``."""
    text = str(name or "").strip().removesuffix("-quickgelu")
    owl = re.search(r"owlvit-(base|large)-patch(\d+)", text, re.IGNORECASE)
    if owl:
        return f"ViT-{'B' if owl[1].lower() == 'base' else 'L'}/{owl[2]}"
    vit = re.fullmatch(r"ViT-([BL])[-/](\d+)", text, re.IGNORECASE)
    return f"ViT-{vit[1].upper()}/{vit[2]}" if vit else text


def _find(options: Mapping[str, Any], key: str) -> Any:
    """The first non-null ``key`` anywhere in a nested mapping."""
    if options.get(key) is not None:
        return options[key]
    for value in options.values():
        if isinstance(value, Mapping):
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _aggregator(retriever: Mapping[str, Any]) -> str | None:
    """The aggregation method: ``aggregator`` (metrics.json) or ``aggregate.method`` (config)."""
    for key in ("aggregator", "aggregate"):
        value = retriever.get(key)
        if isinstance(value, Mapping):
            value = value.get("method") or value.get("name")
        if value:
            return str(value)
    return None


def paper_method(retriever: Mapping[str, Any]) -> tuple[str, str] | None:
    """The paper row (method, backbone) a retriever configuration reproduces, if any.

    This is the one place that maps our configs onto the paper's table: ``clip`` is
    "CLIP", ``dense_clip`` "Dense-CLIP" (``with_global``: "CLIP + Dense-CLIP"),
    ``cluster_clip`` "Cluster-CLIP, <aggregator>" (K.M., AG-F, AG-T with a
    ``distance_threshold``, R.P.), ``owlvit`` "OwlViT" (backbone from its
    ``pretrained``, ``checkpoint`` in older runs). Resolution and dataset are checked
    by :func:`reference_for`.
    """
    name = retriever.get("name")
    backbone = canonical_backbone(
        retriever.get("backbone")
        or retriever.get("pretrained")
        or retriever.get("checkpoint")  # OWL-ViT runs written before `pretrained`
        or retriever.get("model")
    )
    prefix = "CLIP + " if retriever.get("with_global") else ""
    if name == "clip":
        return "CLIP", backbone
    if name == "owlvit":
        return "OwlViT", backbone
    if name == "dense_clip":
        return f"{prefix}Dense-CLIP", backbone
    if name == "cluster_clip":
        aggregator = _aggregator(retriever)
        if aggregator == "none":
            return f"{prefix}Dense-CLIP", backbone
        if aggregator == "agglomerative":
            short = "AG-T" if _find(retriever, "distance_threshold") is not None else "AG-F"
        elif aggregator in AGGREGATOR_ROWS:
            short = AGGREGATOR_ROWS[aggregator]
        else:
            return None
        return f"{prefix}Cluster-CLIP, {short}", backbone
    return None


def _same_method(a: str, b: str) -> bool:
    """The table's abbreviations end with or without a dot ("K.M" / "K.M.")."""
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def load_paper_table(path: str | Path = PAPER_TABLE) -> list[dict[str, str]]:
    """The paper's headline table (percentages as strings, ``-`` where not given)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def reference_for(run: Run, table: Sequence[Mapping[str, str]]) -> Reference:
    """The paper's numbers for this run's method, backbone, resolution and dataset."""
    method = paper_method(run.retriever)
    if method is None:
        return Reference(
            {}, f"no reference: retriever {run.retriever.get('name')!r} matches no row of the paper"
        )
    row = next(
        (
            r
            for r in table
            if _same_method(r["method"], method[0]) and r["backbone"].lower() == method[1].lower()
        ),
        None,
    )
    if row is None:
        return Reference({}, f"no reference: the paper has no {method[0]} {method[1]} row")
    resolution = run.retriever.get("resolution") or run.retriever.get("image_size")
    if resolution is not None and int(resolution) != int(row["resolution"]):
        return Reference(
            {},
            f"no reference: resolution {resolution}, the paper's "
            f"{method[0]} {method[1]} uses {row['resolution']}",
        )
    columns = PAPER_COLUMNS.get(run.dataset)
    if columns is None:
        return Reference({}, f"no reference: the paper reports no {run.dataset} numbers")
    seen = int(run.metrics.get("images") or 0) + len(run.metrics.get("skipped_images") or [])
    if seen != PAPER_IMAGES[run.dataset]:
        return Reference(
            {},
            f"no reference: {seen} images, the paper's {run.dataset} "
            f"split has {PAPER_IMAGES[run.dataset]:,}",
        )
    values = {key: float(row[col]) / 100 for key, col in columns.items()}
    values[REPS] = float(row["reps_per_image"])
    return Reference(values, f"paper: {row['method']}, {row['backbone']} on {run.dataset}")


def _metric_keys(runs: Sequence[Run]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in headline_keys(run.metrics, run.top_k) if k not in keys]
    return keys


def _cost(run: Run) -> dict[str, float | None]:
    timing = run.metrics.get("timing", {})
    return {
        REPS: (run.metrics.get("reps_per_image") or {}).get("mean"),
        BYTES: run.metrics.get("bytes_per_image"),
        IMAGES_PER_S: timing.get("extract_images_per_second"),
        SCORE_MS: timing.get("score_ms_per_image"),
    }


def _num(value: Any) -> float | None:
    """A number, or None for missing and NaN (JSON's null)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def comparison_table(
    runs: Sequence[Run], references: Mapping[str, Reference]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The side-by-side table: one row per metric, one column per run.

    Metrics are in percent (the paper's unit); a run with a paper row gets two more
    columns, ``<label> paper`` and ``<label> diff`` (run minus paper, in points).

    Returns:
        ``(rows, columns)``; a row maps ``metric``, ``unit`` and each column to a
        number or None.
    """
    columns = ["metric", "unit"]
    for run in runs:
        columns.append(run.label)
        if references[run.label].values:
            columns += [f"{run.label} paper", f"{run.label} diff"]
    rows = []
    metric_rows = [(k, "%", 100.0) for k in _metric_keys(runs)]
    cost_rows = [
        (REPS, "count", 1.0),
        (BYTES, "bytes", 1.0),
        (IMAGES_PER_S, "1/s", 1.0),
        (SCORE_MS, "ms", 1.0),
    ]
    for key, unit, scale in metric_rows + cost_rows:
        row: dict[str, Any] = {"metric": key, "unit": unit}
        for run in runs:
            raw = _cost(run)[key] if unit != "%" else run.metrics.get(key)
            num = _num(raw)
            value = None if num is None else scale * num
            row[run.label] = value
            ref = references[run.label].values
            if ref:
                paper = ref.get(key)
                row[f"{run.label} paper"] = None if paper is None else scale * paper
                row[f"{run.label} diff"] = (
                    None if paper is None or value is None else value - scale * paper
                )
        rows.append(row)
    return rows, columns


def category_deltas(
    base: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]], key: str = "ap@50"
) -> list[dict[str, Any]]:
    """Per-category change of ``key`` from ``base`` to ``other``, largest gain first.

    Categories are matched by id; those skipped (NaN) in either run are left out.
    """
    before = {int(r["category_id"]): r for r in base}
    out = []
    for r in other:
        b = before.get(int(r["category_id"]))
        if b is None or _num(b.get(key)) is None or _num(r.get(key)) is None:
            continue
        out.append(
            {
                "category_id": int(r["category_id"]),
                "name": r["name"],
                "split": r.get("split", ""),
                "positives": r.get("positives"),
                "base": b[key],
                "other": r[key],
                "delta": r[key] - b[key],
            }
        )
    return sorted(out, key=lambda d: (-d["delta"], d["category_id"]))


def build_comparison(
    run_dirs: Sequence[str | Path], reference: str = "paper", key: str | None = None
) -> Comparison:
    """Loads the runs and computes every table ``compare`` shows.

    Args:
        run_dirs: run folders; the first is the baseline of the per-category deltas.
        reference: ``paper`` adds the paper's numbers where a run matches a row;
            ``none`` leaves them out.
        key: per-category metric for deltas and bars (default ``ap@K``).
    """
    if not run_dirs:
        raise ConfigError("compare needs at least one run folder")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, unique_labels(paths), strict=True)]
    key = key or f"ap@{runs[0].top_k}"
    table = load_paper_table() if reference == "paper" else []
    references = {
        run.label: reference_for(run, table)
        if reference == "paper"
        else Reference({}, "reference not requested")
        for run in runs
    }
    rows, columns = comparison_table(runs, references)
    deltas = {run.label: category_deltas(runs[0].rows, run.rows, key) for run in runs[1:]}
    comparison = Comparison(runs, references, rows, columns, deltas, key)
    for run in runs:
        per_size, note = load_per_size(run.run_dir, run.top_k)
        comparison.size_notes[run.label] = note
        if per_size is not None:
            comparison.sizes[run.label] = per_size
    return comparison


def _fmt(value: Any, unit: str = "%") -> str:
    if _num(value) is None:
        return ""
    if unit == "bytes":
        return f"{value:,.0f}"
    if unit in ("count", "1/s", "ms"):
        return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"
    return f"{value:.2f}"


def _cell(row: Mapping[str, Any], column: str) -> str:
    text = _fmt(row.get(column), row["unit"])
    if column.endswith(" diff") and text and not text.startswith("-"):
        text = "+" + text
    return text


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; every cell escaped (:func:`~retrieval.report.console.md`)."""
    return [
        "| " + " | ".join(md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(md(c) for c in cells) + " |" for cells in body),
    ]


def _gains_losses(deltas: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    gains = [d for d in deltas if d["delta"] > 0][:top]
    losses = [d for d in deltas if d["delta"] < 0][-top:]
    return gains + losses


def comparison_markdown(comp: Comparison, top: int = 5, plots: Sequence[Path] = ()) -> str:
    """``compare.md``: runs, the side-by-side table, sizes, per-category gains and losses."""
    lines = ["# Run comparison", "", "| run | what | paper row |", "|---|---|---|"]
    lines += [
        f"| {md(r.label)} | {md(r.describe())} | {md(comp.references[r.label].note)} |"
        for r in comp.runs
    ]
    with_paper = any(ref.values for ref in comp.references.values())
    note = "Metrics in percent" + ("; `diff` = run minus paper, in points." if with_paper else ".")
    lines += ["", note, ""]
    lines += _markdown_table(
        comp.columns,
        [
            [row["metric"], row["unit"], *(_cell(row, c) for c in comp.columns[2:])]
            for row in comp.table
        ],
    )
    if any(r.metrics.get("random_weights") for r in comp.runs):
        lines += [
            "",
            "> Runs with RANDOM WEIGHTS check the pipeline only; their numbers say "
            "nothing about the method.",
        ]
    if comp.sizes:
        first = next(iter(comp.sizes.values()))
        k = first.get("top_k", 50)
        bins = list(first["bins"])
        lines += ["", f"## mAP@{k} by object size (largest instance area)", ""]
        lines += _markdown_table(
            ["run", *bins],
            [
                [
                    label,
                    *(
                        _fmt(
                            100 * v
                            if (v := _num(s["bins"][b].get(f"map@{k}"))) is not None
                            else None
                        )
                        for b in bins
                    ),
                ]
                for label, s in comp.sizes.items()
            ],
        )
    missing = {label: note for label, note in comp.size_notes.items() if label not in comp.sizes}
    lines += [f"- no size bins for {md(label)}: {md(note)}" for label, note in missing.items()]
    base_label = comp.runs[0].label
    for other_label, deltas in comp.deltas.items():
        shown = _gains_losses(deltas, top)
        lines += [
            "",
            f"## {md(comp.key.upper())} per category: {md(other_label)} vs {md(base_label)}",
            "",
            f"Largest gains and losses (points) of {len(deltas)} categories.",
            "",
        ]
        lines += _markdown_table(
            ["category", "P", base_label, other_label, "diff"],
            [
                [
                    d["name"],
                    str(d["positives"]),
                    _fmt(100 * d["base"]),
                    _fmt(100 * d["other"]),
                    f"{100 * d['delta']:+.2f}",
                ]
                for d in shown
            ],
        )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{md(p.stem)}]({quote(p.name)})" for p in plots]
    return "\n".join(lines) + "\n"


def write_comparison(
    comp: Comparison, out: str | Path, top: int = 5, plots: bool = True
) -> dict[str, Path]:
    """Writes the tables and (unless ``plots=False``, for committed summaries) the plots
    under ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_plots(comp, out) if plots else {}
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=comp.columns)
        writer.writeheader()
        writer.writerows(comp.table)
    written["compare.csv"] = out / "compare.csv"
    if comp.deltas:
        with open(out / "category_deltas.csv", "w", newline="") as f:
            fields = [
                "base_run",
                "run",
                "category_id",
                "name",
                "split",
                "positives",
                "base",
                "other",
                "delta",
            ]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for label, deltas in comp.deltas.items():  # percent, like compare.csv
                writer.writerows(
                    {
                        "base_run": comp.runs[0].label,
                        "run": label,
                        **d,
                        **{k: 100 * d[k] for k in ("base", "other", "delta")},
                    }
                    for d in deltas
                )
        written["category_deltas.csv"] = out / "category_deltas.csv"
    pngs = [p for p in written.values() if p.suffix == ".png"]
    (out / "compare.md").write_text(comparison_markdown(comp, top, pngs))
    written["compare.md"] = out / "compare.md"
    return written


def write_plots(comp: Comparison, out: Path) -> dict[str, Path]:
    """Per-category bars, AP by size (runs that have size bins) and the cost-accuracy plot."""
    k = comp.runs[0].top_k
    plots = {
        "per_category_ap": per_category_bars(
            {r.label: r.rows for r in comp.runs}, out / PER_CATEGORY_PNG, key=comp.key
        ),
        "cost_accuracy": cost_accuracy_plot(
            [
                CostPoint(
                    r.label,
                    float(r.metrics.get("bytes_per_image") or 0),
                    _num(r.metrics.get(f"map@{k}")) or math.nan,
                )
                for r in comp.runs
            ],
            out / COST_PNG,
            metric=f"mAP@{k}",
        ),
    }
    if comp.sizes:
        plots["ap_by_size"] = ap_by_size_plot(comp.sizes, out / SIZE_PNG, key=f"map@{k}")
    return plots


def print_comparison(comp: Comparison, console: Console | None = None, top: int = 5) -> None:
    """The side-by-side table and the largest per-category changes, in the terminal."""
    console = console or Console()
    for run in comp.runs:
        console.print(
            f"[bold]{run.label}[/bold]: {run.describe()}; {comp.references[run.label].note}"
        )
    with_paper = any(ref.values for ref in comp.references.values())
    table = Table(
        title="metrics in percent" + ("; diff = run - paper (points)" if with_paper else "")
    )
    for i, column in enumerate(comp.columns):
        table.add_column(column, justify="left" if i < 2 else "right")
    for row in comp.table:
        table.add_row(row["metric"], row["unit"], *(_cell(row, c) for c in comp.columns[2:]))
    console.print(table)
    for label, deltas in comp.deltas.items():
        shown = _gains_losses(deltas, top)
        changes = ", ".join(f"{d['name']} {100 * d['delta']:+.1f}" for d in shown)
        console.print(
            f"{comp.key.upper()} largest changes, {label} vs {comp.runs[0].label} "
            f"(points): {changes or 'none'}"
        )
