"""LVIS v1: COCO 2017 images, 1,203 categories in three frequency splits, federated labels.

LVIS is "federated": for each category only some images were checked. An image's
``neg_category_ids`` lists categories verified absent; a category neither annotated nor
listed there was never looked for, so the image may or may not hold it. docs/protocol.md
fixes two readings (``protocol.lvis_federated``): ``True`` leaves such images out of the
category's ranking, ``False`` counts them as negatives.

``not_exhaustive_category_ids`` lists categories present in an image but not every
instance annotated. Retrieval asks whether the image holds the category at all, and
one annotated instance answers that, so these images stay relevant (the LVIS detection
eval instead forgives unmatched detections there; retrieval has no detections to
forgive). Only the s-m split can notice: the largest instance may be an unannotated
one. The ground truth's notes count these pairs.

Images: each record's ``coco_url`` (``.../train2017/000000123.jpg``) names the COCO
split folder and the file; LVIS v1 val takes images from both train2017 and val2017.
See :class:`LvisDataset` for where ``data.images`` may point.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval.data.base import OnBadImage, RetrievalDataset, Transform, register_dataset
from retrieval.data.coco import CocoDataset, check_entries
from retrieval.data.ground_truth import Category, GroundTruth
from retrieval.data.images import find_missing_images, missing_images_error, outside_root_error
from retrieval.data.names import clean_category_name
from retrieval.errors import DataError, MissingFileError

FREQUENCY_SPLITS = {"r": "rare", "c": "common", "f": "frequent"}
"""LVIS ``frequency`` letter -> :attr:`Category.split` (the metric averages each split)."""

COCO_SPLIT_FOLDERS = ("train2017", "val2017", "test2017")

_FIX = "set data.annotations to an LVIS v1 annotation file (e.g. lvis_v1_val.json)"
_REQUIRED_FIELDS = {
    "images": ("id", "coco_url"),
    "categories": ("id", "name"),
    "annotations": ("id", "image_id", "category_id"),
}


def _lvis_loader() -> type:
    """The ``lvis`` package's ``LVIS`` class, imported only when an LVIS dataset is built.

    Importing ``lvis`` takes seconds (it pulls OpenCV and matplotlib for its
    visualiser) and calls ``logging.basicConfig``; the root logger is put back so
    that building a dataset does not reconfigure the caller's logging.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from lvis.lvis import LVIS

    root.handlers[:] = handlers
    root.setLevel(level)
    return LVIS


def load_lvis(path: str | Path) -> Any:
    """The ``lvis.LVIS`` index of an annotation file, with one clear error per bad input.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not LVIS-shaped, or references that point nowhere.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"annotation file not found: {path}; {_FIX}")
    if not path.is_file():
        raise DataError(f"annotation path is not a file: {path}; {_FIX}")
    try:
        api = _lvis_loader()(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {path} is not valid JSON ({err}); {_FIX}") from None
    except (AssertionError, KeyError, TypeError, AttributeError) as err:
        # lvis asserts a dict and indexes required keys without checking them.
        raise DataError(
            f"annotation file {path} is not in LVIS format ({type(err).__name__}: {err}); {_FIX}"
        ) from None
    _check_lvis(api.dataset, path)
    return api


def _check_lvis(data: dict[str, Any], path: Path) -> None:
    """Every field the ground truth reads exists, ids are unique, references resolve."""
    for key, need in _REQUIRED_FIELDS.items():
        bad = [r for r in data[key] if not isinstance(r, dict) or any(k not in r for k in need)]
        if bad:
            raise DataError(
                f"annotation file {path}: every entry of {key!r} needs {', '.join(need)}; "
                f"first bad entry: {repr(bad[0])[:200]}; {_FIX}"
            )
    check_entries(data, path, _FIX, file_names=False)
    for key in ("images", "categories"):
        ids = [r["id"] for r in data[key]]
        if len(set(ids)) != len(ids):
            raise DataError(f"annotation file {path}: duplicate ids in {key!r}")
    frequencies = {c.get("frequency") for c in data["categories"]} - {None, *FREQUENCY_SPLITS}
    if frequencies:
        raise DataError(
            f"annotation file {path}: unknown category frequency {sorted(frequencies)}; "
            f"LVIS uses {', '.join(FREQUENCY_SPLITS)}"
        )
    category_ids = np.array([c["id"] for c in data["categories"]], dtype=np.int64)
    image_ids = np.array([i["id"] for i in data["images"]], dtype=np.int64)
    uses = {
        "annotation image_id": (np.array([a["image_id"] for a in data["annotations"]]), image_ids),
        "annotation category_id": (
            np.array([a["category_id"] for a in data["annotations"]]),
            category_ids,
        ),
        "neg_category_ids": (_concat(data["images"], "neg_category_ids"), category_ids),
        "not_exhaustive_category_ids": (
            _concat(data["images"], "not_exhaustive_category_ids"),
            category_ids,
        ),
    }
    for what, (used, known) in uses.items():
        unknown = np.unique(used[~np.isin(used, known)]) if used.size else used
        if unknown.size:
            raise DataError(
                f"annotation file {path}: {what} values not listed: {unknown[:5].tolist()}"
            )


def _concat(images: list[dict[str, Any]], key: str) -> np.ndarray:
    """All images' ``key`` id lists, concatenated (int64)."""
    lists = [img.get(key) or [] for img in images]
    return np.fromiter((i for ids in lists for i in ids), dtype=np.int64)


def _split_and_file(coco_url: str) -> tuple[str, str]:
    """``".../val2017/000000123.jpg"`` -> ``("val2017", "000000123.jpg")``."""
    parts = coco_url.rstrip("/").split("/")
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def image_root(images: Path, split_folders: set[str]) -> Path | None:
    """The folder holding the COCO split folders, or None when ``images`` is a flat folder.

    ``images`` holding a split folder -> ``images`` (the COCO root); ``images`` named
    like a split (``.../val2017``) -> its parent, so the other split is found beside
    it; anything else is a flat folder holding the files themselves.
    """
    if any((images / split).is_dir() for split in split_folders):
        return images
    if images.name in split_folders:
        return images.parent
    return None


@register_dataset("lvis")
class LvisDataset(CocoDataset):
    """LVIS v1 (val by default) as a torch ``Dataset`` plus its federated ground truth.

    Items, batches and the bad-file policy are :class:`CocoDataset`'s.

    Where images are looked up, for a record whose ``coco_url`` ends in
    ``<split>/<file>`` (``split`` = train2017, val2017...):

    - ``data.images`` is the COCO root (it holds ``train2017/``, ``val2017/``):
      ``<images>/<split>/<file>``. The usual set-up, and what ``retrieval data
      download lvis`` makes (``data/coco``).
    - ``data.images`` is a split folder itself (``.../val2017``): its own split's files
      in it, the other split's in the sibling folder (``.../train2017``).
    - any other folder: ``<images>/<file>`` (all the split's images copied into one).

    Args:
        annotations: the LVIS JSON (config ``data.annotations``), e.g. ``lvis_v1_val.json``.
        images: see above (config ``data.images``).
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``error`` or ``skip`` (config ``data.on_bad_image``).
        federated: docs/protocol.md's LVIS reading (config ``protocol.lvis_federated``):
            True leaves an image out of category c's ranking unless c is annotated in it
            or listed in its ``neg_category_ids``; False makes every image without an
            annotation of c a negative.
        include_crowd: LVIS has no crowd annotations; an ``iscrowd`` field, where a
            file has one, is honoured as for COCO (config ``data.include_crowd``).
        max_images: keep only the first N image ids (ascending), for quick runs.
        query_names: raw category ``name`` -> query text, overriding the rule
            (``synonyms[0]`` cleaned; config ``data.query_names``).
    """

    dataset_name = "lvis"
    CONFIG_OPTIONS: ClassVar[dict[str, str]] = {"federated": "protocol.lvis_federated"}

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "error",
        federated: bool = True,
        include_crowd: bool = True,
        max_images: int | None = None,
        query_names: Mapping[str, str] | None = None,
    ) -> None:
        RetrievalDataset.__init__(self, annotations, images, transform, on_bad_image, max_images)
        self.federated = bool(federated)
        self.include_crowd = include_crowd

        api = load_lvis(self.annotations_path)
        if not self.images_dir.is_dir():
            what = "not a folder" if self.images_dir.exists() else "not found"
            raise MissingFileError(
                f"image folder {what}: {self.images_dir}; set data.images to the COCO root "
                "holding train2017/ and val2017/ (LVIS v1 val uses both)"
            )
        # Only what the ground truth reads is kept: the segmentations make the loaded
        # file several times larger than these, and DataLoader workers copy the dataset.
        self._location = {i: _split_and_file(r["coco_url"]) for i, r in api.imgs.items()}
        self._negative = {i: r.get("neg_category_ids") or [] for i, r in api.imgs.items()}
        self._not_exhaustive = {
            i: r.get("not_exhaustive_category_ids") or [] for i, r in api.imgs.items()
        }
        self._annotations = _annotation_arrays(api.dataset["annotations"], include_crowd)
        splits = {split for split, _ in self._location.values()} - {"", ".", ".."}
        self._root = image_root(self.images_dir, splits)
        # The declared roots: the split folders themselves (train2017/, val2017/ side by
        # side), or the flat folder; a coco_url cannot lead a path out of them.
        self.image_roots = (
            (self.images_dir,)
            if self._root is None
            else tuple(self._root / split for split in sorted(splits or COCO_SPLIT_FOLDERS))
        )

        ids = np.array(sorted(self._location), dtype=np.int64)
        if max_images is not None:
            ids = ids[:max_images]
        self.failures_at_start = find_missing_images(
            {int(i): self.image_path(int(i)) for i in ids}, self.image_roots
        )
        if self.failures_at_start and on_bad_image == "error":
            escaped = outside_root_error(self.failures_at_start, self.annotations_path)
            if escaped is not None:
                raise escaped
            raise missing_images_error(
                self.failures_at_start, len(ids), self.annotations_path, self._missing_hint()
            )
        missing = np.array([f["image_id"] for f in self.failures_at_start], dtype=np.int64)
        self.image_ids: np.ndarray = ids[~np.isin(ids, missing)]
        self.categories: list[Category] = [
            Category(
                id=int(c["id"]),
                name=c["name"],
                query=_query(c, query_names),
                split=FREQUENCY_SPLITS.get(c.get("frequency")),
            )
            for c in sorted(api.dataset["categories"], key=lambda c: c["id"])
        ]

    def image_path(self, image_id: int) -> Path:
        """The file of ``image_id``, from its ``coco_url`` (see the class docstring)."""
        split, name = self._location[image_id]
        if self._root is None:
            return self.images_dir / name
        return self._root / split / name

    def _missing_hint(self) -> str:
        """Which split folders the missing files belong to, and where they were looked for."""
        per_split: dict[str, int] = {}
        for failure in self.failures_at_start:
            split = self._location[failure["image_id"]][0]
            per_split[split] = per_split.get(split, 0) + 1
        counts = ", ".join(f"{n} from {split}" for split, n in sorted(per_split.items()))
        where = "a flat folder" if self._root is None else f"split folders under {self._root}"
        return (
            f"Missing: {counts} (looked up in {where}). Set data.images to the COCO root "
            "holding train2017/ and val2017/ (LVIS v1 val uses both; `retrieval data "
            "download lvis` fetches them)"
        )

    def ground_truth(self) -> GroundTruth:
        """Relevance, federated ignore mask and largest-instance area, for :attr:`image_ids`.

        Relevant: at least one annotation of the category in the image. Under
        ``federated`` an image that is neither relevant nor lists the category in its
        ``neg_category_ids`` is ignored; otherwise nothing is ignored. ``max_area`` is
        the largest annotated instance's ``area`` (box area where a file omits it).
        """
        image_of, category_of, area, box_areas = self._annotations
        image_ids = self.image_ids
        category_ids = np.array([c.id for c in self.categories], dtype=np.int64)
        shape = (len(category_ids), len(image_ids))
        kept = np.isin(image_of, image_ids)
        rows = np.searchsorted(category_ids, category_of[kept])
        cols = np.searchsorted(image_ids, image_of[kept])
        relevant = np.zeros(shape, dtype=bool)
        relevant[rows, cols] = True
        max_area = np.zeros(shape, dtype=np.float64)
        np.maximum.at(max_area, (rows, cols), area[kept])

        negative = _listed(self._negative, image_ids, category_ids)
        not_exhaustive = _listed(self._not_exhaustive, image_ids, category_ids)
        ignore = ~relevant & ~negative if self.federated else np.zeros(shape, dtype=bool)
        area_source = "annotation area"
        if box_areas:
            area_source += f" (bbox w*h for {box_areas} annotations without one)"
        return GroundTruth(
            image_ids=image_ids.copy(),
            categories=list(self.categories),
            relevant=relevant,
            ignore=ignore,
            max_area=max_area.astype(np.float32),
            notes={
                "lvis_federated": self.federated,
                "lvis_ignored_pairs": int(ignore.sum()),
                "lvis_not_exhaustive": "relevant (one annotated instance suffices)",
                "lvis_not_exhaustive_pairs": int(not_exhaustive.sum()),
                "include_crowd": self.include_crowd,
                "area_source": area_source,
            },
        )


def _query(category: Mapping[str, Any], mapping: Mapping[str, str] | None) -> str:
    """The user's text for the category's ``name`` if given, else ``synonyms[0]`` cleaned."""
    if mapping and category["name"] in mapping:
        return mapping[category["name"]]
    synonyms = category.get("synonyms") or [category["name"]]
    return clean_category_name(synonyms[0], "lvis")


def _annotation_arrays(
    anns: list[dict[str, Any]], include_crowd: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image id, category id and area of every counted annotation, and how many areas
    came from the box (hand-made files sometimes omit ``area``)."""
    if not include_crowd:
        anns = [a for a in anns if not a.get("iscrowd", 0)]
    image_of = np.array([a["image_id"] for a in anns], dtype=np.int64)
    category_of = np.array([a["category_id"] for a in anns], dtype=np.int64)
    area = np.array([a.get("area", np.nan) for a in anns], dtype=np.float64)
    no_area = np.isnan(area)
    if no_area.any():
        boxes = np.array([anns[k].get("bbox", [0, 0, 0, 0]) for k in np.flatnonzero(no_area)])
        area[no_area] = boxes[:, 2] * boxes[:, 3]
    return image_of, category_of, area, int(no_area.sum())


def _listed(
    lists: Mapping[int, list[int]], image_ids: np.ndarray, category_ids: np.ndarray
) -> np.ndarray:
    """``[Q, N]`` bool: the category is in the image's id list (negatives, not exhaustive)."""
    per_image = [lists[int(i)] for i in image_ids]
    cols = np.repeat(np.arange(len(image_ids)), [len(ids) for ids in per_image])
    flat = np.fromiter((c for ids in per_image for c in ids), dtype=np.int64, count=len(cols))
    listed = np.zeros((len(category_ids), len(image_ids)), dtype=bool)
    listed[np.searchsorted(category_ids, flat), cols] = True
    return listed
