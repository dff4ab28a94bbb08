"""PNG plots of one or several runs: per-category AP, AP by object size, cost vs accuracy.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) and never through
pyplot, so making them neither needs a display nor changes the caller's backend.
Every function takes plain data (what ``metrics.json`` and ``per_size.json`` hold),
writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

DPI = 110
PER_CATEGORY_PNG = "per_category_ap.png"
SIZE_PNG = "ap_by_size.png"
COST_PNG = "cost_accuracy.png"


@dataclass(frozen=True)
class CostPoint:
    """One run on the cost-accuracy plane."""

    label: str
    bytes_per_image: float
    value: float  # the accuracy metric, a fraction in [0, 1]


def _num(value: Any) -> float:
    """A metric as float; None (NaN in JSON) becomes NaN."""
    return math.nan if value is None else float(value)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _pick_categories(
    values: dict[int, list[float]], first: list[int], limit: int
) -> tuple[list[int], str]:
    """Which categories fit on the plot, and a subtitle saying how they were chosen."""
    if len(first) <= limit:
        return first, ""
    runs = len(next(iter(values.values())))
    if runs == 1:
        ranked = sorted(first, key=lambda c: values[c][0])
        half = limit // 2
        return ranked[-half:][::-1] + ranked[: limit - half][::-1], (
            f"the {half} best and {limit - half} worst of {len(first)} categories"
        )

    def spread(c: int) -> float:
        known = [v for v in values[c] if not math.isnan(v)]
        return max(known) - min(known) if len(known) > 1 else -1.0

    return sorted(first, key=spread, reverse=True)[:limit], (
        f"the {limit} of {len(first)} categories where the runs differ most"
    )


def per_category_bars(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    key: str = "ap@50",
    max_categories: int = 40,
) -> Path:
    """Horizontal bars of each category's AP, one colour per run.

    Categories are ordered by the first run's AP (best at the top); with more than
    ``max_categories``, a single run shows its best and worst, several runs show where
    they differ most, so the plot stays readable for LVIS's 1,203 categories.

    Args:
        runs: label -> per-category rows (``metrics.json``'s ``per_category``).
        path: the PNG to write.
        key: the per-category metric (``ap@50``, ``ap``, ``ap@50_s-m`` ...).
        max_categories: most categories drawn.
    """
    labels = list(runs)
    names: dict[int, str] = {}
    values: dict[int, list[float]] = {}
    for i, rows in enumerate(runs.values()):
        for row in rows:
            cid = int(row["category_id"])
            names.setdefault(cid, str(row["name"]))
            values.setdefault(cid, [math.nan] * len(labels))[i] = _num(row.get(key))
    first = [c for c in values if not math.isnan(values[c][0])]
    first += [c for c in values if math.isnan(values[c][0])]
    chosen, note = _pick_categories(values, first, max_categories)
    chosen = sorted(chosen, key=lambda c: (math.isnan(values[c][0]), -values[c][0]))

    n, k = len(chosen), len(labels)
    bar = 0.8 / k
    fig = Figure(figsize=(8, 1.2 + max(n, 1) * (0.18 + 0.12 * k)))
    ax = fig.add_subplot()
    for j, label in enumerate(labels):
        ys = [i + (j - (k - 1) / 2) * bar for i in range(n)]
        xs = [100 * values[c][j] if not math.isnan(values[c][j]) else 0.0 for c in chosen]
        ax.barh(ys, xs, height=bar, label=label)
    ax.set_yticks(range(n), [names[c] for c in chosen], fontsize=8)
    ax.invert_yaxis()
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{key.upper()} (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Per-category {key.upper()}" + (f"\n({note})" if note else ""), fontsize=10)
    if k > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save(fig, path)


def _bin_label(name: str, spec: Mapping[str, Any]) -> str:
    lo, hi = spec.get("min_area"), spec.get("max_area")

    def side(area: float) -> str:
        root = math.sqrt(area)
        return f"{root:.0f}²" if abs(root - round(root)) < 1e-6 else f"{area:.0f}"

    if hi is None:
        if lo is None:
            raise ValueError(f"size bin {name!r} has neither min_area nor max_area")
        span = f">= {side(lo)}"
    elif not lo:
        span = f"< {side(hi)}"
    else:
        span = f"{side(lo)} to {side(hi)}"
    return f"{name}\n{span}"


def ap_by_size_plot(
    runs: Mapping[str, Mapping[str, Any]], path: str | Path, key: str = "map@50"
) -> Path:
    """mAP per object-size bin (largest instance area), one line per run.

    Args:
        runs: label -> ``per_size.json`` content (see :func:`retrieval.report.sizes.ap_by_size`).
        path: the PNG to write.
        key: the per-bin mean (``map@50`` or ``map``).
    """
    first = next(iter(runs.values()))
    bins = list(first["bins"])
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for label, per_size in runs.items():
        ys = [100 * _num(per_size["bins"].get(b, {}).get(key)) for b in bins]
        ax.plot(range(len(bins)), ys, marker="o", label=label)
    ticks = [
        f"{_bin_label(b, spec)}\n({spec.get('categories', 0)} categories)"
        for b, spec in first["bins"].items()
    ]
    ax.set_xticks(range(len(bins)), ticks, fontsize=8)
    ax.set_xlim(-0.3, len(bins) - 0.7)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{key.replace('map', 'mAP')} (%)")
    ax.set_xlabel("largest instance of the category in the image (area, pixels)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{key.replace('map', 'mAP')} by object size", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_front(points: Sequence[CostPoint]) -> list[CostPoint]:
    """The runs no other run beats on both cost and accuracy, cheapest first."""
    front: list[CostPoint] = []
    for p in sorted(points, key=lambda p: (p.bytes_per_image, -p.value)):
        if not front or p.value > front[-1].value:
            front.append(p)
    return front


def human_bytes(value: float) -> str:
    """``179`` -> ``179 B``, ``20000`` -> ``20 kB``: tick labels a reader can compare."""
    units = ("B", "kB", "MB", "GB")
    step = 0
    while value >= 1000 and step < len(units) - 1:
        value /= 1000
        step += 1
    return f"{value:.3g} {units[step]}"


def _close(p: CostPoint, q: CostPoint) -> bool:
    """Two points whose labels would overlap (within ~5% in x and 4 points in y)."""
    return (
        abs(math.log10(p.bytes_per_image / q.bytes_per_image)) < 0.03
        and abs(p.value - q.value) < 0.04
    )


def cost_accuracy_plot(
    points: Sequence[CostPoint], path: str | Path, metric: str = "mAP@50"
) -> Path:
    """Accuracy vs bytes stored per image (log x), one labelled point per run.

    The dashed line joins the Pareto front: the runs worth their storage.
    """
    points = [p for p in points if not math.isnan(p.value) and p.bytes_per_image > 0]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    ax.set_xscale("log")
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot(
            [p.bytes_per_image for p in front],
            [100 * p.value for p in front],
            ls="--",
            color="0.6",
            zorder=1,
            label="Pareto front",
        )
        ax.legend(fontsize=8, loc="lower right")
    ax.scatter([p.bytes_per_image for p in points], [100 * p.value for p in points], zorder=2)
    for i, p in enumerate(points):
        nth = sum(_close(p, q) for q in points[:i])  # stack the labels of nearby points
        ax.annotate(
            p.label,
            (p.bytes_per_image, 100 * p.value),
            xytext=(7, 2 - 11 * nth),
            textcoords="offset points",
            fontsize=8,
            va="center",
        )
    if points:
        lo = min(p.bytes_per_image for p in points)
        hi = max(p.bytes_per_image for p in points)
        ax.set_xlim(lo / 2, hi * 4)  # room for the labels on the right
        subs = (1.0,) if hi / lo > 100 else (1.0, 2.0, 5.0)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
    ax.set_ylim(0, 100)
    ax.set_xlabel("bytes per image stored (log scale)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"Cost vs accuracy: {metric} against storage per image", fontsize=10)
    return _save(fig, path)


def plot_run(
    run_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    per_size: Mapping[str, Any] | None = None,
    top_k: int = 50,
) -> dict[str, Path]:
    """The plots of one run, in its folder: per-category AP@K and, given size bins, AP by size.

    Returns:
        name -> PNG path (the names are the wandb image keys).
    """
    run_dir = Path(run_dir)
    label = run_dir.name
    plots = {
        "per_category_ap": per_category_bars(
            {label: rows}, run_dir / PER_CATEGORY_PNG, key=f"ap@{top_k}"
        )
    }
    if per_size is not None:
        plots["ap_by_size"] = ap_by_size_plot(
            {label: per_size}, run_dir / SIZE_PNG, key=f"map@{top_k}"
        )
    return plots
