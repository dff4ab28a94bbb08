"""``retrieval search INDEX "query"``: top images from the shell, with a gallery, a
contact sheet or JSON for other tools. Loads no Lightning and no wandb."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from retrieval.errors import ConfigError
from retrieval.index import SearchIndex, open_index
from retrieval.index.hits import Hit


def _search(args: argparse.Namespace) -> int:
    from retrieval.devices import check_device
    from retrieval.index.search import check_query

    console = Console()
    check_query(args.query)
    check_device(args.device, "--device")
    if args.top < 1:
        raise ConfigError(f"--top {args.top}: ask for at least 1 image (e.g. --top 50)")
    index = open_index(args.index, args.device)
    console.print(index.describe())
    if args.top > index.num_images:
        Console(stderr=True).print(
            f"note: --top {args.top} capped at the index's {index.num_images} images"
        )
        args.top = index.capped_top(args.top)
    if args.where is not None:  # a bad filter fails before the model loads
        allowed = len(index.allowed_ids(args.where))
        total = index.metadata().num_rows
        console.print(f"where {args.where}: {allowed} of {total} images")
    begin = time.perf_counter()
    index.retriever()  # model load, reported apart from the query itself
    loaded = time.perf_counter()
    vector = index.embed([args.query], args.prompts)
    encoded = time.perf_counter()
    hits = index.search_vectors(vector, args.top, args.where)[0]
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
        write_hits_json(index, args.query, hits, args.json, args.where)
        console.print(f"json: {args.json}")
    if args.gallery or args.sheet:
        from retrieval.report.gallery import write_gallery

        written = write_gallery(index, args.query, hits, args.gallery, args.sheet, vector[0])
        for kind, path in written.items():
            console.print(f"{kind}: {path}")
    if index.retriever().random_weights:
        console.print("RANDOM WEIGHTS: this index checks the pipeline; its hits mean nothing.")
    return 0


def write_hits_json(
    index: SearchIndex, query: str, hits: list[Hit], path: str, where: str | None = None
) -> None:
    """The hits as JSON for other tools: rank, image id, score, matched representative,
    its box and the image file, with the index, the recall it was built with and the
    ``--where`` filter (null for none)."""
    from retrieval.report.gallery import image_paths

    files = image_paths(index, [h.image_id for h in hits])
    record = {
        "query": query,
        "where": where,
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``search INDEX QUERY``."""
    search = subparsers.add_parser("search", help="top images of a text query in an index")
    search.add_argument("index", help="index folder (`retrieval index build`)")
    search.add_argument("query", help='text, e.g. "a stroller"')
    search.add_argument("--top", type=int, default=50, help="images to return (default 50)")
    search.add_argument("--prompts", help="prompt set (default: the run's text.prompts)")
    search.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    search.add_argument("--gallery", help="write an HTML gallery of the hits here")
    search.add_argument("--sheet", help="write a PNG contact sheet of the hits here")
    search.add_argument("--json", help="write the hits (ids, scores, boxes, files) as JSON here")
    search.add_argument(
        "--where",
        help="only images whose metadata matches, e.g. \"camera = 'CAM_FRONT' AND width >= "
        '1024" (= != < <= > >=, IN (...), IS [NOT] NULL, AND, OR, NOT, parentheses; '
        "columns of the run's images.parquet, or image_id for a labelled run)",
    )
    search.set_defaults(func=_search)
