"""Drawing one image for a hit: its matched region and the query's heatmap over its cells.

Shared by the report gallery (:mod:`retrieval.report.gallery`: HTML page and PNG sheet)
and the search service (:mod:`retrieval.serve.images`: ``/api/images/...``), so both
draw the same pictures. The matched region is the box of the representative that gave
the image its score (and, when the run stored Cluster-CLIP's ``members``, that cluster's
cells filled in). The heatmap is the query's cosine with each Dense-CLIP cell, drawn as
segmentation tools draw similarity maps: bicubically interpolated between cell centres, a
translucent colour layer over the photo (transparent where the cosine is low), and a
colour bar stating its range. Pictures are opened by :func:`load_image` inside the run's
image roots; one that cannot be shown becomes a placeholder saying why.
"""

from __future__ import annotations

import math
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
from retrieval.data.images import OUTSIDE_ROOT, BadImageError, load_image
from retrieval.index import Hit
from retrieval.representatives import Representatives

PANEL = 240  # side of one picture panel, pixels
BOX_COLOUR = (255, 214, 0)
MEMBER_COLOUR = (0, 200, 255, 90)
HEAT_MAP = "turbo"  # blue low .. red high, as segmentation tools draw similarity maps
HEAT_ALPHA = 0.6  # opacity at the image's highest cosine; lower values fade out
BAR_H = 14  # the colour bar under a heat panel


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


def text_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def load_fitted(path: Path | None, side: int, roots: tuple[Path, ...] | None = None) -> Image.Image:
    """The image (:func:`load_image`, inside ``roots``) fitted into ``side x side``, or a
    grey placeholder saying why it is not shown."""
    return fitted_picture(path, side, roots)[0]


def fitted_picture(
    path: Path | None, side: int, roots: tuple[Path, ...] | None
) -> tuple[Image.Image, bool]:
    """:func:`load_fitted`'s picture and whether it is the image (not the placeholder)."""
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
    ImageDraw.Draw(image).text((8, 8), why, fill="white", font=text_font(14))
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


def draw_box(image: Image.Image, box: tuple[float, ...]) -> None:
    w, h = image.size
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w - 1, box[3] * h - 1
    draw = ImageDraw.Draw(image)
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=5)
    draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=3)


def match_panel(item: GalleryItem, side: int = PANEL) -> Image.Image:
    """The image with the matched region: cluster cells filled, its box outlined."""
    image, shown = fitted_picture(item.path, side, item.roots)
    if not shown:
        return image
    if item.members is not None:
        fill = _cells_to_pixels(item.members, image.size)
        overlay = Image.new("RGBA", image.size, MEMBER_COLOUR)
        alpha = Image.fromarray((fill * MEMBER_COLOUR[3]).astype(np.uint8), "L")
        image.paste(overlay, (0, 0), alpha)
    if item.hit.box is not None:
        draw_box(image, item.hit.box)
    return image


def heat_panel(item: GalleryItem, side: int = PANEL, bar: str = "below") -> Image.Image | None:
    """The photo under a translucent, smoothly interpolated map of the query's cosine per
    cell (:data:`HEAT_MAP`, scaled to the image's own range, opacity growing with the
    cosine up to :data:`HEAT_ALPHA`), the matched box, and a colour bar stating the
    range: ``below`` the picture, or ``inside`` along its bottom edge (the photo's size
    kept, for a page that draws boxes over it)."""
    if item.heatmap is None:
        return None
    photo, shown = fitted_picture(item.path, side, item.roots)
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
        draw_box(out, item.hit.box)
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
    font = text_font(10)
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
