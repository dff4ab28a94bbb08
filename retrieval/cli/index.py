"""``retrieval index build RUN_DIR``, ``retrieval index update INDEX|RUN`` and
``retrieval index info INDEX``. ``index info`` reads the manifest and the run's image ids
only (no torch): what the index holds and whether its run has moved on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from retrieval.index import UpdateResult
    from retrieval.index.manifest import IndexManifest

TOMBSTONE_NOTE = 0.25  # above this fraction of removed rows, `index update` suggests a rebuild


def _build(args: argparse.Namespace) -> int:
    from retrieval.index import build_index, open_index
    from retrieval.index.manifest import record_index

    options = dict(_option(o) for o in args.option)
    out = build_index(
        args.run_dir,
        args.backend,
        args.out,
        args.device,
        args.recall_k,
        args.recall_target,
        progress=not args.no_progress,
        **options,
    )
    index = open_index(out, "cpu")
    m = index.manifest
    console = Console()
    console.print(index.describe())
    console.print(
        f"built in {m.build_seconds:.2f} s; {m.disk_bytes_per_image:.0f} bytes/image "
        f"on disk, {m.memory_bytes_per_image:.0f} in memory; settings "
        f"{json.dumps(m.backend_state)}"
    )
    recall = m.recall
    if recall.get("queries") and recall["value"] < recall["target"]:
        console.print(
            f"[yellow]recall@{recall['k']} on held-out queries is {recall['value']:.3f}, below "
            f"the target {recall['target']}: tuned on the other half, it fell short here; "
            f"rebuild with a higher --recall-target or set the backend's knobs by --option"
        )
    console.print(f"index folder: {out}")
    record_index(args.run_dir, out)
    return 0


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``, the value read as JSON where it parses as JSON.

    Raises:
        ConfigError: ``text`` has no ``=`` (one message, no traceback).
    """
    from retrieval.errors import ConfigError

    if "=" not in text:
        raise ConfigError(f"--option {text!r} must look like key=value (e.g. --option nprobe=32)")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _update(args: argparse.Namespace) -> int:
    from retrieval.errors import IndexFileError
    from retrieval.index import update_index
    from retrieval.index.manifest import MANIFEST, run_indexes

    target = Path(args.index)
    if (target / MANIFEST).is_file() or not (target / "embeddings").is_dir():
        folders = [target]  # an index (or a missing folder: update_index names the error)
    else:
        folders = run_indexes(target)
        if not folders:
            raise IndexFileError(
                f"{target} is a run folder with no index yet: build one with "
                f"`retrieval index build {target}`"
            )
        if args.run is not None:
            raise IndexFileError(f"--run {args.run}: give it with an index folder, not a run")
    console = Console()
    for folder in folders:
        result = update_index(
            folder,
            progress=not args.no_progress,
            device=args.device,
            run_dir=args.run,
            retune=args.retune,
        )
        _report_update(console, result)
    return 0


def _report_update(console: Console, result: UpdateResult) -> None:
    if not result.changed:
        console.print(
            f"{result.folder}: no change (the index holds the run's {result.images} live "
            f"images); generation {result.generation} kept"
        )
        return
    recall = result.recall
    how = "exact" if not recall.get("queries") else f"{recall['queries']} fresh held-out queries"
    console.print(
        f"{result.folder}: +{result.added} images ({result.added_representatives} "
        f"representatives), -{result.removed} images ({result.removed_representatives} "
        f"representatives) in {result.seconds:.2f} s; now {result.images} images, "
        f"generation {result.generation}; recall@{recall['k']} vs exact "
        f"{recall['value']:.3f} ({how})"
    )
    if recall.get("queries") and recall["value"] < recall["target"]:
        console.print(
            f"[yellow]recall@{recall['k']} is below the target {recall['target']}: tune the "
            f"search settings again (`retrieval index update --retune`), or rebuild the index "
            f"(`retrieval index build`) to retrain it on the images it holds now"
        )
    if result.tombstones > TOMBSTONE_NOTE:
        dead = result.rows - result.live_rows
        console.print(
            f"[yellow]{dead} of the index's {result.rows} rows ({result.tombstones:.0%}) "
            f"belong to removed images: searches skip them, but they cost memory and time; "
            f"rebuild the index (`retrieval index build RUN --backend ... --out "
            f"{result.folder}`) to compact it"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary(folder: Path, manifest: IndexManifest) -> list[str]:
    """``index info``'s lines: what the index is, holds and costs, and its recall."""
    retriever = manifest.retriever
    model = " ".join(
        str(retriever[k]) for k in ("name", "backbone", "resolution") if retriever.get(k)
    )
    recall = manifest.recall
    how = "measured exact" if not recall.get("queries") else f"{recall['queries']} held-out queries"
    disk = sum(manifest.files.values())
    history = manifest.history
    lines = [
        f"index      {folder}",
        f"backend    {manifest.backend}"
        + (" (approximate)" if manifest.approximate else " (exact)"),
        f"run        {manifest.run}",
        f"retriever  {model} (D={manifest.embed_dim})",
        f"holds      {manifest.images} images, {manifest.representatives} representatives",
        f"recall@{recall['k']:<4} {recall['value']:.3f} vs exact search ({how})",
        f"size       {_size(disk)} on disk ({_size(manifest.disk_bytes_per_image)}/image), "
        f"{_size(manifest.memory_bytes_per_image)}/image in memory",
        f"generation {manifest.generation}: built {manifest.created}"
        + (f", {len(history)} updates, last {manifest.updated}" if history else ""),
    ]
    return lines


def _info(args: argparse.Namespace) -> int:
    from retrieval.index.manifest import read_manifest, run_changes

    manifest = read_manifest(args.index)
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    console = Console(highlight=False)
    for line in summary(Path(args.index), manifest):
        console.print(line, markup=False)
    changes = run_changes(args.index, manifest)
    if changes.stale:
        console.print(changes.note(), style="yellow", markup=False)
    else:
        console.print("up to date with its run", markup=False)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``index build RUN_DIR``, ``index update INDEX`` and ``index info INDEX``."""
    index = subparsers.add_parser(
        "index", help="build, update and describe search indexes over a run's embeddings"
    )
    commands = index.add_subparsers(dest="index_command", required=True)
    build = commands.add_parser("build", help="index a run's stored representatives")
    build.add_argument(
        "run_dir",
        help="run folder (run.output_dir) made by `retrieval embed` (your own images) or "
        "`retrieval eval` (a benchmark)",
    )
    build.add_argument(
        "--backend",
        default="exact",
        help="exact (default), faiss (exact flat codes up to 2M representatives, fast-scan PQ "
        "above), faiss-flat, faiss-ivfpq, faiss-ivfpqfs, faiss-rabitq, lancedb, milvus "
        "(milvus-lite in the index folder, or --option uri=... collection=...); "
        "`retrieval list` shows each one's options",
    )
    build.add_argument("--out", help="index folder (default RUN_DIR/index/BACKEND)")
    build.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (exact scoring)")
    build.add_argument("--recall-k", type=int, default=50, help="K of the recorded recall@K")
    build.add_argument(
        "--recall-target",
        type=float,
        default=0.99,
        help="recall@K against exact search that approximate backends are tuned to reach "
        "(default 0.99)",
    )
    build.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend setting, e.g. nprobe=32, overfetch=10, nlist=1024, uri=http://host:19530 "
        "(repeatable)",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)
    update = commands.add_parser(
        "update",
        help="add the run's new images to an index and drop its removed ones (a new "
        "generation); given a run folder, update every index of the run",
    )
    update.add_argument(
        "index",
        help="index folder made by `retrieval index build`, or a run folder: every index "
        "built from it (RUN/index/* and those built elsewhere with `index build`)",
    )
    update.add_argument(
        "--run", help="the run the index should follow (refused if it was built from another)"
    )
    update.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (exact scoring)")
    update.add_argument(
        "--retune",
        action="store_true",
        help="tune an approximate backend's search settings again, as a build does (slower)",
    )
    update.add_argument("--no-progress", action="store_true", help="no progress bars")
    update.set_defaults(func=_update)
    info = commands.add_parser(
        "info",
        help="what an index holds (images, recall, size, generation) and whether its run "
        "has moved on since",
    )
    info.add_argument("index", help="index folder made by `retrieval index build`")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_info)
