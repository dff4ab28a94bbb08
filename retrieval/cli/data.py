"""``retrieval data download|check NAME [--root DIR]``: dataset set-up from the shell."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.data.download import DATASETS, DEFAULT_ROOT, check, download


def _download(args: argparse.Namespace) -> int:
    download(args.name, args.root, progress=not args.no_progress)
    return 0


def _check(args: argparse.Namespace) -> int:
    return 0 if check(args.name, args.root).ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``data download NAME`` and ``data check NAME`` (both with ``--root DIR``)."""
    data = subparsers.add_parser("data", help="download and check the benchmark datasets")
    commands = data.add_subparsers(dest="data_command", required=True)
    root_help = f"data root holding coco/, lvis/, nuimages/ (default: {DEFAULT_ROOT})"

    get = commands.add_parser(
        "download",
        help="fetch a dataset (checksums verified, resumable; nuimages: prints the steps)",
    )
    get.add_argument("name", choices=DATASETS)
    get.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=root_help)
    get.add_argument("--no-progress", action="store_true", help="no progress bars")
    get.set_defaults(func=_download)

    verify = commands.add_parser(
        "check", help="verify a local copy: files present, image and category counts"
    )
    verify.add_argument("name", choices=DATASETS)
    verify.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=root_help)
    verify.set_defaults(func=_check)
