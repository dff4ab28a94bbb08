"""nuImages v1.0: driving-scene key frames, 23 object classes with hierarchical names.

Read straight from the JSON tables of a version folder (``v1.0-val`` by default), no
nuscenes-devkit: four tables hold everything retrieval needs.

- ``sample.json``: one record per annotated key frame; its ``key_camera_token`` names
  the image. These images, and only these, form the database (``is_key_frame`` must
  hold for each; the surrounding camera sweeps and the lidar records of
  ``sample_data.json`` are never ranked).
- ``sample_data.json``: the image's ``filename``, relative to the dataroot.
- ``object_ann.json``: one record per object: the image, the category and the
  ``bbox`` ``[xmin, ymin, xmax, ymax]`` in pixels; relevance and the s-m box areas come
  from here.
- ``category.json``: class names such as ``vehicle.emergency.ambulance``.

``surface_ann.json`` (driveable surface and ego-vehicle masks) is not read: surfaces
are no objects to retrieve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retrieval.data.base import OnBadImage, RetrievalDataset, Transform, register_dataset
from retrieval.data.ground_truth import Category, GroundTruth
from retrieval.data.images import find_missing_images, missing_images_error, outside_root_error
from retrieval.data.names import query_name
from retrieval.errors import DataError, MissingFileError

SURFACE_CATEGORIES = ("flat.driveable_surface", "vehicle.ego")
"""nuImages classes annotated only as surface masks (``surface_ann.json``). They are
left out of the queries unless ``object_ann.json`` annotates them, so a version that
does would still be counted, never silently dropped."""

TABLES = {
    "category": ("token", "name"),
    "sample": ("token", "key_camera_token"),
    "sample_data": ("token", "filename", "is_key_frame"),
    "object_ann": ("sample_data_token", "category_token", "bbox"),
}
"""The tables read and the fields each record needs."""

_FIX = "set data.annotations to a nuImages table folder (e.g. data/nuimages/v1.0-val)"


def default_query_names() -> dict[str, str]:
    """The shipped class name -> query text mapping (``nuimages_names.yaml``)."""
    text = resources.files("retrieval.data").joinpath("nuimages_names.yaml").read_text()
    return {str(k): str(v) for k, v in yaml.safe_load(text).items()}


def read_tables(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The four tables of a version folder, each checked for the fields read later.

    Raises:
        FileNotFoundError: the folder or a table is missing.
        ValueError: a table is not JSON, not a list, or a record lacks a field.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "not found"
        raise MissingFileError(f"nuImages table folder {what}: {folder}; {_FIX}")
    tables = {}
    for name, need in TABLES.items():
        path = folder / f"{name}.json"
        if not path.is_file():
            raise MissingFileError(f"nuImages table missing: {path}; {_FIX}")
        try:
            records = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"nuImages table {path} is not valid JSON ({err}); {_FIX}") from None
        except RecursionError:  # nested thousands deep: not a table of records
            raise DataError(f"nuImages table {path} nests values too deeply; {_FIX}") from None
        if not isinstance(records, list):
            raise DataError(f"nuImages table {path} must hold a list of records; {_FIX}")
        bad = [r for r in records if not isinstance(r, dict) or any(k not in r for k in need)]
        if bad:
            raise DataError(
                f"nuImages table {path}: every record needs {', '.join(need)}; "
                f"first bad record: {repr(bad[0])[:200]}"
            )
        tables[name] = records
    _check_values(tables, folder)
    return tables


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_values(tables: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    """The values read later are usable: at least one sample and one category, class
    names non-blank strings, filenames strings, boxes 4 finite numbers ``[xmin, ymin,
    xmax, ymax]`` with ``xmax >= xmin`` and ``ymax >= ymin``. A bad record is named."""
    for name, what in (("sample", "samples (key frames)"), ("category", "categories")):
        if not tables[name]:
            raise DataError(f"nuImages table {folder / name}.json holds no {what}; {_FIX}")
    checks = (
        ("category", "name", _text, "a non-blank string"),
        ("sample_data", "filename", _text, "a path"),
        ("object_ann", "bbox", _valid_box, "4 numbers [xmin, ymin, xmax, ymax], max >= min"),
    )
    for table, field, ok, need in checks:
        for k, record in enumerate(tables[table]):
            if not ok(record[field]):
                raise DataError(
                    f"nuImages table {folder / table}.json: record {k} (token "
                    f"{record.get('token')!r}) has {field} {repr(record[field])[:80]}: it must "
                    f"be {need}; {_FIX}"
                )


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _valid_box(box: Any) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(_finite(v) for v in box)
        and box[2] >= box[0]
        and box[3] >= box[1]
    )


@register_dataset("nuimages")
class NuImagesDataset(RetrievalDataset):
    """nuImages key frames as a torch ``Dataset`` plus their retrieval ground truth.

    Items, batches and the bad-file policy are the same as :class:`CocoDataset`'s.
    nuImages names images by token; here image ids are 1..N in the order of the key
    frames' ``sample_data`` tokens (fixed by the data, spread over logs and cameras, so
    ``max_images`` takes a mixed subset). :attr:`tokens` maps them back.

    Args:
        annotations: the version folder holding the JSON tables (config
            ``data.annotations``), e.g. ``data/nuimages/v1.0-val``.
        images: the dataroot that ``sample_data.filename`` (``samples/CAM_FRONT/...``)
            is relative to (config ``data.images``), e.g. ``data/nuimages``.
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``error`` or ``skip`` (config ``data.on_bad_image``).
        max_images: keep only the first N image ids, for quick runs.
        query_names: class name -> query text, overriding single entries of the
            shipped ``nuimages_names.yaml`` (config ``data.query_names``); names in
            neither fall back to the rule in ``names.py``.
    """

    dataset_name = "nuimages"

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "error",
        max_images: int | None = None,
        query_names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(annotations, images, transform, on_bad_image, max_images)

        tables = read_tables(self.annotations_path)
        if not self.images_dir.is_dir():
            what = "not a folder" if self.images_dir.exists() else "not found"
            raise MissingFileError(
                f"image folder {what}: {self.images_dir}; set data.images to the nuImages "
                "dataroot (the folder holding samples/)"
            )
        records = {r["token"]: r for r in tables["sample_data"]}
        key_frames = sorted({s["key_camera_token"] for s in tables["sample"]})
        for bad, problem in (
            ([t for t in key_frames if t not in records], "not in sample_data.json"),
            ([t for t in key_frames if t in records and not records[t]["is_key_frame"]],
             "not a key frame (is_key_frame is false)"),
        ):  # fmt: skip
            if bad:
                raise DataError(
                    f"nuImages tables {self.annotations_path}: {len(bad)} samples name a key "
                    f"camera frame that is {problem} (e.g. {bad[0]})"
                )
        self.tokens: list[str] = key_frames  # image id i is sample_data token tokens[i - 1]
        self._filenames = {i + 1: records[t]["filename"] for i, t in enumerate(key_frames)}

        ids = np.arange(1, len(key_frames) + 1, dtype=np.int64)
        if max_images is not None:
            ids = ids[:max_images]
        self.failures_at_start = find_missing_images(
            {int(i): self.image_path(int(i)) for i in ids}, self.image_roots
        )
        if self.failures_at_start and on_bad_image == "error":
            escaped = outside_root_error(
                self.failures_at_start, self.annotations_path / "sample_data.json"
            )
            if escaped is not None:
                raise escaped
            raise missing_images_error(
                self.failures_at_start,
                len(ids),
                self.annotations_path / "sample_data.json",
                f"Check data.images (the nuImages dataroot holding samples/, now "
                f"{self.images_dir})",
            )
        missing = np.array([f["image_id"] for f in self.failures_at_start], dtype=np.int64)
        self.image_ids: np.ndarray = ids[~np.isin(ids, missing)]

        objects = tables["object_ann"]
        names = _query_classes(tables["category"], objects, self.annotations_path)
        ordered = sorted(names, key=names.__getitem__)
        mapping = {**default_query_names(), **(query_names or {})}
        self.categories: list[Category] = [
            Category(id=k + 1, name=names[t], query=query_name(names[t], "nuimages", mapping))
            for k, t in enumerate(ordered)
        ]
        # Only three numbers per object are kept: the tables (masks included) are large.
        self._objects = _object_arrays(
            objects,
            image_of={t: i + 1 for i, t in enumerate(key_frames)},
            row_of={t: k for k, t in enumerate(ordered)},
            source=self.annotations_path,
        )

    def image_path(self, image_id: int) -> Path:
        """Where the key frame lives: its ``sample_data.filename`` under the dataroot."""
        return self.images_dir / self._filenames[image_id]

    def ground_truth(self) -> GroundTruth:
        """Relevance and largest box area per (class, image), for :attr:`image_ids`.

        Relevant: at least one ``object_ann`` record of the class on the key frame.
        ``max_area`` is the largest such box, ``(xmax - xmin) * (ymax - ymin)`` pixels
        at the original resolution (nuImages has masks, but the protocol's nuImages s-m
        split is defined on boxes). Nothing is ignored.
        """
        image_of, category_of, area = self._objects
        image_ids = self.image_ids
        shape = (len(self.categories), len(image_ids))
        kept = np.isin(image_of, image_ids)
        rows = category_of[kept]
        cols = np.searchsorted(image_ids, image_of[kept])
        relevant = np.zeros(shape, dtype=bool)
        relevant[rows, cols] = True
        max_area = np.zeros(shape, dtype=np.float64)
        np.maximum.at(max_area, (rows, cols), area[kept])
        return GroundTruth(
            image_ids=image_ids.copy(),
            categories=list(self.categories),
            relevant=relevant,
            ignore=np.zeros(shape, dtype=bool),
            max_area=max_area.astype(np.float32),
            notes={
                "images": "key camera frames (sample.key_camera_token)",
                "area_source": "box area (xmax - xmin) * (ymax - ymin), pixels",
            },
        )


def _query_classes(
    categories: list[dict[str, Any]], objects: list[dict[str, Any]], source: Path
) -> dict[str, str]:
    """``token -> name`` of the query classes: all but the surface classes no object uses."""
    used = {a["category_token"] for a in objects}
    unknown = used - {c["token"] for c in categories}
    if unknown:
        raise DataError(
            f"nuImages tables {source}: object_ann.json uses category tokens not in "
            f"category.json: {sorted(unknown)[:5]}"
        )
    return {
        c["token"]: c["name"]
        for c in categories
        if c["name"] not in SURFACE_CATEGORIES or c["token"] in used
    }


def _object_arrays(
    objects: list[dict[str, Any]], image_of: dict[str, int], row_of: dict[str, int], source: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image id, category row and box area of every object annotation.

    Raises:
        ValueError: an annotation on an image that is no sample's key camera frame
            (the schema forbids it; found here, before any embedding starts).
    """
    stray = [a["sample_data_token"] for a in objects if a["sample_data_token"] not in image_of]
    if stray:
        raise DataError(
            f"nuImages tables {source}: {len(stray)} object_ann records point at no "
            f"sample's key camera frame (e.g. {stray[0]})"
        )
    images = np.array([image_of[a["sample_data_token"]] for a in objects], dtype=np.int64)
    rows = np.array([row_of[a["category_token"]] for a in objects], dtype=np.int64)
    boxes = np.array([a["bbox"] for a in objects], dtype=np.float64).reshape(-1, 4)
    return images, rows, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
