"""``retrieval search INDEX "query"``: top images from the shell, with a gallery, a
contact sheet or JSON for other tools. Loads no Lightning and no wandb."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from retrieval.errors import ConfigError

if TYPE_CHECKING:  # the index package (numpy) loads when a search runs, not for --help
    from torch import Tensor

    from retrieval.index import SearchIndex
    from retrieval.index.hits import Hit, HitRecord


def _search(args: argparse.Namespace) -> int:
    from retrieval.devices import check_device
    from retrieval.index import open_index
    from retrieval.index.compound import parse_compound
    from retrieval.index.search import check_query
    from retrieval.outputs import check_output

    console = Console()
    label = query_label(args)
    if label is None:  # a text query
        check_query(args.query)
    check_device(args.device, "--device")
    if args.top < 1:
        raise ConfigError(f"--top {args.top}: ask for at least 1 image (e.g. --top 50)")
    for key in ("json", "gallery", "sheet"):  # before any work: one message, no traceback
        if getattr(args, key):
            check_output(getattr(args, key), f"--{key}")
    if label is None:
        parse_compound(args.query)  # a query with nothing to find fails before the model loads
    index = open_index(args.index, args.device)
    console.print(index.describe(), markup=False)
    changes = index.run_changes()
    if changes.stale:
        Console(stderr=True).print(Text(changes.note(), style="yellow"))
    if args.top > index.num_images:
        Console(stderr=True).print(
            f"note: --top {args.top} capped at the index's {index.num_images} images"
        )
        args.top = index.capped_top(args.top)
    if args.where is not None:  # a bad filter fails before the model loads
        allowed = len(index.allowed_ids(args.where))
        total = index.metadata().num_rows
        console.print(f"where {args.where}: {allowed} of {total} images", markup=False)
    begin = time.perf_counter()
    index.retriever()  # model load, reported apart from the query itself
    loaded = time.perf_counter()
    if label is None:
        vector = query_vector(index, args.query, args.prompts)
    else:  # a picture's or a stored image's representatives: MaxSim over them
        vector = example_queries(index, args)
    encoded = time.perf_counter()
    if label is None:
        hits = index.search_vectors(vector, args.top, args.where)[0]
    else:
        hits = index.search_multivector(vector, args.top, args.where)
    searched = time.perf_counter()
    records = hit_records(index, hits)
    label = label or args.query
    table = Table(title=escape(f'top {len(hits)} for "{label}"'))
    for column in ("rank", "image id", "score", "rep", "box (xyxy, 0..1)"):
        right = column in ("rank", "image id")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    table.add_column("file", overflow="fold")  # the one column a narrow terminal folds
    for record in records:
        box = "-" if record["box"] is None else ",".join(f"{v:.2f}" for v in record["box"])
        table.add_row(
            str(record["rank"]),
            str(record["image_id"]),
            f"{record['score']:.4f}",
            str(record["rep_index"]),
            box,
            Text(record["path"] or "-"),  # a file name is text, never rich markup
        )
    console.print(table)
    recall = index.recall
    if index.manifest.approximate and args.top > recall["k"]:
        console.print(
            f"[yellow]recall was measured for the top {recall['k']}; a top {args.top} at the "
            f"same settings recalls less (fewer probes per result): rebuild with "
            f"--recall-k {args.top} to tune and measure it there"
        )
    console.print(
        f"model load {loaded - begin:.1f} s; query encoding "
        f"{1000 * (encoded - loaded):.1f} ms, search {1000 * (searched - encoded):.1f} ms"
    )
    if args.json:
        write_hits_json(index, label, records, args.json, args.where)
        console.print(f"json: {args.json}")
    if args.gallery or args.sheet:
        import torch.nn.functional as F

        from retrieval.report.gallery import write_gallery

        heat = F.normalize(vector.float().mean(dim=0), dim=0)  # one vector to draw
        written = write_gallery(index, label, hits, args.gallery, args.sheet, heat)
        for kind, path in written.items():
            console.print(f"{kind}: {path}")
    if index.retriever().random_weights:
        console.print("RANDOM WEIGHTS: this index checks the pipeline; its hits mean nothing.")
    return 0


def query_vector(index: SearchIndex, query: str, prompts: str | None = None) -> Tensor:
    """``[1, D]``: a plain text's embedding, or a compound query's vector
    (``"a red circle -a red ring"``: :mod:`retrieval.index.compound`, as the API's)."""
    from retrieval.index.compound import compound_vector, parse_compound

    parsed = parse_compound(query)
    if not parsed.compound:
        return index.embed(parsed.positive, prompts)
    texts = parsed.positive + parsed.negative
    return compound_vector(index.embed(texts, prompts), len(parsed.positive))[None]


def query_label(args: argparse.Namespace) -> str | None:
    """What a picture or example query is called (None for a text query); exactly one of
    the text, ``--image`` and ``--like`` must be given."""
    given = [args.query is not None, args.image is not None, args.like is not None]
    if sum(given) != 1:
        raise ConfigError(
            'search for one thing: a text ("a stroller"), --image FILE or --like IMAGE_ID[:REP]'
        )
    if args.image is not None:
        return f"picture {args.image}"
    if args.like is not None:
        return f"like {args.like}"
    return None


def example_queries(index: SearchIndex, args: argparse.Namespace) -> Tensor:
    """``[m, D]``: the ``--image`` file's representatives as the index's retriever makes
    them, or the stored ones of ``--like IMAGE_ID`` (one, ``IMAGE_ID:REP``: a region)."""
    if args.image is not None:
        return index.picture_queries(args.image)
    image_id, _, rep = str(args.like).partition(":")
    try:
        return index.stored_queries(int(image_id), int(rep) if rep else None)
    except ValueError:
        raise ConfigError(
            f"--like {args.like}: give an image id, or an image id and a representative, "
            f"e.g. --like 42 or --like 42:3"
        ) from None


def hit_records(index: SearchIndex, hits: list[Hit]) -> list[HitRecord]:
    """The hits in the one shape every surface writes (:mod:`retrieval.index.hits`)."""
    files = index.image_files([h.image_id for h in hits])[0]
    return [h.record(rank, files.get(h.image_id)) for rank, h in enumerate(hits, start=1)]


def write_hits_json(
    index: SearchIndex,
    query: str,
    records: list[HitRecord],
    path: str,
    where: str | None = None,
) -> None:
    """The hits as JSON for other tools (:mod:`retrieval.index.hits` names each field),
    with the query, the ``--where`` filter (null for none), the index, its backend and
    the recall it was built with."""
    record = {
        "query": query,
        "where": where,
        "index": str(index.folder),
        "backend": index.manifest.backend,
        "recall": index.recall,
        "hits": records,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``search INDEX QUERY``."""
    search = subparsers.add_parser("search", help="top images of a text query in an index")
    search.add_argument("index", help="index folder (`retrieval index build`)")
    search.add_argument(
        "query",
        nargs="?",
        help='text, e.g. "a stroller"; a compound query finds one phrase and pushes others '
        'away: "a red circle -a red ring" (docs/serve.md has the formula)',
    )
    search.add_argument(
        "--image",
        help="instead of text, a picture file: images like it by MaxSim over its "
        "representatives as the index's retriever makes them (docs/scale.md)",
    )
    search.add_argument(
        "--like",
        help="instead of text, an indexed image: IMAGE_ID (more like this, MaxSim over its "
        "stored representatives) or IMAGE_ID:REP (one region, as a text query)",
    )
    search.add_argument("--top", type=int, default=50, help="images to return (default 50)")
    search.add_argument("--prompts", help="prompt set (default: the run's text.prompts)")
    search.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    search.add_argument("--gallery", help="write an HTML gallery of the hits here")
    search.add_argument("--sheet", help="write a PNG contact sheet of the hits here")
    search.add_argument(
        "--json", help="write the hits (rank, image_id, score, rep_index, box, path) as JSON here"
    )
    search.add_argument(
        "--where",
        help="only images whose metadata matches, e.g. \"camera = 'CAM_FRONT' AND width >= "
        '1024" (= != < <= > >=, IN (...), IS [NOT] NULL, AND, OR, NOT, parentheses; '
        "columns of the run's images.parquet, or image_id for a labelled run)",
    )
    search.set_defaults(func=_search)
