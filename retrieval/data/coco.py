"""COCO-format datasets: images for the retriever, ground truth for the metric.

Serves COCO val2017 and any folder of images with a COCO-format annotation file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from retrieval.data.base import OnBadImage, RetrievalDataset, Transform, register_dataset
from retrieval.data.ground_truth import Category, GroundTruth
from retrieval.data.images import BAD_IMAGE_FIX, find_missing_images, outside_root_error
from retrieval.data.names import query_name
from retrieval.errors import DataError, MissingFileError

log = logging.getLogger("retrieval")

_MISSING_LISTED = 5
_INT64 = (-(2**63), 2**63 - 1)
_REQUIRED_FIELDS = {
    "images": ("id", "file_name"),
    "categories": ("id", "name"),
    "annotations": ("id", "image_id", "category_id"),
}


_FIX = "set data.annotations to a COCO-format JSON file (e.g. instances_val2017.json)"


def _read_annotations(path: Path) -> dict[str, Any]:
    """The annotation JSON, checked enough that every later failure is the data's, not ours."""
    fix = _FIX
    if not path.exists():
        raise MissingFileError(f"annotation file not found: {path}; {fix}")
    if not path.is_file():
        raise DataError(f"annotation path is not a file: {path}; {fix}")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {path} is not valid JSON ({err}); {fix}") from None
    except RecursionError:  # arrays or objects nested thousands deep: not annotations
        raise DataError(
            f"annotation file {path} nests its values too deeply to be COCO annotations; {fix}"
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"annotation file {path} holds a {type(data).__name__}, not an object; {fix}"
        )
    missing = [key for key in ("images", "categories") if key not in data]
    if missing:
        raise DataError(
            f"annotation file {path} has no {' or '.join(repr(k) for k in missing)} list "
            f"(keys: {', '.join(sorted(data)) or 'none'}); {fix}"
        )
    for key, need in _REQUIRED_FIELDS.items():
        records = data.get(key, [])
        if not isinstance(records, list):
            raise DataError(f"annotation file {path}: {key!r} must be a list; {fix}")
        bad = [r for r in records if not isinstance(r, dict) or any(k not in r for k in need)]
        if bad:
            raise DataError(
                f"annotation file {path}: every entry of {key!r} needs {', '.join(need)}; "
                f"first bad entry: {repr(bad[0])[:200]}; {fix}"
            )
    return data


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, a string or NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: Any) -> bool:
    """An integer id that fits int64 (what the ground truth and the shards store)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int and _INT64[0] <= value <= _INT64[1]


def _entry(key: str, record: Mapping[str, Any], index: int) -> str:
    """How a message names one entry: ``annotations[7] (id 123)``."""
    ident = record.get("id")
    return f"{key}[{index}]" + (f" (id {ident!r})" if ident is not None else "")


def check_entries(data: dict[str, Any], path: Path, fix: str, file_names: bool = True) -> None:
    """Every field the ground truth reads holds a usable value, so that nothing wrong is
    scored as if it were right; shared by the COCO and LVIS readers.

    Refused (:class:`DataError` naming the file, the entry and the field): no images or
    no categories; an id, ``image_id`` or ``category_id`` that is not an integer within
    int64; a category ``name`` that is not a non-blank string; a ``file_name`` that is
    not a non-empty string (when ``file_names``); a ``bbox`` that is not 4 finite numbers
    ``[x, y, width, height]`` with width and height >= 0. An ``area`` that is negative or
    not a number is recomputed from the entry's valid ``bbox`` (a warning says how many),
    or refused when the entry has none.
    """

    def refuse(what: str) -> DataError:
        return DataError(f"annotation file {path}: {what}; {fix}")

    for key in ("images", "categories"):
        if not data[key]:
            raise refuse(f"{key!r} is empty: a dataset needs at least one of them")
    for key, fields in (
        ("images", ("id",)),
        ("categories", ("id",)),
        ("annotations", ("id", "image_id", "category_id")),
    ):
        for k, record in enumerate(data.get(key, [])):
            for field in fields:
                if field in record and not _is_id(record[field]):
                    raise refuse(
                        f"{_entry(key, record, k)} has {field} {record[field]!r}: ids must be "
                        f"integers between {_INT64[0]} and {_INT64[1]}"
                    )
    for k, category in enumerate(data["categories"]):
        name = category["name"]
        if not isinstance(name, str) or not name.strip():
            raise refuse(
                f"{_entry('categories', category, k)} has name {name!r}: a category name "
                "must be a non-blank string"
            )
    if file_names:
        for k, image in enumerate(data["images"]):
            name = image["file_name"]
            if not isinstance(name, str) or not name.strip():
                raise refuse(
                    f"{_entry('images', image, k)} has file_name {name!r}: it must be a "
                    "path relative to data.images"
                )
    recomputed = 0
    for k, ann in enumerate(data.get("annotations", [])):
        box = ann.get("bbox")
        box_ok = (
            isinstance(box, list)
            and len(box) == 4
            and all(_is_number(v) for v in box)
            and box[2] >= 0
            and box[3] >= 0
        )
        if box is not None and not box_ok:
            raise refuse(
                f"{_entry('annotations', ann, k)} has bbox {repr(box)[:80]}: a bbox must be "
                "4 finite numbers [x, y, width, height] with width and height >= 0"
            )
        area = ann.get("area")
        if area is None or (_is_number(area) and area >= 0):
            continue
        if not box_ok:
            raise refuse(
                f"{_entry('annotations', ann, k)} has area {repr(area)[:80]}: an area must "
                "be a number >= 0, and the entry has no bbox to compute it from"
            )
        del ann["area"]  # the ground truth takes bbox w*h for an entry without one
        recomputed += 1
    if recomputed:
        log.warning(
            "annotation file %s: %d annotations have a negative or non-numeric 'area'; "
            "bbox width * height is used for them instead",
            path,
            recomputed,
        )


def _check_references(data: dict[str, Any], path: Path) -> None:
    """Annotations must point at listed images and categories, ids must be unique."""
    for key in ("images", "categories"):
        ids = [r["id"] for r in data[key]]
        if len(set(ids)) != len(ids):
            raise DataError(f"annotation file {path}: duplicate ids in {key!r}")
    anns = data.get("annotations", [])
    for key, listed in (("image_id", "images"), ("category_id", "categories")):
        known = np.array([r["id"] for r in data[listed]], dtype=np.int64)
        used = np.array([a[key] for a in anns], dtype=np.int64)
        unknown = np.unique(used[~np.isin(used, known)])
        if unknown.size:
            raise DataError(
                f"annotation file {path}: annotations use {key} values not in {listed!r}: "
                f"{unknown[:_MISSING_LISTED].tolist()}"
            )


@register_dataset("coco")
class CocoDataset(RetrievalDataset):
    """A COCO-format dataset as a torch ``Dataset`` plus its retrieval ground truth.

    Items are ``dict(image_id, pixels, error, path)``; ``pixels`` is
    ``transform(load_image(path))``, or, with no transform, the exact ``[3, H, W]``
    uint8 pixels (see :func:`pil_to_uint8_tensor`). Use :meth:`collate` as the
    DataLoader's ``collate_fn``.

    Files missing at construction are found up front (cheap ``os.path`` checks) so a
    long run does not die at image 4,000: under ``on_bad_image="error"`` that raises at
    once; under ``"skip"`` they are left out of :attr:`image_ids` (and of the ground
    truth) and listed in :attr:`failures_at_start`.

    Args:
        annotations: the COCO-format JSON (config ``data.annotations``).
        images: the folder ``file_name`` paths are relative to (config ``data.images``).
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``error`` stops at a missing, truncated or corrupt file;
            ``skip`` leaves it out and reports it (config ``data.on_bad_image``).
        include_crowd: crowd annotations (``iscrowd=1``) make an image relevant.
        max_images: keep only the first N image ids (ascending), for quick runs.
        query_names: raw category name -> query text, overriding the cleaning rule
            (config ``data.query_names``).
    """

    LABEL_ONLY_OPTIONS = RetrievalDataset.LABEL_ONLY_OPTIONS | {"include_crowd"}
    dataset_name = "coco"

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "error",
        include_crowd: bool = True,
        max_images: int | None = None,
        query_names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(annotations, images, transform, on_bad_image, max_images)
        self.include_crowd = include_crowd

        data = _read_annotations(self.annotations_path)
        check_entries(data, self.annotations_path, _FIX)
        _check_references(data, self.annotations_path)
        if not self.images_dir.is_dir():
            what = "not a folder" if self.images_dir.exists() else "not found"
            raise MissingFileError(
                f"image folder {what}: {self.images_dir}; set data.images to the folder the "
                f"'file_name' entries of {self.annotations_path} are relative to"
            )
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        ids = np.array(sorted(self.coco.imgs), dtype=np.int64)
        if max_images is not None:
            ids = ids[:max_images]
        self.failures_at_start: list[dict[str, Any]] = find_missing_images(
            {int(i): self.image_path(int(i)) for i in ids}, self.image_roots
        )
        if self.failures_at_start and on_bad_image == "error":
            escaped = outside_root_error(self.failures_at_start, self.annotations_path)
            if escaped is not None:
                raise escaped
            shown = [f"  {f['path']}" for f in self.failures_at_start[:_MISSING_LISTED]]
            more = len(self.failures_at_start) - len(shown)
            raise MissingFileError(
                "\n".join(
                    [
                        f"{len(self.failures_at_start)} of {len(ids)} images listed in "
                        f"{self.annotations_path} are missing under {self.images_dir}:",
                        *shown,
                        *([f"  ... and {more} more"] if more else []),
                        f"Check data.images (the folder 'file_name' is relative to), "
                        f"or: {BAD_IMAGE_FIX}.",
                    ]
                )
            )
        missing = np.array([f["image_id"] for f in self.failures_at_start], dtype=np.int64)
        self.image_ids: np.ndarray = ids[~np.isin(ids, missing)]
        self.categories: list[Category] = [
            Category(
                id=int(c["id"]), name=c["name"], query=query_name(c["name"], "coco", query_names)
            )
            for c in sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        ]

    def image_path(self, image_id: int) -> Path:
        """Where the image lives: its ``file_name`` under the images folder."""
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def ground_truth(self) -> GroundTruth:
        """Relevance and largest-instance area per (category, image), for :attr:`image_ids`.

        An image is relevant to a category when it holds at least one annotation of it
        (crowd annotations count unless ``include_crowd=False``); ``max_area`` is the
        largest such annotation's ``area`` (original resolution). Built in one pass
        over the annotation list.
        """
        anns = self.coco.dataset.get("annotations", [])
        if not self.include_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        image_of = np.array([a["image_id"] for a in anns], dtype=np.int64)
        category_of = np.array([a["category_id"] for a in anns], dtype=np.int64)
        area = np.array([a.get("area", np.nan) for a in anns], dtype=np.float64)
        no_area = np.isnan(area)
        if no_area.any():  # hand-made COCO files sometimes omit it; the box is the next best
            boxes = np.array([anns[k].get("bbox", [0, 0, 0, 0]) for k in np.flatnonzero(no_area)])
            area[no_area] = boxes[:, 2] * boxes[:, 3]

        image_ids = self.image_ids
        category_ids = np.array([c.id for c in self.categories], dtype=np.int64)
        kept = np.isin(image_of, image_ids)
        cols = np.searchsorted(image_ids, image_of[kept])
        rows = np.searchsorted(category_ids, category_of[kept])

        shape = (len(category_ids), len(image_ids))
        relevant = np.zeros(shape, dtype=bool)
        relevant[rows, cols] = True
        max_area = np.zeros(shape, dtype=np.float64)
        np.maximum.at(max_area, (rows, cols), area[kept])
        area_source = "annotation area"
        if no_area.any():
            area_source += f" (bbox w*h for {int(no_area.sum())} annotations without one)"
        return GroundTruth(
            image_ids=image_ids.copy(),
            categories=list(self.categories),
            relevant=relevant,
            ignore=np.zeros(shape, dtype=bool),
            max_area=max_area.astype(np.float32),
            notes={"include_crowd": self.include_crowd, "area_source": area_source},
        )
