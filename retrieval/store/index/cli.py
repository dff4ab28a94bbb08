"""``retrieval index build|info`` and ``retrieval search``: large-scale search from the shell.

The lead CLI (``retrieval/cli.py``) calls :func:`register_cli` with its subparsers; each
subcommand's ``func`` returns the exit status. User-caused errors are ``ValueError`` /
``FileNotFoundError`` subclasses, which the lead CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table


def _build(args: argparse.Namespace) -> int:
    from retrieval.store.index import build_index, open_index

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


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--option {text!r} must look like key=value (e.g. nprobe=32)")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _info(args: argparse.Namespace) -> int:
    from retrieval.store.index.search import read_manifest

    print(json.dumps(read_manifest(args.index), indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    from retrieval.store.index import open_index

    console = Console()
    index = open_index(args.index, args.device)
    console.print(index.describe())
    begin = time.perf_counter()
    index.retriever()  # model load, reported apart from the query itself
    loaded = time.perf_counter()
    vector = index.embed([args.query], args.prompts)
    encoded = time.perf_counter()
    hits = index.search_vectors(vector, args.top)[0]
    searched = time.perf_counter()
    table = Table(title=f'top {len(hits)} for "{args.query}"')
    for column in ("rank", "image id", "score", "rep", "box (xyxy, normalised)"):
        table.add_column(column, justify="right" if column != "box (xyxy, normalised)" else "left")
    for rank, hit in enumerate(hits, start=1):
        box = "-" if hit.box is None else ", ".join(f"{v:.2f}" for v in hit.box)
        table.add_row(str(rank), str(hit.image_id), f"{hit.score:.4f}", str(hit.rep_index), box)
    console.print(table)
    recall = index.recall
    if index.manifest["approximate"] and args.top > recall["k"]:
        console.print(
            f"[yellow]recall was measured for the top {recall['k']}; a top {args.top} at the "
            f"same settings recalls less (fewer probes per result): rebuild with "
            f"--recall-k {args.top} to tune and measure it there"
        )
    console.print(
        f"model load {loaded - begin:.1f} s; text encoding "
        f"{1000 * (encoded - loaded):.1f} ms, search {1000 * (searched - encoded):.1f} ms"
    )
    if args.json:
        write_hits_json(index, args.query, hits, args.json)
        console.print(f"json: {args.json}")
    if args.gallery or args.sheet:
        from retrieval.report.gallery import write_gallery

        written = write_gallery(index, args.query, hits, args.gallery, args.sheet, vector[0])
        for kind, path in written.items():
            console.print(f"{kind}: {path}")
    if index.retriever().random_weights:
        console.print("RANDOM WEIGHTS: this index checks the pipeline; its hits mean nothing.")
    return 0


def write_hits_json(index, query: str, hits: list, path: str) -> None:
    """The hits as JSON for other tools: rank, image id, score, matched representative,
    its box and the image file, with the index and the recall it was built with."""
    from pathlib import Path

    from retrieval.report.gallery import image_paths

    files = image_paths(index, [h.image_id for h in hits])
    record = {
        "query": query,
        "index": str(index.folder),
        "backend": index.manifest["backend"],
        "recall": index.recall,
        "hits": [
            {
                "rank": rank,
                "image_id": h.image_id,
                "score": h.score,
                "rep_index": h.rep_index,
                "box_xyxy_normalised": h.box,
                "file": None if files[h.image_id] is None else str(files[h.image_id]),
            }
            for rank, h in enumerate(hits, start=1)
        ],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2))


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``index build RUN_DIR``, ``index info INDEX`` and ``search INDEX QUERY``."""
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
    info = commands.add_parser("info", help="print an index's manifest (recall, sizes, run)")
    info.add_argument("index")
    info.set_defaults(func=_info)

    search = subparsers.add_parser("search", help="top images of a text query in an index")
    search.add_argument("index", help="index folder (`retrieval index build`)")
    search.add_argument("query", help='text, e.g. "a stroller"')
    search.add_argument("--top", type=int, default=50, help="images to return (default 50)")
    search.add_argument("--prompts", help="prompt set (default: the run's text.prompts)")
    search.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    search.add_argument("--gallery", help="write an HTML gallery of the hits here")
    search.add_argument("--sheet", help="write a PNG contact sheet of the hits here")
    search.add_argument("--json", help="write the hits (ids, scores, boxes, files) as JSON here")
    search.set_defaults(func=_search)
