"""``retrieval index build RUN_DIR``, ``retrieval index update INDEX`` and
``retrieval index info INDEX``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

TOMBSTONE_NOTE = 0.25  # above this fraction of removed rows, `index update` suggests a rebuild


def _build(args: argparse.Namespace) -> int:
    from retrieval.index import build_index, open_index

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
        f"built in {m['build_seconds']:.2f} s; {m['disk_bytes_per_image']:.0f} bytes/image "
        f"on disk, {m['memory_bytes_per_image']:.0f} in memory; settings "
        f"{json.dumps(m['backend_state'])}"
    )
    recall = m["recall"]
    if recall.get("queries") and recall["value"] < recall["target"]:
        console.print(
            f"[yellow]recall@{recall['k']} on held-out queries is {recall['value']:.3f}, below "
            f"the target {recall['target']}: tuned on the other half, it fell short here; "
            f"rebuild with a higher --recall-target or set the backend's knobs by --option"
        )
    console.print(f"index folder: {out}")
    return 0


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--option {text!r} must look like key=value (e.g. nprobe=32)")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _update(args: argparse.Namespace) -> int:
    from retrieval.index import update_index

    result = update_index(
        args.index,
        progress=not args.no_progress,
        device=args.device,
        run_dir=args.run,
        retune=args.retune,
    )
    console = Console()
    if not result.changed:
        console.print(
            f"{result.folder}: no change (the index holds the run's {result.images} live "
            f"images); generation {result.generation} kept"
        )
        return 0
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
    return 0


def _info(args: argparse.Namespace) -> int:
    from retrieval.index.search import read_manifest

    manifest = read_manifest(args.index)
    manifest.setdefault("generation", 0)  # an index from before updates: as built
    print(json.dumps(manifest, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``index build RUN_DIR``, ``index update INDEX`` and ``index info INDEX``."""
    index = subparsers.add_parser("index", help="build a search index over a run's embeddings")
    commands = index.add_subparsers(dest="index_command", required=True)
    build = commands.add_parser("build", help="index a run's stored representatives")
    build.add_argument("run_dir", help="run folder made by `retrieval eval`")
    build.add_argument(
        "--backend",
        default="exact",
        help="exact (default), faiss (flat or ivfpq by size), faiss-flat, faiss-ivfpq, lancedb, "
        "milvus (milvus-lite in the index folder, or --option uri=... collection=...)",
    )
    build.add_argument("--out", help="index folder (default RUN_DIR/index/BACKEND)")
    build.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (exact scoring)")
    build.add_argument("--recall-k", type=int, default=50, help="K of the recorded recall@K")
    build.add_argument(
        "--recall-target",
        type=float,
        default=0.95,
        help="recall approximate backends are tuned to reach (default 0.95)",
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
        help="add the run's new images to an index and drop its removed ones (a new generation)",
    )
    update.add_argument("index", help="index folder made by `retrieval index build`")
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
        "info", help="print an index's manifest (recall, sizes, run, generation)"
    )
    info.add_argument("index")
    info.set_defaults(func=_info)
