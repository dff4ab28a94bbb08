"""Explaining search hits: each image with its matched region, score and rank.

A hit is drawn with the box of the representative that gave the image its score (and, when
the run stored Cluster-CLIP's ``members``, that cluster's cells filled in) and, for every
Dense-/Cluster-CLIP index, a heatmap of the query's cosine with each of the image's
Dense-CLIP cells beside it: Dense-CLIP's stored cells are read from the run, Cluster-CLIP's
(which keeps cluster means, not cells) are computed from the picture by one backbone pass
of the index's own retriever. The heatmap is drawn as segmentation tools draw similarity
maps: bicubically interpolated between cell centres, a translucent colour layer over the
photo (transparent where the cosine is low), and a colour bar stating its range. The
HTML gallery embeds every picture (one portable file); the PNG contact sheet puts the
same panels on one image with a caption under each.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from retrieval.aggregate import grid_cell_boxes
from retrieval.data.collection import ROOT_KEY, collection_image_paths, collection_path
from retrieval.data.images import OUTSIDE_ROOT, BadImageError, load_image
from retrieval.errors import ConfigError
from retrieval.index import Hit, SearchIndex
from retrieval.representatives import Representatives
from retrieval.store.shards import ShardReader, ShardStore

PANEL = 240  # side of one picture panel, pixels
BOX_COLOUR = (255, 214, 0)
MEMBER_COLOUR = (0, 200, 255, 90)
HEAT_MAP = "turbo"  # blue low .. red high, as segmentation tools draw similarity maps
HEAT_ALPHA = 0.6  # opacity at the image's highest cosine; lower values fade out
BAR_H = 14  # the colour bar under a heat panel
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


@dataclass
class GalleryItem:
    """One hit with what is needed to draw it.

    Attributes:
        rank: 1-based position in the results.
        hit: the hit (image id, score, representative index, box).
        path: the image file, or None when it cannot be found.
        members: ``[h, w]`` bool cells of the matched representative's cluster, or None.
        heatmap: ``[h, w]`` query cosine per cell (nan where no representative), or None.
        roots: the run's image roots (the embed phase's check, again at drawing time),
            or None where its dataset allows any path.
    """

    rank: int
    hit: Hit
    path: Path | None
    members: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    roots: tuple[Path, ...] | None = None  # the folders the picture must resolve inside


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


def stored_cells(reps: Representatives) -> Tensor | None:
    """``[h, w, D]`` Dense-CLIP cells of one image (``reps`` with batch size 1) when its
    stored representatives are the grid's cells (raster order, maybe a whole-image one
    last), else None (Cluster-CLIP's cluster means, CLIP's one vector)."""
    if reps.boxes is None:
        return None
    emb = reps.embeddings[0].float()
    for count in (emb.shape[0], emb.shape[0] - 1):
        side = _grid_side(count)
        if side and torch.allclose(
            reps.boxes[0, :count].float(), grid_cell_boxes((side, side)), atol=1e-4
        ):
            return emb[:count].reshape(side, side, -1)
    return None


def draws_cells(retriever: Any) -> bool:
    """Whether the retriever computes Dense-CLIP cells (Dense-/Cluster-CLIP do)."""
    return callable(getattr(retriever, "encode_dense", None))


@torch.no_grad()
def dense_cells(retriever: Any, images: list[Image.Image]) -> list[Tensor]:
    """``[h, w, D]`` Dense-CLIP cells of each picture, by one backbone pass of
    ``retriever`` over the batch (its own transform: the cells the run's retriever sees)."""
    pixels = torch.stack([retriever.image_transform(image) for image in images])
    out = retriever.encode_dense(pixels.to(retriever.device))
    h, w = out.grid
    return [cells.float().cpu().reshape(h, w, -1) for cells in out.embeddings]


def cell_heat(cells: Tensor, query: Tensor) -> np.ndarray:
    """``[h, w]`` cosine of the (unit) query with each (unit) cell."""
    return (cells.float() @ query.float().cpu()).numpy()


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
    return run_images(index, image_ids)[0]


def run_images(
    index: SearchIndex, image_ids: list[int]
) -> tuple[dict[int, Path | None], tuple[Path, ...] | None]:
    """:func:`image_paths` and the folders those files must resolve inside: the roots
    the run's dataset checks at embed time (``image_roots``), so a file swapped for a
    symlink out of them after indexing is refused when shown too. None where the
    dataset reads any path (a ``folder`` follows the user's own symlinks; a ``list``
    without ``data.images`` names files anywhere)."""
    data = index.config.data
    stored = collection_image_paths(index.run_dir, image_ids)
    if stored is not None:
        import pyarrow.parquet as pq

        raw = (pq.read_schema(collection_path(index.run_dir)).metadata or {}).get(ROOT_KEY)
        name = data.get("name")
        free = name == "folder" or (name == "list" and not data.get("images"))
        return stored, None if free or not raw else (Path(raw.decode()),)
    try:
        from retrieval.factory import build_dataset

        cfg = index.config.copy()
        cfg.data.on_bad_image = "skip"  # a missing file shows as a placeholder tile
        dataset = build_dataset(cfg, transform=None)
    except (OSError, ValueError, KeyError, TypeError):
        return dict.fromkeys(image_ids), None
    paths: dict[int, Path | None] = {}
    for i in image_ids:
        try:
            paths[i] = Path(dataset.image_path(i))
        except KeyError:
            paths[i] = None
    roots = getattr(dataset, "image_roots", None)
    return paths, None if roots is None else tuple(Path(r) for r in roots)


def explain(index: SearchIndex, query: Tensor, hits: list[Hit]) -> list[GalleryItem]:
    """Gallery items of ``hits`` for the query embedding ``[D]``: image files from the
    run's dataset, cluster members from the run's shards when stored, and the heatmap of
    every Dense-/Cluster-CLIP hit (stored cells, else one backbone pass per batch of
    pictures; module docstring)."""
    ids = [h.image_id for h in hits]
    paths, roots = run_images(index, ids)
    store = ShardStore(index.run_dir / "embeddings")
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


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _load(path: Path | None, side: int, roots: tuple[Path, ...] | None = None) -> Image.Image:
    """The image (:func:`load_image`, inside ``roots``) fitted into ``side x side``, or a
    grey placeholder saying why it is not shown."""
    return _picture(path, side, roots)[0]


def _picture(
    path: Path | None, side: int, roots: tuple[Path, ...] | None
) -> tuple[Image.Image, bool]:
    """:func:`_load`'s picture and whether it is the image (not the placeholder)."""
    why = "image not found"
    if path is not None:
        try:
            image = load_image(path, roots)
            scale = side / max(image.size)  # small images are enlarged too, to be read
            size = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
            return image.resize(size, Image.Resampling.LANCZOS), True
        except BadImageError as err:
            if OUTSIDE_ROOT in err.reason:
                why = "outside the image root"
            elif "not found" not in err.reason:
                why = "unreadable image"
    image = Image.new("RGB", (side, side * 3 // 4), (90, 90, 90))
    ImageDraw.Draw(image).text((8, 8), why, fill="white", font=_font(14))
    return image, False


def _cells_to_pixels(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``[h, w]`` cell array stretched over an image of ``size`` (nearest cell)."""
    w, h = size
    rows = np.minimum(np.arange(h) * cells.shape[0] // h, cells.shape[0] - 1)
    cols = np.minimum(np.arange(w) * cells.shape[1] // w, cells.shape[1] - 1)
    return cells[rows][:, cols]


def _smooth(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``[h, w]`` cell array interpolated bicubically over an image of ``size`` (each
    value at its cell's centre, clamped to the cells' own range: no overshoot)."""
    w, h = size
    grid = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))[None, None]
    up = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    return up.clamp(float(cells.min()), float(cells.max())).numpy()


def _draw_box(image: Image.Image, box: tuple[float, ...]) -> None:
    w, h = image.size
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w - 1, box[3] * h - 1
    draw = ImageDraw.Draw(image)
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=5)
    draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=3)


def match_panel(item: GalleryItem, side: int = PANEL) -> Image.Image:
    """The image with the matched region: cluster cells filled, its box outlined."""
    image, shown = _picture(item.path, side, item.roots)
    if not shown:
        return image
    if item.members is not None:
        fill = _cells_to_pixels(item.members, image.size)
        overlay = Image.new("RGBA", image.size, MEMBER_COLOUR)
        alpha = Image.fromarray((fill * MEMBER_COLOUR[3]).astype(np.uint8), "L")
        image.paste(overlay, (0, 0), alpha)
    if item.hit.box is not None:
        _draw_box(image, item.hit.box)
    return image


def heat_panel(item: GalleryItem, side: int = PANEL, bar: str = "below") -> Image.Image | None:
    """The photo under a translucent, smoothly interpolated map of the query's cosine per
    cell (:data:`HEAT_MAP`, scaled to the image's own range, opacity growing with the
    cosine up to :data:`HEAT_ALPHA`), the matched box, and a colour bar stating the
    range: ``below`` the picture, or ``inside`` along its bottom edge (the photo's size
    kept, for a page that draws boxes over it)."""
    if item.heatmap is None:
        return None
    photo, shown = _picture(item.path, side, item.roots)
    if not shown:
        return None
    heat = np.asarray(item.heatmap, dtype=np.float64)
    finite = np.isfinite(heat)
    low, high = (float(heat[finite].min()), float(heat[finite].max())) if finite.any() else (0, 1)
    scaled = np.where(finite, (heat - low) / max(high - low, 1e-8), 0.0)
    smooth = _smooth(scaled, photo.size)
    colours = matplotlib.colormaps[HEAT_MAP](smooth)[..., :3]
    alpha = HEAT_ALPHA * (0.25 + 0.75 * smooth)[..., None]
    alpha *= _cells_to_pixels(finite, photo.size)[..., None]
    base = np.asarray(photo, dtype=np.float64) / 255
    blended = (1 - alpha) * base + alpha * colours
    out = Image.fromarray(np.clip(blended * 255, 0, 255).astype(np.uint8))
    if item.hit.box is not None:
        _draw_box(out, item.hit.box)
    if bar == "inside":
        out.paste(colour_bar(out.width, low, high), (0, max(out.height - BAR_H, 0)))
        return out
    framed = Image.new("RGB", (out.width, out.height + BAR_H), "white")
    framed.paste(out, (0, 0))
    framed.paste(colour_bar(out.width, low, high), (0, out.height))
    return framed


def colour_bar(width: int, low: float, high: float) -> Image.Image:
    """A :data:`BAR_H`-high strip of the heat colours with the cosine at each end."""
    ramp = matplotlib.colormaps[HEAT_MAP](np.linspace(0, 1, width))[None, :, :3]
    strip = Image.fromarray((np.repeat(ramp, BAR_H, axis=0) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(strip)
    font = _font(10)
    draw.text(
        (2, 1), f"cos {low:.3f}", fill="white", font=font, stroke_width=1, stroke_fill="black"
    )
    right = f"{high:.3f}"
    draw.text(
        (width - 2 - draw.textlength(right, font=font), 1),
        right,
        fill="white",
        font=font,
        stroke_width=1,
        stroke_fill="black",
    )
    return strip


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
    draw.text((8, 6), f'"{query}"', fill="black", font=_font(22))
    info_lines.extend(textwrap.wrap(legend(items), width=max(width // 7, 40)))
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
