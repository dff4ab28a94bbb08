"""``retrieval eval CONFIG [key=value ...]`` and ``retrieval embed CONFIG [...]``.

A run that fails before writing anything leaves no folder behind: the empty folders it
created (``run.output_dir``, ``embeddings/``) are removed, never a file nor a folder that
was there before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from retrieval.cli.output import follow_libraries


def remove_empty_folders(folder: Path) -> None:
    """Removes ``folder`` and the folders under it that hold no file (deepest first)."""
    if folder.is_symlink():
        return
    for root, _, _ in os.walk(folder, topdown=False):
        with contextlib.suppress(OSError):  # not empty (or gone): kept
            Path(root).rmdir()


def _launched_rank() -> bool:
    """Whether this process is a rank > 0 of a distributed run (its launcher's variables,
    as Lightning reads them): it runs under rank 0's lock."""
    ranks = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return any(os.environ.get(name, "0") != "0" for name in ranks)


def _run(args: argparse.Namespace, phase: str) -> int:
    from retrieval.config import load_config, output_dir_of
    from retrieval.store.lock import check_unlocked

    folder = output_dir_of(args.config, args.overrides)
    if folder is not None and not _launched_rank():  # a folder in use: said at once
        check_unlocked(folder)
    cfg = load_config(args.config, args.overrides)  # a bad key fails before Lightning loads
    import retrieval.engine

    run = getattr(retrieval.engine, phase)  # imports Lightning, which sets up its loggers
    follow_libraries(args.verbose)
    created = Path(str(cfg.run.output_dir)).absolute()  # the outermost folder the run makes
    while not created.parent.exists():
        created = created.parent
    existed = created.exists()
    try:
        run(cfg)
    except BaseException:
        if not existed:
            remove_empty_folders(created)
        raise
    return 0


def _eval(args: argparse.Namespace) -> int:
    return _run(args, "evaluate")


def _embed(args: argparse.Namespace) -> int:
    return _run(args, "embed")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``eval`` (embed then score) and ``embed`` (the embed phase alone)."""
    for name, func, text in (
        ("eval", _eval, "embed a dataset with a retriever and score it"),
        ("embed", _embed, "embed a dataset into a run folder's shards (no metrics)"),
    ):
        parser = subparsers.add_parser(name, help=text)
        parser.add_argument("config", help="experiment name in configs/ or a YAML path")
        parser.add_argument("overrides", nargs="*", help="key=value or group=name overrides")
        parser.set_defaults(func=func)
