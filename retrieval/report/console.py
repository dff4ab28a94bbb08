"""Human-readable summaries: a markdown file and a rich table in the terminal."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS (no pretrained checkpoint): these numbers check the pipeline only; "
    "they say nothing about the method."
)


#: characters a value must not bring into a markdown file as themselves: HTML (a tag, an
#: entity), a table cell's end, a code span, a link; written as HTML entities instead
_MARKDOWN_ENTITIES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "`": "&#96;",
        "|": "&#124;",
        "[": "&#91;",
        "]": "&#93;",
        "\\": "&#92;",
        "\n": " ",
        "\r": " ",
    }
)


def md(value: Any) -> str:
    """``value`` as text safe inside markdown (a table cell, a list item, a heading):
    HTML and markdown syntax arrive as entities, so they show as written and run as
    nothing (a category named ``<script>`` stays text)."""
    return str(value).translate(_MARKDOWN_ENTITIES)


def headline_keys(summary: dict[str, Any], top_k: int) -> list[str]:
    """The headline metrics in display order, split means after the overall ones."""
    base = [f"map@{top_k}", "map", f"map@{top_k}_s-m", f"map@{top_k}_hits", "map_s-m"]
    splits = sorted(k for k in summary if "." in k and k.split(".", 1)[1] in base)
    return [k for k in base if k in summary] + splits


def pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}"


def title(cfg: DictConfig) -> str:
    r = cfg.retriever
    backbone = r.get("backbone", "")
    source = cfg.data.get("annotations") or cfg.data.get("images")
    return f"{r.name} {backbone} on {cfg.data.name}" + (f" ({source})" if source else "")


def _title_markdown(cfg: DictConfig) -> str:
    return md(title(cfg))


def summary_markdown(cfg: DictConfig, summary: dict[str, Any], rows: list[dict]) -> str:
    """The run's ``summary.md``: headline table, protocol, cost, skipped files."""
    top_k = cfg.protocol.top_k
    lines = [f"# {_title_markdown(cfg)}", ""]
    if summary.get("random_weights"):
        lines += [f"> **{RANDOM_WEIGHTS_BANNER}**", ""]
    keys = headline_keys(summary, top_k)
    lines += ["| metric | value (%) |", "|---|---|"]
    lines += [f"| {md(k)} | {pct(summary[k])} |" for k in keys]
    timing = summary["timing"]
    lines += [
        "",
        f"- images: {summary['images']}, categories: {summary.get('categories')} "
        f"({summary.get('categories_skipped')} skipped: no relevant image; "
        f"{summary.get('categories_skipped_s-m')} skipped for s-m)",
        f"- representatives per image: mean {summary['reps_per_image']['mean']:.1f}, "
        f"max {summary['reps_per_image']['max']}; bytes per image stored: "
        f"{summary['bytes_per_image']:.0f}",
        f"- extraction: {timing['extract_seconds']:.1f} s"
        + f" for {timing['images_embedded']} images"
        + (
            f", {timing['reused_embeddings']} reused from stored shards"
            if timing["reused_embeddings"]
            else ""
        )
        + f"; scoring: {timing['score_ms_per_image']:.3f} ms per image",
        "",
        "## Protocol",
        "",
    ]
    lines += [f"- {md(k)}: {md(v)}" for k, v in summary["protocol"].items()]
    ranked = sorted(
        (r for r in rows if r[f"ap@{top_k}"] == r[f"ap@{top_k}"]),  # drop NaN (skipped)
        key=lambda r: r[f"ap@{top_k}"],
    )
    if ranked:
        lines += [
            "",
            f"## Hardest and easiest categories (AP@{top_k}, %)",
            "",
            "| category | P | AP@K | AP |",
            "|---|---|---|---|",
        ]
        shown = ranked[:5] + ranked[-5:] if len(ranked) > 10 else ranked
        lines += [
            f"| {md(r['name'])} | {md(r['positives'])} | {pct(r[f'ap@{top_k}'])} | {pct(r['ap'])} |"
            for r in shown
        ]
    skipped = summary.get("skipped_images") or []
    if skipped:
        lines += ["", f"## Skipped images ({len(skipped)})", ""]
        lines += [f"- {md(f['path'])}: {md(f['reason'])}" for f in skipped]
    return "\n".join(lines) + "\n"


def print_summary(cfg: DictConfig, summary: dict[str, Any], rows: list[dict]) -> None:
    """A rich table of the headline metrics, and the random-weights warning if it applies."""
    console = Console()
    table = Table(title=title(cfg), show_header=True)
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for key in headline_keys(summary, cfg.protocol.top_k):
        table.add_row(key, pct(summary[key]))
    table.add_row("reps / image", f"{summary['reps_per_image']['mean']:.1f}")
    table.add_row("bytes / image", f"{summary['bytes_per_image']:.0f}")
    console.print(table)
    if summary.get("skipped_images"):
        console.print(
            f"[yellow]{len(summary['skipped_images'])} images skipped; "
            f"listed in skipped_images.txt[/yellow]"
        )
    if summary.get("random_weights"):
        console.print(f"[bold red]{RANDOM_WEIGHTS_BANNER}[/bold red]")
    console.print(f"run folder: {cfg.run.output_dir}")
