"""A generated COCO-format benchmark: coloured shapes on cluttered backgrounds.

Tests and pipeline checks need a dataset with real files, real annotations and every
COCO size bucket, made offline in milliseconds. Every object is drawn from exactly the
polygon that is written as its segmentation, so ``area`` and ``bbox`` are exact.

Two category modes:

- ``shape`` (default): a category is a shape ("circle"); colour is an attribute.
- ``colour_shape``: a category is a colour-shape pair ("red circle"), the scenes
  benchmark's queries. Some pairs can be held out (:data:`HELD_OUT_PAIRS`): a training
  set never draws them (``draw_held_out=False``), an evaluation set draws them and
  marks their categories ``"held_out": true``, so retrieving them needs a model that
  composes a colour and a shape it only ever saw apart: open vocabulary.

Every image carries a caption naming its objects (``images[i]["captions"]``), e.g.
"a photo of a large red circle, a small blue star and a green square.".

Usage::

    python -m retrieval.data.synthetic OUT_DIR [--num-images N] [--seed S]
    python -m retrieval.data.synthetic data/scenes --preset scenes   # the benchmark set
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from retrieval.errors import ConfigError, RetrievalError, differences

log = logging.getLogger("retrieval")

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

CATEGORY_MODES = ("shape", "colour_shape")
SIZE_MODES = ("buckets", "log_uniform")

HELD_OUT_PAIRS: tuple[str, ...] = (
    "blue circle",
    "yellow square",
    "orange triangle",
    "purple star",
    "white ring",
    "black cross",
    "red hexagon",
    "green diamond",
)
"""The scenes benchmark's held-out pairs: one per shape and one per colour (a shifted
diagonal of colours x shapes), so every colour and every shape is still seen in training
with seven partners, never with this one."""

SMALL_CAPTION_FRACTION = 0.015
"""An object under this fraction of the image area is "small" in a caption (at 256x256
that is about COCO's 32², at 64x64 about 8²)."""
LARGE_CAPTION_FRACTION = 0.14
"""An object at or over this fraction of the image area is "large" in a caption (at
256x256 about COCO's 96²)."""


def pair_name(colour: str, shape: str) -> str:
    """The category name of a colour-shape pair: ``"red circle"``."""
    return f"{colour} {shape}"


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
        category_mode: ``shape`` (categories are shapes) or ``colour_shape``
            (categories are the pairs of ``colours`` x ``categories``, named
            ``"red circle"``, ids 1..K colour-major).
        held_out: pair names (``colour_shape`` mode) marked ``"held_out": true`` in the
            categories; see :data:`HELD_OUT_PAIRS`.
        draw_held_out: False for a training set: held-out pairs are never drawn (their
            categories are still listed, with no annotation).
        size_mode: ``buckets`` (COCO's small / medium / large mix, see ``size_mix``) or
            ``log_uniform`` (area log-uniform between ``min_area`` and the cap, for
            images too small for COCO's absolute buckets, e.g. 64x64 training scenes).
        clutter: distractor strokes per image (thin lines, outlines, scribbles in muted,
            desaturated colours of the background: no vocabulary shape or colour).
        caption_size_words: name objects "small" / "large" in the captions (relative to
            the image: :data:`SMALL_CAPTION_FRACTION`, :data:`LARGE_CAPTION_FRACTION`).
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
    category_mode: str = "shape"
    held_out: tuple[str, ...] = ()
    draw_held_out: bool = True
    size_mode: str = "buckets"
    clutter: int = 0
    caption_size_words: bool = True

    def __post_init__(self) -> None:
        for key, given, known in (
            ("categories", self.categories, SHAPES),
            ("colours", self.colours, COLOURS),
        ):
            unknown = [name for name in given if name not in known]
            if unknown or not given:
                raise ConfigError(f"{key} must be a non-empty subset of {list(known)}, got {given}")
        if self.num_images < 1 or self.bad_images < 0:
            raise ConfigError("num_images must be >= 1 and bad_images >= 0")
        for key, value, modes in (
            ("category_mode", self.category_mode, CATEGORY_MODES),
            ("size_mode", self.size_mode, SIZE_MODES),
        ):
            if value not in modes:
                raise ConfigError(f"{key} must be one of {', '.join(modes)}, got {value!r}")
        low, high = self.objects_per_image
        if not 0 <= low <= high:
            raise ConfigError(
                f"objects_per_image must be (low, high), 0 <= low <= high: {low, high}"
            )
        if self.clutter < 0:
            raise ConfigError(f"clutter must be >= 0, got {self.clutter}")
        if self.held_out and self.category_mode != "colour_shape":
            raise ConfigError("held_out pairs need category_mode='colour_shape'")
        names = {pair_name(c, s) for c, s in self.pairs}
        unknown = [name for name in self.held_out if name not in names]
        if unknown:
            raise ConfigError(
                f"held_out pairs {unknown} are not colour-shape pairs of these colours and "
                f"categories (e.g. {sorted(names)[0]!r})"
            )
        if not self.drawable_pairs:
            raise ConfigError("draw_held_out=False holds out every pair: nothing left to draw")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every (colour, shape) pair, colour-major: the ``colour_shape`` categories' order."""
        return [(c, s) for c in self.colours for s in self.categories]

    @property
    def drawable_pairs(self) -> list[tuple[str, str]]:
        """The pairs an object may be drawn as (held-out ones left out unless drawn)."""
        held = set(self.held_out)
        return [(c, s) for c, s in self.pairs if self.draw_held_out or pair_name(c, s) not in held]

    @property
    def category_names(self) -> list[str]:
        """Category names in id order (ids 1..K)."""
        if self.category_mode == "shape":
            return list(self.categories)
        return [pair_name(c, s) for c, s in self.pairs]

    def category_of(self, colour: str, shape: str) -> str:
        """The category name an object of this colour and shape belongs to."""
        return shape if self.category_mode == "shape" else pair_name(colour, shape)


@dataclass
class SceneObject:
    """One drawn object: its shape, colour name and polygon in pixels."""

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


_Object = SceneObject  # the name before the scenes benchmark


def _largest_area(shape: Shape, options: SyntheticOptions) -> float:
    """The largest area ``shape`` can have and still fit in the image, within the cap."""
    width, height = options.image_size
    w, h = shape.extent
    fit = min((width - 2) / w, (height - 2) / h)
    return min(fit**2 * shape.area, options.max_area_fraction * width * height)


def _plan_objects(
    rng: np.random.Generator, index: int, options: SyntheticOptions
) -> list[SceneObject]:
    """Shapes, colours and sizes of one image's objects, not yet placed."""
    shapes = [SHAPES[name] for name in options.categories]
    pairs = [(c, SHAPES[s]) for c, s in options.drawable_pairs]
    by_pair = options.category_mode == "colour_shape"
    bounds = ((options.min_area, SMALL_AREA), (SMALL_AREA, LARGE_AREA), (LARGE_AREA, math.inf))
    low, high = options.objects_per_image
    objects = []
    for k in range(int(rng.integers(low, high + 1))):
        if options.size_mode == "log_uniform":
            colour, shape = pairs[rng.integers(len(pairs))]
            lo, hi = options.min_area, _largest_area(shape, options)
        else:
            bucket = 2 - (index - 1) % 3 if k == 0 else int(rng.choice(3, p=options.size_mix))
            if by_pair:
                fits = [p for p in pairs if _largest_area(p[1], options) >= bounds[bucket][0]]
                colour, shape = fits[rng.integers(len(fits))] if fits else pairs[0]
            else:
                candidates = [s for s in shapes if _largest_area(s, options) >= bounds[bucket][0]]
                shape = candidates[rng.integers(len(candidates))] if candidates else shapes[0]
                colour = options.colours[rng.integers(len(options.colours))]
            lo = min(bounds[bucket][0], _largest_area(shape, options))
            hi = min(bounds[bucket][1], _largest_area(shape, options))
        area = math.exp(rng.uniform(math.log(lo), math.log(hi))) if lo < hi else hi
        scale = math.sqrt(area / shape.area)
        objects.append(SceneObject(shape, colour, shape.outline * scale))
    return objects


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection area of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _place(rng: np.random.Generator, objects: list[SceneObject], size: tuple[int, int]) -> None:
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


def _muted(rng: np.random.Generator, base: np.ndarray) -> tuple[int, int, int]:
    """A clutter colour: near the background, two thirds desaturated, never white or black."""
    tint = np.clip(base + rng.normal(0, 45, size=3), 0, 255)
    grey = float(np.clip(tint.mean(), 60, 200))
    red, green, blue = (int(round(grey + 0.35 * (t - grey))) for t in tint)
    return red, green, blue


def _clutter(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Draws ``count`` distractors: lines, outlines and scribbles in muted colours.

    None is filled and none is a vocabulary colour, so no distractor is an object; they
    only make the background harder to tell from small objects.
    """
    width, height = image.size
    side = min(width, height)
    base = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        kind = int(rng.integers(3))
        colour = _muted(rng, base)
        line = max(1, int(round(rng.uniform(0.5, 1.5) * side / 128)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if kind == 0:  # a straight stroke
            length, angle = rng.uniform(0.1, 0.5) * side, rng.uniform(0, np.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=line)
        elif kind == 1:  # an ellipse outline
            rx, ry = rng.uniform(0.02, 0.12, size=2) * side
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], outline=colour, width=line)
        else:  # a scribble
            steps = rng.normal(0, 0.08 * side, size=(int(rng.integers(3, 7)), 2))
            points = np.array([x, y]) + np.cumsum(steps, axis=0)
            draw.line([tuple(p) for p in points.tolist()], fill=colour, width=line)


def render_scene(index: int, options: SyntheticOptions) -> tuple[Image.Image, list[SceneObject]]:
    """Image ``index`` before JPEG encoding, and its objects (largest first).

    A function of the options and index only: the training script renders scenes in
    memory with it, :func:`write_synthetic_coco` writes the same scenes as JPEG files.
    """
    rng = np.random.default_rng([options.seed, index])
    objects = sorted(_plan_objects(rng, index, options), key=lambda o: -o.area)
    _place(rng, objects, options.image_size)
    image = Image.fromarray(_background(rng, options.image_size))
    if options.clutter:
        _clutter(rng, image, options.clutter)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw.polygon([tuple(p) for p in obj.polygon.tolist()], fill=COLOURS[obj.colour])
    return image, objects


def _draw_image(index: int, options: SyntheticOptions) -> tuple[bytes, list[SceneObject]]:
    """JPEG bytes and objects of image ``index``; a function of the options and index only."""
    image, objects = render_scene(index, options)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return buffer.getvalue(), objects


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def object_phrase(colour: str, shape: str, size: str | None = None) -> str:
    """``"a small red circle"``, ``"an orange star"`` (size: ``small``, ``large`` or None)."""
    words = " ".join(w for w in (size, colour, shape) if w)
    return f"{_article(words)} {words}"


def size_word(area: float, image_area: float) -> str | None:
    """``small`` / ``large`` / None: an object's size relative to its image, for captions."""
    if area < SMALL_CAPTION_FRACTION * image_area:
        return "small"
    if area >= LARGE_CAPTION_FRACTION * image_area:
        return "large"
    return None


def caption(phrases: Sequence[str], template: str = "a photo of {}.") -> str:
    """Joins object phrases into one caption: ``"a photo of a red circle, a blue star and
    a green square."``."""
    if not phrases:
        return template.format("nothing")
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return template.format(listed)


def scene_caption(objects: Sequence[SceneObject], options: SyntheticOptions) -> str:
    """The caption written for an image: every object, largest first, sizes named when
    ``caption_size_words``."""
    width, height = options.image_size
    phrases = [
        object_phrase(
            o.colour,
            o.shape.name,
            size_word(o.area, width * height) if options.caption_size_words else None,
        )
        for o in objects
    ]
    return caption(phrases)


def _break(data: bytes, index: int) -> bytes:
    """A truncated JPEG (even index) or bytes that are no image at all (odd)."""
    if index % 2 == 0:
        return data[: len(data) // 2]
    return b"this is not an image\n" * 8


def _category_records(options: SyntheticOptions) -> list[dict[str, Any]]:
    if options.category_mode == "shape":
        return [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(options.categories)
        ]
    held = set(options.held_out)
    return [
        {
            "id": k + 1,
            "name": pair_name(colour, shape),
            "supercategory": shape,
            "colour": colour,
            "shape": shape,
            "held_out": pair_name(colour, shape) in held,
        }
        for k, (colour, shape) in enumerate(options.pairs)
    ]


def write_synthetic_coco(out_dir: str | Path, options: SyntheticOptions) -> tuple[Path, Path]:
    """Writes ``out_dir/images/*.jpg`` and ``out_dir/annotations.json``.

    Each image record carries ``captions`` (one caption naming its objects); in
    ``colour_shape`` mode each category carries ``colour``, ``shape`` and ``held_out``.

    Only into a new or empty folder, or one it generated before (:data:`MARKER`), whose
    listed files it replaces; anything else is refused untouched.

    Returns:
        (annotation file, images folder): the ``data.annotations`` and ``data.images``
        of a ``coco`` dataset config.

    Raises:
        ConfigError: ``out_dir`` holds files the generator did not write.
    """
    out_dir = Path(out_dir)
    previous = generation_state(out_dir, options).marker
    for name in previous.get("files", []) if previous else []:
        (out_dir / name).unlink(missing_ok=True)  # only what it wrote: the user's files stay
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(out_dir, options, None)  # first: a killed generation stays its own
    category_id = {name: k + 1 for k, name in enumerate(options.category_names)}
    width, height = options.image_size
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, options.num_images + options.bad_images + 1):
        data, objects = _draw_image(image_id, options)
        if image_id > options.num_images:
            data = _break(data, image_id)
        file_name = f"{image_id:012d}.jpg"
        (images_dir / file_name).write_bytes(data)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "captions": [scene_caption(objects, options)],
            }
        )
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            record = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id[options.category_of(obj.colour, obj.shape.name)],
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(obj.area, 2),
                "iscrowd": 0,
                "segmentation": [obj.polygon.reshape(-1).tolist()],
                "colour": obj.colour,
            }
            if options.category_mode == "colour_shape":
                record["shape"] = obj.shape.name
            annotations.append(record)
    info: dict[str, Any] = {
        "description": "synthetic shapes (retrieval.data.synthetic)",
        "seed": options.seed,
    }
    if options.category_mode != "shape" or options.clutter or options.size_mode != "buckets":
        info["options"] = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(options).items()
        }
    dataset = {
        "info": info,
        "images": images,
        "categories": _category_records(options),
        "annotations": annotations,
    }
    annotation_file = out_dir / "annotations.json"
    annotation_file.write_text(json.dumps(dataset))
    files = [annotation_file.name] + [f"images/{image['file_name']}" for image in images]
    _write_marker(out_dir, options, files)
    return annotation_file, images_dir


MARKER = ".retrieval-generated.json"
"""The file that marks a folder as this generator's own: the options it was generated
with and every file it wrote. The generator writes only into a new or empty folder or one
holding this marker, and on regenerating removes only the files the marker lists."""


@dataclass(frozen=True)
class GenerationState:
    """What generating ``options`` into a folder would do (:func:`generation_state`)."""

    folder: Path
    action: str  # "ready" (already there, same options) | "new" | "regenerate"
    changes: tuple[str, ...] = ()  # for "regenerate": the options that differ
    marker: dict[str, Any] | None = None  # the folder's marker, when it has one

    def describe(self) -> str:
        """One line for a dry run or a log."""
        if self.action == "ready":
            return f"{self.folder}: already generated with these options; nothing to write"
        what = f"annotations.json and images/ ({self.folder})"
        if self.action == "new":
            return f"would write {what}"
        return f"would regenerate {what}, made with other options: " + "; ".join(self.changes)


def _options_json(options: SyntheticOptions) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(options)))


def _read_marker(folder: Path) -> dict[str, Any] | None:
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "options" in marker else None


def _write_marker(folder: Path, options: SyntheticOptions, files: list[str] | None) -> None:
    marker = {
        "generator": "retrieval.data.synthetic",
        "options": _options_json(options),
        "complete": files is not None,
        "files": files or [],
    }
    (folder / MARKER).write_text(json.dumps(marker))


def generation_state(folder: str | Path, options: SyntheticOptions) -> GenerationState:
    """What generating ``options`` into ``folder`` would do, checked before anything is
    written: a missing or empty folder is new; a folder holding :data:`MARKER` is the
    generator's own (ready when complete with the same options, else regenerated); one
    whose ``annotations.json`` records exactly these options (generated before folders
    were marked) is ready. Anything else is the user's.

    Raises:
        ConfigError: ``folder`` is a file, or holds files the generator did not write
            (named, with the fix); nothing is changed.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError(f"{folder} is not a folder: the generator writes into a folder")
    if not folder.exists() or not any(folder.iterdir()):
        return GenerationState(folder, "new")
    marker = _read_marker(folder)
    wanted = _options_json(options)
    if marker is not None:
        if marker.get("complete") and marker["options"] == wanted:
            return GenerationState(folder, "ready", marker=marker)
        changes = differences(marker["options"], wanted) if marker.get("complete") else []
        return GenerationState(
            folder, "regenerate", tuple(changes or ["an earlier generation did not finish"]),
            marker,
        )  # fmt: skip
    annotations = folder / "annotations.json"
    try:
        info = json.loads(annotations.read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):
        info = {}
    if isinstance(info, dict) and info.get("options") == wanted:
        return GenerationState(folder, "ready")
    shown = ", ".join(sorted(p.name for p in folder.iterdir())[:5])
    raise ConfigError(
        f"{folder} holds files the generator did not write ({shown}, ...): it writes only "
        f"into a new or empty folder, or one it generated itself (marked by {MARKER}). "
        f"Nothing was changed; point the generated set at another folder (for a sweep: "
        f"data.root=DIR, or data.annotations=DIR/annotations.json data.images=DIR/images)"
    )


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
    width, height = image_size  # a list (from a config) becomes a tuple
    options = SyntheticOptions(
        num_images=num_images,
        image_size=(width, height),
        seed=seed,
        categories=tuple(categories) if categories is not None else tuple(SHAPES),
        bad_images=bad_images,
    )
    return write_synthetic_coco(out_dir, options)


def scenes_options(
    split: str = "eval", num_images: int | None = None, seed: int | None = None, **changes: Any
) -> SyntheticOptions:
    """The scenes benchmark's generator settings (:data:`SCENES_PRESETS`), with changes.

    Args:
        split: ``eval`` (the held-out evaluation scenes) or ``train`` (what
            ``tools/train_scenes_clip.py`` renders: small images, held-out pairs never
            drawn).
        num_images, seed: override the preset's.
        changes: any other :class:`SyntheticOptions` field.
    """
    if split not in SCENES_PRESETS:
        raise ConfigError(f"split must be one of {', '.join(SCENES_PRESETS)}, got {split!r}")
    options = SCENES_PRESETS[split]
    if num_images is not None:
        changes["num_images"] = num_images
    if seed is not None:
        changes["seed"] = seed
    return dataclasses.replace(options, **changes)


def ensure_synthetic(data_dir: str | Path, options: SyntheticOptions) -> tuple[Path, Path]:
    """``annotations.json`` and ``images/`` under ``data_dir``, generated unless already
    there with exactly these options. Only a new or empty folder, or one the generator
    marked as its own, is written (:func:`generation_state`); regenerating an own folder
    made with other options says so in a warning.

    Raises:
        ConfigError: ``data_dir`` holds files the generator did not write.
    """
    data_dir = Path(data_dir)
    state = generation_state(data_dir, options)
    if state.action == "ready":
        return data_dir / "annotations.json", data_dir / "images"
    if state.action == "regenerate":
        log.warning("regenerating %s: %s", data_dir, "; ".join(state.changes))
    return write_synthetic_coco(data_dir, options)


SCENES_PRESETS: dict[str, SyntheticOptions] = {
    "eval": SyntheticOptions(
        num_images=400,
        image_size=(256, 256),
        seed=2023,
        objects_per_image=(1, 6),
        category_mode="colour_shape",
        held_out=HELD_OUT_PAIRS,
        draw_held_out=True,
        clutter=8,
    ),
    "train": SyntheticOptions(
        num_images=100_000,
        image_size=(64, 64),
        seed=0,
        objects_per_image=(1, 4),
        min_area=36.0,
        max_area_fraction=0.45,
        category_mode="colour_shape",
        held_out=HELD_OUT_PAIRS,
        draw_held_out=False,
        size_mode="log_uniform",
        clutter=2,
    ),
}
"""``eval``: 256x256 scenes, 1-6 objects from a few pixels to half the image (every
COCO size bucket), 64 colour-shape categories of which :data:`HELD_OUT_PAIRS` are held
out, cluttered. ``train``: 64x64 scenes of 1-4 objects, sizes log-uniform, held-out
pairs never drawn."""


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m retrieval.data.synthetic OUT_DIR [--num-images N] [--seed S] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--preset",
        choices=["scenes", "scenes-train"],
        help="the scenes benchmark's evaluation (scenes) or training (scenes-train) set; "
        "--num-images and --seed still apply (defaults: the preset's)",
    )
    parser.add_argument("--num-images", type=int, default=None, help="default 12 (or preset)")
    parser.add_argument("--seed", type=int, default=None, help="default 0 (or preset)")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--bad-images", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        _generate(args)
    except RetrievalError as err:
        parser.exit(2, f"error: {err}\n")


def _generate(args: argparse.Namespace) -> None:
    if args.preset:
        split = "eval" if args.preset == "scenes" else "train"
        options = scenes_options(split, args.num_images, args.seed, bad_images=args.bad_images)
        annotations, images = write_synthetic_coco(args.out_dir, options)
        count = options.num_images
    else:
        count = 12 if args.num_images is None else args.num_images
        annotations, images = make_synthetic_coco(
            args.out_dir,
            count,
            (args.width, args.height),
            0 if args.seed is None else args.seed,
            bad_images=args.bad_images,
        )
    print(f"wrote {count + args.bad_images} images to {images}")
    print(f"wrote annotations to {annotations}")
    print(f"use: data.name=coco data.annotations={annotations} data.images={images}")


if __name__ == "__main__":
    main()
