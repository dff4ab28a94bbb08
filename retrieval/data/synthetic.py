"""A generated COCO-format benchmark: coloured shapes on cluttered backgrounds.

Tests and pipeline checks need a dataset with real files, real annotations and every
COCO size bucket, made offline in milliseconds. Every object is drawn from exactly the
polygon that is written as its segmentation, so ``area`` and ``bbox`` are exact.

Usage::

    python -m retrieval.data.synthetic OUT_DIR [--num-images N] [--seed S]
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SMALL_AREA = 32**2
"""COCO's size buckets (pixels, absolute): small < 32², medium < 96² <= large."""
LARGE_AREA = 96**2


@dataclass(frozen=True)
class Shape:
    """A category: a closed outline, centred at 0, inside [-1, 1]², y pointing down."""

    name: str
    outline: np.ndarray

    @property
    def extent(self) -> tuple[float, float]:
        """Width and height of the outline's box."""
        span = self.outline.max(axis=0) - self.outline.min(axis=0)
        return float(span[0]), float(span[1])

    @property
    def area(self) -> float:
        return polygon_area(self.outline)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon ``[P, 2]`` (orientation ignored)."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _circle_points(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.4) -> np.ndarray:
    radii = np.tile([1.0, inner], points)
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _ring(inner: float = 0.55, n: int = 48) -> np.ndarray:
    # One "keyhole" polygon: the outer circle, a zero-width cut, the inner circle
    # backwards. COCO polygons have no holes; this one's shoelace area is the ring's.
    outer = _circle_points(n)
    inner_pts = _circle_points(n, inner)
    return np.concatenate([outer, outer[:1], inner_pts[:1], inner_pts[::-1]])


def _cross(arm: float = 1 / 3) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
         (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )  # fmt: skip


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("circle", _circle_points(48)),
        Shape("square", np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)),
        Shape("triangle", _circle_points(3, phase=-np.pi / 2)),
        Shape("star", _star()),
        Shape("ring", _ring()),
        Shape("cross", _cross()),
        Shape("hexagon", _circle_points(6)),
        Shape("diamond", _circle_points(4, phase=-np.pi / 2)),
    )
}
"""The shape vocabulary; add an entry to grow the benchmark."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
"""Object colours by name; each annotation records its colour under ``"colour"``."""


@dataclass(frozen=True)
class SyntheticOptions:
    """Everything that decides the generated dataset; equal options give equal bytes.

    Attributes:
        num_images: good images, ids 1..N.
        image_size: (width, height). COCO's absolute size buckets apply, so a large
            object (>= 96² px) needs room: 160x128 reaches it with circles, squares and
            hexagons, about 320x240 with every shape.
        seed: image i is drawn from ``default_rng([seed, i])``, so it does not depend
            on how many images are made.
        categories: shape names (keys of :data:`SHAPES`), category ids 1..K in order.
        colours: colour names (keys of :data:`COLOURS`).
        objects_per_image: inclusive range of the object count.
        min_area: smallest object area in pixels ("a few pixels" across).
        max_area_fraction: largest object area as a fraction of the image.
        size_mix: probabilities of small, medium and large for all but the first
            object; the first object is large in images 1, 4, 7..., medium in 2, 5,
            8..., small in 3, 6, 9..., so every bucket the image size allows occurs.
        bad_images: extra images (ids N+1..) whose files are truncated or not images,
            annotated like the rest, for testing the bad-file policies.
        jpeg_quality: JPEG quality of the written files.
    """

    num_images: int = 12
    image_size: tuple[int, int] = (160, 128)
    seed: int = 0
    categories: tuple[str, ...] = tuple(SHAPES)
    colours: tuple[str, ...] = tuple(COLOURS)
    objects_per_image: tuple[int, int] = (1, 5)
    min_area: float = 16.0
    max_area_fraction: float = 0.5
    size_mix: tuple[float, float, float] = (0.45, 0.4, 0.15)
    bad_images: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for key, given, known in (
            ("categories", self.categories, SHAPES),
            ("colours", self.colours, COLOURS),
        ):
            unknown = [name for name in given if name not in known]
            if unknown or not given:
                raise ValueError(f"{key} must be a non-empty subset of {list(known)}, got {given}")
        if self.num_images < 1 or self.bad_images < 0:
            raise ValueError("num_images must be >= 1 and bad_images >= 0")


@dataclass
class _Object:
    shape: Shape
    colour: str
    polygon: np.ndarray  # [P, 2] pixels
    area: float = field(init=False)

    def __post_init__(self) -> None:
        self.area = polygon_area(self.polygon)

    @property
    def box(self) -> tuple[float, float, float, float]:
        x0, y0 = self.polygon.min(axis=0)
        x1, y1 = self.polygon.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def _largest_area(shape: Shape, options: SyntheticOptions) -> float:
    """The largest area ``shape`` can have and still fit in the image, within the cap."""
    width, height = options.image_size
    w, h = shape.extent
    fit = min((width - 2) / w, (height - 2) / h)
    return min(fit**2 * shape.area, options.max_area_fraction * width * height)


def _plan_objects(rng: np.random.Generator, index: int, options: SyntheticOptions) -> list[_Object]:
    """Shapes, colours and sizes of one image's objects, not yet placed."""
    shapes = [SHAPES[name] for name in options.categories]
    bounds = ((options.min_area, SMALL_AREA), (SMALL_AREA, LARGE_AREA), (LARGE_AREA, math.inf))
    low, high = options.objects_per_image
    objects = []
    for k in range(int(rng.integers(low, high + 1))):
        bucket = 2 - (index - 1) % 3 if k == 0 else int(rng.choice(3, p=options.size_mix))
        candidates = [s for s in shapes if _largest_area(s, options) >= bounds[bucket][0]]
        shape = candidates[rng.integers(len(candidates))] if candidates else shapes[0]
        colour = options.colours[rng.integers(len(options.colours))]
        lo = min(bounds[bucket][0], _largest_area(shape, options))
        hi = min(bounds[bucket][1], _largest_area(shape, options))
        area = math.exp(rng.uniform(math.log(lo), math.log(hi))) if lo < hi else hi
        scale = math.sqrt(area / shape.area)
        objects.append(_Object(shape, colour, shape.outline * scale))
    return objects


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection area of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _place(rng: np.random.Generator, objects: list[_Object], size: tuple[int, int]) -> None:
    """Moves each object into the image where it overlaps earlier ones least (of a few tries).

    Largest first, so that where small objects must overlap they are drawn on top and
    stay visible.
    """
    placed: list[tuple[float, ...]] = []
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        room_x, room_y = size[0] - 1 - (x1 - x0), size[1] - 1 - (y1 - y0)
        best, best_overlap = np.zeros(2), math.inf
        for _ in range(20):
            shift = np.array([rng.uniform(0, room_x) - x0, rng.uniform(0, room_y) - y0])
            box = (x0 + shift[0], y0 + shift[1], x1 + shift[0], y1 + shift[1])
            overlap = sum(_overlap(box, other) for other in placed)
            if overlap < best_overlap:
                best, best_overlap = shift, overlap
            if overlap == 0:
                break
        obj.polygon = np.round(obj.polygon + best, 2)
        obj.area = polygon_area(obj.polygon)
        placed.append(obj.box)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A muted two-colour gradient under pixel noise and a few faint blobs: clutter."""
    width, height = size
    start, end = rng.uniform(70, 190, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    pixels = start + t[..., None] * (end - start)
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.25) * min(width, height)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
        pixels += blob[..., None] * rng.uniform(-30, 30, size=3)
    pixels += rng.normal(0, 12, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_image(index: int, options: SyntheticOptions) -> tuple[bytes, list[_Object]]:
    """JPEG bytes and objects of image ``index``; a function of the options and index only."""
    rng = np.random.default_rng([options.seed, index])
    objects = sorted(_plan_objects(rng, index, options), key=lambda o: -o.area)
    _place(rng, objects, options.image_size)
    image = Image.fromarray(_background(rng, options.image_size))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw.polygon([tuple(p) for p in obj.polygon.tolist()], fill=COLOURS[obj.colour])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return buffer.getvalue(), objects


def _break(data: bytes, index: int) -> bytes:
    """A truncated JPEG (even index) or bytes that are no image at all (odd)."""
    if index % 2 == 0:
        return data[: len(data) // 2]
    return b"this is not an image\n" * 8


def write_synthetic_coco(out_dir: str | Path, options: SyntheticOptions) -> tuple[Path, Path]:
    """Writes ``out_dir/images/*.jpg`` and ``out_dir/annotations.json``.

    Returns:
        (annotation file, images folder): the ``data.annotations`` and ``data.images``
        of a ``coco`` dataset config.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    category_id = {name: k + 1 for k, name in enumerate(options.categories)}
    width, height = options.image_size
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, options.num_images + options.bad_images + 1):
        data, objects = _draw_image(image_id, options)
        if image_id > options.num_images:
            data = _break(data, image_id)
        file_name = f"{image_id:012d}.jpg"
        (images_dir / file_name).write_bytes(data)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id[obj.shape.name],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(obj.area, 2),
                    "iscrowd": 0,
                    "segmentation": [obj.polygon.reshape(-1).tolist()],
                    "colour": obj.colour,
                }
            )
    dataset = {
        "info": {
            "description": "synthetic shapes (retrieval.data.synthetic)",
            "seed": options.seed,
        },
        "images": images,
        "categories": [
            {"id": category_id[name], "name": name, "supercategory": "shape"}
            for name in options.categories
        ],
        "annotations": annotations,
    }
    annotation_file = out_dir / "annotations.json"
    annotation_file.write_text(json.dumps(dataset))
    return annotation_file, images_dir


def make_synthetic_coco(
    out_dir: str | Path,
    num_images: int = 12,
    image_size: tuple[int, int] = (160, 128),
    seed: int = 0,
    categories: Sequence[str] | None = None,
    bad_images: int = 0,
) -> tuple[Path, Path]:
    """A small deterministic COCO-format dataset (same seed, same bytes).

    Args:
        out_dir: where ``images/`` and ``annotations.json`` go.
        num_images: good images, ids 1..N.
        image_size: (width, height); see :class:`SyntheticOptions` for which sizes
            reach COCO's large bucket.
        seed: the random seed.
        categories: shape names (default: all of :data:`SHAPES`).
        bad_images: extra broken files (ids N+1..): truncated JPEGs and non-images.

    Returns:
        (annotation file, images folder).
    """
    options = SyntheticOptions(
        num_images=num_images,
        image_size=tuple(image_size),
        seed=seed,
        categories=tuple(categories) if categories is not None else tuple(SHAPES),
        bad_images=bad_images,
    )
    return write_synthetic_coco(out_dir, options)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m retrieval.data.synthetic OUT_DIR [--num-images N] [--seed S] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--bad-images", type=int, default=0)
    args = parser.parse_args(argv)
    annotations, images = make_synthetic_coco(
        args.out_dir,
        args.num_images,
        (args.width, args.height),
        args.seed,
        bad_images=args.bad_images,
    )
    print(f"wrote {args.num_images + args.bad_images} images to {images}")
    print(f"wrote annotations to {annotations}")
    print(f"use: data.name=coco data.annotations={annotations} data.images={images}")


if __name__ == "__main__":
    main()
