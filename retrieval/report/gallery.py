"""Explaining search hits: each image with its matched region, score and rank.

A hit is drawn with the box of the representative that gave the image its score, the
cells of that representative's cluster filled in when the run stored them (Cluster-CLIP's
``members``), and, when the representatives live on a grid of cells (Dense-CLIP) or
cover one (Cluster-CLIP), a heatmap of the query's cosine over the cells beside it. The
HTML gallery embeds every picture (one portable file); the PNG contact sheet puts the
same panels on one image with a caption under each.
"""

from __future__ import annotations

import base64
import html
import io
import math
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from retrieval.aggregate import grid_cell_boxes
from retrieval.data.collection import collection_image_paths
from retrieval.data.images import image_source
from retrieval.errors import ConfigError
from retrieval.index import Hit, SearchIndex
from retrieval.representatives import Representatives
from retrieval.store.shards import ShardReader, ShardStore

PANEL = 240  # side of one picture panel, pixels
BOX_COLOUR = (255, 214, 0)
MEMBER_COLOUR = (0, 200, 255, 90)
HEAT_ALPHA = 0.75
CAPTION_H = 44
LEGEND = (
    "Yellow box: the representative that gave the image its score; cyan cells: its "
    "cluster. Right panel: the query's cosine per cell (dark low, bright high, per image)."
)


@dataclass
class GalleryItem:
    """One hit with what is needed to draw it.

    Attributes:
        rank: 1-based position in the results.
        hit: the hit (image id, score, representative index, box).
        path: the image file, or None when it cannot be found.
        members: ``[h, w]`` bool cells of the matched representative's cluster, or None.
        heatmap: ``[h, w]`` query cosine per cell (nan where no representative), or None.
    """

    rank: int
    hit: Hit
    path: Path | None
    members: np.ndarray | None = None
    heatmap: np.ndarray | None = None


def _grid_side(cells: int) -> int | None:
    side = math.isqrt(cells)
    return side if side > 1 and side * side == cells else None


def cell_maps(query: Tensor, reps: Representatives, rep_index: int) -> tuple:
    """``(members, heatmap)`` of one image (``reps`` with batch size 1), or Nones.

    Cluster-CLIP stores ``extras["members"] [R, N]`` over an ``n x n`` grid: a cell's heat
    is its cluster's cosine. Dense-CLIP's representatives are the cells themselves (boxes
    equal to the grid's, raster order, maybe a whole-image one last): heat is their cosine.
    """
    emb, mask = reps.embeddings[0].float(), reps.mask[0]
    sims = (emb @ query.float()).masked_fill(~mask, float("nan"))
    members = (reps.extras or {}).get("members")
    if members is not None and (side := _grid_side(members.shape[-1])):
        member = members[0].bool() & mask.unsqueeze(1)
        cells = torch.full((member.shape[1],), float("nan"))
        for r in mask.nonzero()[:, 0].tolist():
            cells[member[r]] = sims[r]
        return member[rep_index].reshape(side, side).numpy(), cells.reshape(side, side).numpy()
    if reps.boxes is not None:
        for count in (emb.shape[0], emb.shape[0] - 1):
            side = _grid_side(count)
            if side and torch.allclose(
                reps.boxes[0, :count].float(), grid_cell_boxes((side, side)), atol=1e-4
            ):
                return None, sims[:count].reshape(side, side).numpy()
    return None, None


def _locate(store: ShardStore, image_ids: list[int]) -> dict[int, Representatives]:
    """The stored representatives of ``image_ids`` (reads only the shards holding them)."""
    wanted, found = set(image_ids), {}
    for path in store.shard_paths():
        with ShardReader(path) as shard:
            for row in np.flatnonzero(np.isin(shard.image_ids, list(wanted))).tolist():
                found[int(shard.image_ids[row])] = shard.rows(row, row + 1)
    return found


def image_paths(index: SearchIndex, image_ids: list[int]) -> dict[int, Path | None]:
    """Image files of the hits: from the run's collection table when it has one (an
    unlabelled run: read as stored, no rescan of the folder), else from the run's dataset
    (None each where the dataset cannot be opened)."""
    stored = collection_image_paths(index.run_dir, image_ids)
    if stored is not None:
        return stored
    try:
        from retrieval.factory import build_dataset

        cfg = index.config.copy()
        cfg.data.on_bad_image = "skip"  # a missing file shows as a placeholder tile
        dataset = build_dataset(cfg, transform=None)
    except (OSError, ValueError, KeyError, TypeError):
        return dict.fromkeys(image_ids)
    paths: dict[int, Path | None] = {}
    for i in image_ids:
        try:
            paths[i] = Path(dataset.image_path(i))
        except KeyError:
            paths[i] = None
    return paths


def explain(index: SearchIndex, query: Tensor, hits: list[Hit]) -> list[GalleryItem]:
    """Gallery items of ``hits`` for the query embedding ``[D]``: image files from the
    run's dataset, cluster members and cell heatmaps from the run's shards when there."""
    ids = [h.image_id for h in hits]
    paths = image_paths(index, ids)
    store = ShardStore(index.run_dir / "embeddings")
    reps = _locate(store, ids) if store.shard_paths() else {}
    items = []
    for rank, hit in enumerate(hits, start=1):
        members = heat = None
        if hit.image_id in reps:
            members, heat = cell_maps(query.cpu(), reps[hit.image_id], hit.rep_index)
        items.append(GalleryItem(rank, hit, paths.get(hit.image_id), members, heat))
    return items


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _load(path: Path | None, side: int) -> Image.Image:
    """The image fitted into ``side x side``, or a grey placeholder saying what is missing."""
    if path is not None:
        try:
            image = Image.open(image_source(path)).convert("RGB")
            scale = side / max(image.size)  # small images are enlarged too, to be read
            size = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
            return image.resize(size, Image.Resampling.LANCZOS)
        except (OSError, tarfile.TarError):
            pass
    image = Image.new("RGB", (side, side * 3 // 4), (90, 90, 90))
    ImageDraw.Draw(image).text((8, 8), "image not found", fill="white", font=_font(14))
    return image


def _cells_to_pixels(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``[h, w]`` cell array stretched over an image of ``size`` (nearest cell)."""
    w, h = size
    rows = np.minimum(np.arange(h) * cells.shape[0] // h, cells.shape[0] - 1)
    cols = np.minimum(np.arange(w) * cells.shape[1] // w, cells.shape[1] - 1)
    return cells[rows][:, cols]


def _draw_box(image: Image.Image, box: tuple[float, ...]) -> None:
    w, h = image.size
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w - 1, box[3] * h - 1
    draw = ImageDraw.Draw(image)
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=5)
    draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=3)


def match_panel(item: GalleryItem, side: int = PANEL) -> Image.Image:
    """The image with the matched region: cluster cells filled, its box outlined."""
    image = _load(item.path, side)
    if item.path is None or not item.path.exists():
        return image
    if item.members is not None:
        fill = _cells_to_pixels(item.members, image.size)
        overlay = Image.new("RGBA", image.size, MEMBER_COLOUR)
        alpha = Image.fromarray((fill * MEMBER_COLOUR[3]).astype(np.uint8), "L")
        image.paste(overlay, (0, 0), alpha)
    if item.hit.box is not None:
        _draw_box(image, item.hit.box)
    return image


def heat_panel(item: GalleryItem, side: int = PANEL) -> Image.Image | None:
    """The image in grey under the query's cosine per cell (inferno: low dark, high bright)."""
    if item.heatmap is None or item.path is None or not item.path.exists():
        return None
    image = _load(item.path, side)
    heat = item.heatmap
    finite = np.isfinite(heat)
    low, high = (heat[finite].min(), heat[finite].max()) if finite.any() else (0.0, 1.0)
    scaled = np.where(finite, (heat - low) / max(high - low, 1e-8), 0.0)
    colours = matplotlib.colormaps["inferno"](_cells_to_pixels(scaled, image.size))[..., :3]
    alpha = HEAT_ALPHA * _cells_to_pixels(finite, image.size)[..., None]
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None] / 255
    base = 0.35 + 0.5 * grey  # mid greys: the colour is the heat's, black objects included
    blended = (1 - alpha) * base + alpha * colours
    out = Image.fromarray((blended * 255).astype(np.uint8))
    if item.hit.box is not None:
        _draw_box(out, item.hit.box)
    return out


def panels(item: GalleryItem, side: int = PANEL) -> Image.Image:
    """Match panel and, when there is one, the heatmap panel, side by side."""
    parts = [p for p in (match_panel(item, side), heat_panel(item, side)) if p is not None]
    gap = 6
    width = sum(p.width for p in parts) + gap * (len(parts) - 1)
    out = Image.new("RGB", (width, max(p.height for p in parts)), "white")
    x = 0
    for p in parts:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def caption(item: GalleryItem) -> list[str]:
    hit = item.hit
    name = item.path.name if item.path else "?"
    return [
        f"#{item.rank}  score {hit.score:.4f}",
        f"image {hit.image_id}  rep {hit.rep_index}  {name}",
    ]


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
        figures.append(
            f'<figure><img src="{_data_uri(panels(item))}" '
            f'alt="rank {item.rank}, image {item.hit.image_id}">'
            f"<figcaption>{lines}{html.escape(box_text)}</figcaption></figure>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(query)}</title>
<style>body{{font-family:sans-serif;margin:16px}}figure{{display:inline-block;margin:8px;
vertical-align:top}}figcaption{{font-size:13px}}</style></head>
<body><h1>{html.escape(query)}</h1><p>{html.escape(info)}</p><p>{LEGEND}</p>
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
    draw.text((8, 6), f'"{query}"', fill="black", font=_font(22))
    info_lines.append(LEGEND)
    for j, line in enumerate(info_lines):
        draw.text((8, 34 + 17 * j), line, fill=(70, 70, 70), font=_font(13))
    for i, (tile, item) in enumerate(zip(tiles, items, strict=True)):
        x, y = (i % columns) * cell_w + 6, title_h + (i // columns) * cell_h
        sheet.paste(tile, (x, y))
        for j, line in enumerate(caption(item)):
            draw.text((x, y + tile.height + 4 + 18 * j), line, fill="black", font=_font(14))
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
