"""``retrieval export RUN --format parquet|npy OUT``: a run's representatives for other tools;
``--format fiftyone --name NAME [--index INDEX]``: a FiftyOne dataset (the fiftyone extra)."""

from __future__ import annotations

import argparse

from rich.console import Console


def _export(args: argparse.Namespace) -> int:
    from retrieval.errors import ConfigError
    from retrieval.store.export import export_run

    if args.format == "fiftyone":
        return _export_fiftyone(args)
    if args.out is None or args.name is not None or args.index is not None:
        raise ConfigError(
            f"--format {args.format} writes to OUT (--name and --index are for --format "
            f"fiftyone): retrieval export RUN --format {args.format} OUT"
        )

    result = export_run(
        args.run_dir,
        args.out,
        format=args.format,
        dtype=args.dtype,
        progress=not args.no_progress,
        force=args.force,
    )
    Console().print(
        f"exported {result.rows} representatives of {result.images} images "
        f"({result.shards} shards, {result.dtype}"
        + (f", {result.removed} removed images left out" if result.removed else "")
        + (f", {result.missing_paths} rows without a path" if result.missing_paths else "")
        + f") to {result.out}"
    )
    return 0


def _export_fiftyone(args: argparse.Namespace) -> int:
    from retrieval.errors import ConfigError
    from retrieval.integrations.fiftyone import export_dataset

    if args.name is None or args.out is not None:
        raise ConfigError(
            "--format fiftyone makes a FiftyOne dataset, not a file: "
            "retrieval export RUN --format fiftyone --name NAME [--index INDEX]"
        )
    result = export_dataset(
        args.run_dir, args.name, index=args.index, progress=not args.no_progress
    )
    Console().print(
        f"FiftyOne dataset {result.name!r}: {result.samples} samples ({result.added} added, "
        f"{result.removed} removed, {result.updated} updated), {result.representatives} "
        f"representatives"
        + (
            f"; index {args.index} is its similarity brain run {result.brain_key!r}"
            if result.brain_key
            else ""
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``export RUN_DIR --format parquet|npy OUT``."""
    parser = subparsers.add_parser(
        "export",
        help="write a run's representatives (image id, path, slot, box, embedding) to "
        "parquet or an npy embeddings folder",
    )
    parser.add_argument("run_dir", help="run folder made by `retrieval eval` / `retrieval embed`")
    parser.add_argument(
        "--format",
        required=True,
        choices=("parquet", "npy", "fiftyone"),
        help="parquet: one file, one row per representative; npy: OUT/img_emb/img_emb_K.npy + "
        "OUT/metadata/metadata_K.parquet (clip-retrieval layout: embedding-reader, autofaiss); "
        "fiftyone: a FiftyOne dataset --name (docs/fiftyone.md)",
    )
    parser.add_argument("out", nargs="?", help="the parquet file or the npy folder to write")
    parser.add_argument("--name", help="fiftyone: the dataset to make or update")
    parser.add_argument(
        "--index", help="fiftyone: an index of RUN to register for text search in the App"
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "float32"),
        help="embedding dtype (default float16)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_export)
