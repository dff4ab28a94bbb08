"""``retrieval compare RUN_DIR... [--reference paper] [--out DIR]``: runs side by side."""

from __future__ import annotations

import argparse
from pathlib import Path


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from retrieval.outputs import check_output
    from retrieval.report.compare import build_comparison, print_comparison, write_comparison

    if args.out:
        check_output(args.out, "--out", "folder")  # before any run is read
    comp = build_comparison(args.run_dirs, args.reference, args.metric)
    out = (
        Path(args.out)
        if args.out
        else (comp.runs[0].run_dir if len(comp.runs) == 1 else Path("compare"))
    )
    written = write_comparison(comp, out, args.top, plots=not args.no_plots)
    print_comparison(comp, top=args.top)
    if args.wandb != "disabled":
        from retrieval.report.wandb_log import log_comparison

        log_comparison(comp, out, written, mode=args.wandb, project=args.wandb_project)
    Console().print(f"written: {', '.join(str(p) for p in written.values())}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``retrieval compare RUN_DIR... [--reference paper] [--out DIR]``."""
    parser = subparsers.add_parser(
        "compare", help="run folders side by side (tables, plots), with the paper's numbers"
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (run.output_dir); the first is the baseline",
    )
    parser.add_argument(
        "--reference",
        choices=("paper", "none"),
        default="paper",
        help="add the paper's numbers where a run matches a row (default)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for compare.md/.csv and plots (default: the run folder "
        "for one run, ./compare for several)",
    )
    parser.add_argument(
        "--metric", default=None, help="per-category metric for deltas and bars (default ap@K)"
    )
    parser.add_argument(
        "--top", type=int, default=5, help="largest gains and losses shown per pair (default 5)"
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="tables only (small files, e.g. for results/)"
    )
    parser.add_argument(
        "--wandb",
        choices=("disabled", "offline", "online"),
        default="disabled",
        help="also log the comparison as a wandb run",
    )
    parser.add_argument("--wandb-project", default="object-retrieval")
    parser.set_defaults(func=_compare)
