"""Explaining search hits: each image with its matched region, score and rank.

A hit is drawn (:mod:`retrieval.report.drawing`, shared with the search service) with the
box of the representative that gave the image its score and, for every Dense-/Cluster-CLIP
index, a heatmap of the query's cosine with each of the image's Dense-CLIP cells beside
it: Dense-CLIP's stored cells are read from the run, Cluster-CLIP's (which keeps cluster
means, not cells) are computed from the picture by one backbone pass of the index's own
retriever. The HTML gallery embeds every picture (one portable file); the PNG contact
sheet puts the same panels on one image with a caption under each.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch import Tensor

from retrieval.data.images import BadImageError, load_image
from retrieval.errors import ConfigError
from retrieval.index import Hit, SearchIndex
from retrieval.report.drawing import (
    GalleryItem,
    cell_heat,
    cell_maps,
    dense_cells,
    draws_cells,
    panels,
    stored_cells,
    text_font,
)
from retrieval.representatives import Representatives
from retrieval.store.run_folder import RunFolder
from retrieval.store.shards import ShardReader, ShardStore

CAPTION_H = 44


def legend(items: list[GalleryItem]) -> str:
    """What the pictures show, naming only what is drawn."""
    parts = ["Yellow box: the region (representative) that gave the image its score."]
    if any(i.members is not None for i in items):
        parts.append("Cyan cells: the cells of that region's cluster.")
    if any(i.heatmap is not None for i in items):
        parts.append(
            "Right picture: the query's cosine similarity with each cell of the image, "
            "interpolated between cell centres and laid translucently over the photo (blue "
            "low, red high, more opaque where higher); the bar under it gives that "
            "picture's range of cosines."
        )
    return " ".join(parts)


def _locate(store: ShardStore, image_ids: list[int]) -> dict[int, Representatives]:
    """The stored representatives of ``image_ids`` (reads the rows of those alone)."""
    where = store.locate()
    found = {}
    for i in image_ids:
        if i in where:
            path, row = where[i]
            with ShardReader(path) as shard:
                found[i] = shard.rows(row, row + 1)
    return found


def image_paths(index: SearchIndex, image_ids: list[int]) -> dict[int, Path | None]:
    """Image files of the hits (:meth:`SearchIndex.image_files`; None each where the run
    cannot name one)."""
    return index.image_files(image_ids)[0]


def explain(index: SearchIndex, query: Tensor, hits: list[Hit]) -> list[GalleryItem]:
    """Gallery items of ``hits`` for the query embedding ``[D]``: image files from the
    run's dataset, cluster members from the run's shards when stored, and the heatmap of
    every Dense-/Cluster-CLIP hit (stored cells, else one backbone pass per batch of
    pictures; module docstring)."""
    ids = [h.image_id for h in hits]
    paths, roots = index.image_files(ids)
    store = RunFolder(index.run_dir).store()
    reps = _locate(store, ids) if store.shard_paths() else {}
    items = []
    for rank, hit in enumerate(hits, start=1):
        members = heat = None
        if hit.image_id in reps:
            members = cell_maps(query.cpu(), reps[hit.image_id], hit.rep_index)[0]
            cells = stored_cells(reps[hit.image_id])
            heat = None if cells is None else cell_heat(cells, query)
        items.append(GalleryItem(rank, hit, paths.get(hit.image_id), members, heat, roots))
    pending = [i for i in items if i.heatmap is None and i.path is not None]
    if pending and draws_cells(retriever := index.retriever()):
        for start in range(0, len(pending), CELL_BATCH):
            batch, pictures = [], []
            for item in pending[start : start + CELL_BATCH]:
                try:
                    pictures.append(load_image(item.path, item.roots))  # type: ignore[arg-type]
                    batch.append(item)
                except BadImageError:
                    continue  # drawn as a placeholder saying why
            if pictures:
                for item, cells in zip(batch, dense_cells(retriever, pictures), strict=True):
                    item.heatmap = cell_heat(cells, query)
    return items


CELL_BATCH = 8  # pictures per backbone pass when the gallery computes cells


def caption(item: GalleryItem) -> list[str]:
    hit = item.hit
    name = _shown_name(item.path)
    return [
        f"#{item.rank}  score {hit.score:.4f}",
        f"image {hit.image_id}  rep {hit.rep_index}  {name}",
    ]


def _shown_name(path: Path | None, parts: int = 2) -> str:
    """The file name with its folder (``trips/2023/a.jpg`` -> ``2023/a.jpg``)."""
    return "?" if path is None else "/".join(path.parts[-parts:])


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(out: str | Path, query: str, items: list[GalleryItem], info: str) -> Path:
    """A self-contained HTML gallery (pictures embedded) of the hits of ``query``."""
    figures = []
    for item in items:
        box = item.hit.box
        box_text = "" if box is None else " box " + ", ".join(f"{v:.2f}" for v in box)
        lines = "<br>".join(html.escape(line) for line in caption(item))
        record = html.escape(json.dumps(item.hit.record(item.rank, item.path)))  # the hit shape
        figures.append(
            f'<figure data-hit="{record}"><img src="{_data_uri(panels(item))}" '
            f'alt="rank {item.rank}, image {item.hit.image_id}">'
            f"<figcaption>{lines}{html.escape(box_text)}</figcaption></figure>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(query)}</title>
<style>body{{font-family:sans-serif;margin:16px}}figure{{display:inline-block;margin:8px;
vertical-align:top}}figcaption{{font-size:13px}}</style></head>
<body><h1>{html.escape(query)}</h1><p>{html.escape(info)}</p><p>{html.escape(legend(items))}</p>
{"".join(figures)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def write_sheet(
    out: str | Path, query: str, items: list[GalleryItem], info: str, columns: int | None = None
) -> Path:
    """A PNG contact sheet: a title, then one captioned tile per hit, row by row."""
    if not items:
        raise ConfigError(f"no hits for {query!r}: nothing to draw")
    tiles = [panels(item) for item in items]
    columns = columns or (3 if any(i.heatmap is not None for i in items) else 5)
    cell_w = max(t.width for t in tiles) + 12
    cell_h = max(t.height for t in tiles) + CAPTION_H + 12
    rows = math.ceil(len(tiles) / columns)
    width = cell_w * min(columns, len(tiles))
    info_lines = textwrap.wrap(info, width=max(width // 7, 40))
    title_h = 40 + 17 * (len(info_lines) + 1)
    sheet = Image.new("RGB", (width, title_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), f'"{query}"', fill="black", font=text_font(22))
    info_lines.extend(textwrap.wrap(legend(items), width=max(width // 7, 40)))
    for j, line in enumerate(info_lines):
        draw.text((8, 34 + 17 * j), line, fill=(70, 70, 70), font=text_font(13))
    for i, (tile, item) in enumerate(zip(tiles, items, strict=True)):
        x, y = (i % columns) * cell_w + 6, title_h + (i // columns) * cell_h
        sheet.paste(tile, (x, y))
        for j, line in enumerate(caption(item)):
            draw.text((x, y + tile.height + 4 + 18 * j), line, fill="black", font=text_font(14))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def write_gallery(
    index: SearchIndex,
    query: str,
    hits: list[Hit],
    html_out: str | Path | None = None,
    sheet_out: str | Path | None = None,
    query_vector: Tensor | None = None,
) -> dict[str, Any]:
    """Writes the HTML gallery and / or PNG sheet of ``hits``; returns the paths written."""
    vector = query_vector if query_vector is not None else index.embed([query])[0]
    items = explain(index, vector, hits)
    info = index.describe()
    written = {}
    if html_out:
        written["html"] = write_html(html_out, query, items, info)
    if sheet_out:
        written["sheet"] = write_sheet(sheet_out, query, items, info)
    return written
