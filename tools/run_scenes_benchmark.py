"""The offline benchmark: global CLIP vs Dense-CLIP vs Cluster-CLIP on generated scenes.

Needs no download: it generates the held-out evaluation scenes (``--preset scenes`` of
``retrieval.data.synthetic``: 256 x 256 images, 64 colour-shape categories, 8 of them
never seen in training) and evaluates the shipped RN-scenes model
(``retrieval/weights/RN-scenes.safetensors``) four ways, one run folder each:

- ``clip``: one global embedding per image (the 64 px native view);
- ``dense_clip``: one embedding per cell of the 8 x 8 grid at 256 px (64 per image);
- ``cluster_clip_km`` / ``cluster_clip_agf``: those cells aggregated per image by
  k-means / agglomerative clustering into a few representatives.

It runs the ``scenes`` sweep (``configs/sweep/scenes.yaml``: what ``make demo`` runs as
``retrieval sweep scenes``; both Cluster-CLIP rows re-aggregate the Dense-CLIP row's
shards) on scenes generated with the chosen size and seed, deleting earlier run folders
first unless ``--reuse``. Then it prints one table (mAP@50, mAP@50 small-medium, mAP, the
same on the held-out pairs, representatives per image) and writes everything under ``--out``
(``outputs/scenes``, git-ignored, so the demo leaves the checkout clean; random weights:
``outputs/scenes/random``): the run folders (``runs/<run>``), the table
(``benchmark.md``) and ``retrieval compare``'s tables and plots. The committed summaries
in ``results/scenes`` (the table and compare's tables, no plots) change only when asked
for with ``--results results/scenes`` (``make results-scenes``).

Usage (from the repository root)::

    python tools/run_scenes_benchmark.py                 # data/scenes -> outputs/scenes
    python tools/run_scenes_benchmark.py --weights random   # the same with random weights
    python tools/run_scenes_benchmark.py --results results/scenes   # also update results/
    python tools/run_scenes_benchmark.py --card          # also update the model card's table
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from retrieval.data.synthetic import HELD_OUT_PAIRS, ensure_synthetic, scenes_options  # noqa: E402
from retrieval.sweep.plan import plan_sweep  # noqa: E402
from retrieval.sweep.run import run_sweep  # noqa: E402
from retrieval.sweep.spec import Sweep, load_sweep  # noqa: E402
from retrieval.sweep.summary import columns, group_means, markdown_table, print_table  # noqa: E402

EXPERIMENTS = {
    "clip": "scenes_clip",
    "dense_clip": "scenes_dense_clip",
    "cluster_clip_km": "scenes_cluster_clip_km",
    "cluster_clip_agf": "scenes_cluster_clip_agf",
}
"""Run name -> experiment config (configs/experiment/): the rows of ``configs/sweep/scenes``."""
WEIGHTS = ROOT / "retrieval" / "weights" / "RN-scenes.safetensors"
CARD = ROOT / "retrieval" / "weights" / "RN-scenes.md"
OUTPUT = ROOT / "outputs" / "scenes"
"""Default ``--out``: git-ignored (``.gitignore``'s ``outputs/``), so ``make demo`` leaves
``git status`` clean."""


def scenes_sweep(
    data_dir: Path,
    out: Path,
    pretrained: str | None,
    runs: Sequence[str] = tuple(EXPERIMENTS),
    overrides: Sequence[str] = (),
) -> Sweep:
    """The ``scenes`` sweep on ``data_dir``'s scenes, writing under ``out``, with
    ``pretrained`` weights (None: random) for every row, limited to ``runs``."""
    sweep = load_sweep(
        "scenes",
        [
            f"data.annotations={data_dir / 'annotations.json'}",
            f"data.images={data_dir / 'images'}",
            "prepare=none",
            f"out={out}",
            f"retriever.pretrained={'null' if pretrained is None else pretrained}",
            *overrides,
        ],
    )
    sweep.experiments = [e for e in sweep.experiments if e.name in runs]
    return sweep


def run_benchmark(
    data_dir: str | Path = ROOT / "data" / "scenes",
    out: str | Path = OUTPUT,
    num_images: int | None = None,
    seed: int | None = None,
    pretrained: str | None = str(WEIGHTS),
    runs: Sequence[str] = tuple(EXPERIMENTS),
    overrides: Sequence[str] = (),
    reuse: bool = False,
) -> dict[str, dict[str, Any]]:
    """Generates the scenes (if needed) and runs the ``scenes`` sweep in-process.

    Args:
        data_dir: where the evaluation scenes live (generated when missing).
        out: the sweep's folder: run folders in ``out/runs/<run>``.
        num_images, seed: override the ``scenes`` preset's (400 images, seed 2023).
        pretrained: weights for every retriever (None: random weights).
        runs: which of :data:`EXPERIMENTS` to run.
        overrides: more ``key=value`` config overrides for every run.
        reuse: keep finished runs of an earlier call (the sweep skips them); by default
            each run folder is deleted first, so retrained weights are re-embedded.

    Returns:
        run name -> its metrics (``metrics.json``'s content) plus the ``held-out.*`` means.
    """
    ensure_synthetic(Path(data_dir), scenes_options("eval", num_images, seed))
    sweep = scenes_sweep(Path(data_dir), Path(out), pretrained, runs, overrides)
    planned = plan_sweep(sweep)
    if not reuse:
        for run in planned:
            shutil.rmtree(run.run_dir, ignore_errors=True)
        planned = plan_sweep(sweep)
    outcome = run_sweep(planned, fail_fast=True)
    assert not outcome.failed, outcome.failed
    results = {}
    order = [e.name for e in sweep.experiments]  # the table's order, not the run order
    for run in sorted(planned, key=lambda r: order.index(r.name)):
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        for group, names in sweep.category_groups.items():
            metrics.update(group_means(metrics, names, group))
        results[run.name] = {**metrics, "run_dir": str(run.run_dir)}
    return results


def update_card(card: Path, markdown: str, marker: str = "benchmark") -> None:
    """Replaces the card's block between ``<!-- marker -->`` and ``<!-- /marker -->``
    (appends one when there is none)."""
    text = card.read_text()
    block = f"<!-- {marker} -->\n{markdown}\n<!-- /{marker} -->"
    pattern = rf"<!-- {re.escape(marker)} -->.*?<!-- /{re.escape(marker)} -->"
    new, count = re.subn(pattern, lambda _: block, text, flags=re.S)
    card.write_text(new if count else text.rstrip("\n") + "\n\n" + block + "\n")


def write_summary(
    out: Path, title: str, table: str, comparison: Any, plots: bool
) -> dict[str, Path]:
    """The table (``benchmark.md``) and ``retrieval compare``'s tables (and plots unless
    ``plots=False``, for the committed summaries) under ``out``; returns name -> path."""
    from retrieval.report.compare import write_comparison

    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(f"# Scenes benchmark\n\n{title}.\n\n{table}\n")
    written = {"benchmark.md": out / "benchmark.md"}
    return {**written, **write_comparison(comparison, out, plots=plots)}


def _shown(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "scenes")
    parser.add_argument(
        "--out",
        type=Path,
        default=OUTPUT,
        help="where everything goes: run folders (runs/<run>), the table, compare's tables "
        "and plots; random weights: <out>/random (default: outputs/scenes, git-ignored)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write the committed summaries (the table, compare's tables, no plots) "
        "here, e.g. results/scenes (random weights: <results>/random); default: none",
    )
    parser.add_argument("--num-images", type=int, default=None, help="default: 400")
    parser.add_argument("--seed", type=int, default=None, help="default: 2023")
    parser.add_argument(
        "--weights", default=str(WEIGHTS), help="a checkpoint for every retriever, or 'random'"
    )
    parser.add_argument("--runs", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument(
        "--reuse", action="store_true", help="reuse run folders (embeddings) of an earlier run"
    )
    parser.add_argument(
        "--card",
        action="store_true",
        help=f"write the table into the model card ({CARD.relative_to(ROOT)})",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pretrained = None if args.weights in ("random", "null", "none") else args.weights
    options = scenes_options("eval", args.num_images, args.seed)
    # outputs/scenes/ (shipped weights) or outputs/scenes/random/: runs, table, plots
    out_dir = args.out if pretrained is not None else args.out / "random"
    results = run_benchmark(
        args.data,
        out_dir,
        args.num_images,
        args.seed,
        pretrained,
        args.runs,
        args.overrides,
        args.reuse,
    )
    groups = scenes_sweep(args.data, out_dir, pretrained).category_groups
    rows = [
        {
            "run": name,
            **{key: m.get(key) for key, _ in columns(groups)},
            "reps_per_image": m["reps_per_image"]["mean"],
        }
        for name, m in results.items()
    ]
    weights = "RANDOM weights" if pretrained is None else f"weights {Path(pretrained).name}"
    title = (
        f"{options.num_images} held-out scenes (256 x 256, seed {options.seed}), "
        f"64 colour-shape queries ({len(HELD_OUT_PAIRS)} held out), {weights}; percent"
    )
    print_table(rows, groups, title, Console())
    table = markdown_table(rows, groups)
    from retrieval.report.compare import build_comparison

    comparison = build_comparison([Path(r["run_dir"]) for r in results.values()], "none")
    written = write_summary(out_dir, title, table, comparison, plots=True)
    print(f"wrote {', '.join(sorted(p.name for p in written.values()))} to {_shown(out_dir)}/")
    print(f"run folders: {_shown(out_dir / 'runs')}/")
    if args.results is not None:
        # results/scenes/ or results/scenes/random/: the one table and `retrieval
        # compare`'s tables, no plots (results/README.md)
        results_dir = args.results if pretrained is not None else args.results / "random"
        write_summary(results_dir, title, table, comparison, plots=False)
        print(f"wrote the committed summaries to {_shown(results_dir)}/")
    if args.card:
        command = "python tools/run_scenes_benchmark.py" + (
            " --weights random" if pretrained is None else ""
        )
        heading = "## Benchmark" if pretrained is not None else "### The same with random weights"
        update_card(
            CARD,
            f"{heading}\n\n{title}.\n\n{table}\n\nReproduce: `{command}`.",
            "benchmark" if pretrained is not None else "benchmark-random",
        )
        print(f"wrote the table into {_shown(CARD)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
