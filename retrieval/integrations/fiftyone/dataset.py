"""A run as a FiftyOne dataset: one sample per live image, its representatives as boxes.

Each sample holds the image file (``filepath``), the run's stable ``image_id`` (a unique
index of the dataset), the collection's metadata columns as fields (``width``,
``height`` and ``size_bytes`` also as FiftyOne's ``metadata``), the ground truth as
``Detections`` for a COCO-format labelled run, and a ``representatives`` ``Detections``
field: one box per representative the run keeps (``rep_index``, labelled with the
retriever's name), so FiftyOne's patches view shows what Cluster-CLIP keeps.

Exporting again updates the dataset in place, keyed by ``image_id``: images the run no
longer holds (removed from its collection) are deleted, new ones added and the others'
fields rewritten, so ``retrieval embed`` + ``retrieval index update`` + another export
never duplicate a sample. With an index, the export registers it as the dataset's
similarity brain run (see :mod:`retrieval.integrations.fiftyone.similarity`).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from retrieval.data.collection import live_image_ids
from retrieval.errors import ConfigError, DataError
from retrieval.store.export import _path_source, export_run
from retrieval.store.shards import open_run_store

ID_FIELD = "image_id"
REPS_FIELD = "representatives"
GROUND_TRUTH_FIELD = "ground_truth"
BRAIN_KEY = "retrieval"
RUN_INFO = "retrieval_run"  # dataset.info key: the run folder the dataset mirrors
#: fields FiftyOne or this export own; a collection column of that name gets COLUMN_SUFFIX
RESERVED = {
    "id",
    "filepath",
    "tags",
    "metadata",
    "media_type",
    "created_at",
    "last_modified_at",
    ID_FIELD,
    REPS_FIELD,
    GROUND_TRUTH_FIELD,
}
COLUMN_SUFFIX = "_column"
INSTALL = "pip install '.[fiftyone]' (docs/fiftyone.md)"


def require_fiftyone() -> Any:
    """The ``fiftyone`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import fiftyone
        import fiftyone.brain  # the similarity backend needs it too
    except ImportError as err:
        raise ConfigError(f"FiftyOne is not installed ({err}): {INSTALL}") from None
    return fiftyone


@dataclass
class ExportedDataset:
    """What an export did to the dataset."""

    name: str
    samples: int
    added: int
    removed: int
    updated: int
    representatives: int
    brain_key: str | None = None


def export_dataset(
    run_dir: str | Path,
    name: str,
    index: str | Path | None = None,
    brain_key: str = BRAIN_KEY,
    progress: bool = False,
) -> ExportedDataset:
    """Makes or updates the persistent FiftyOne dataset ``name`` from a run.

    Args:
        run_dir: the run folder (``retrieval eval`` / ``retrieval embed`` output).
        name: the FiftyOne dataset; an existing one must have been exported from this run.
        index: an index of this run (``retrieval index build``) to register as the
            dataset's similarity brain run ``brain_key``, so the App sorts by text.
        brain_key: the brain run's key (replaced when it exists).
        progress: show the export's progress bar.

    Raises:
        ConfigError: FiftyOne is missing, ``name`` holds another run's dataset, or the
            index was built from another run.
    """
    fo = require_fiftyone()
    run_dir = Path(run_dir).resolve()
    if index is not None:
        _check_index_run(index, run_dir, f"run {run_dir}")  # before the dataset changes
    ids = _live_embedded_ids(run_dir)
    rows = _representative_rows(run_dir, progress)
    paths = _path_source(run_dir)
    files, columns = paths.lookup(ids)
    if files.null_count:
        lost = ids[np.asarray(files.is_null())]
        raise DataError(
            f"{len(lost)} images of {run_dir} have no file path (image id {lost[0]} first): "
            f"its images.parquet or dataset (data.annotations, data.images in its "
            f"config.yaml) no longer lists them; a FiftyOne sample needs its file"
        )
    names = [f.name + COLUMN_SUFFIX if f.name in RESERVED else f.name for f in paths.fields]
    values = {n: c.to_pylist() for n, c in zip(names, columns, strict=True)}
    reps = _representatives(rows, _retriever_name(run_dir))
    truth = _ground_truth(paths.images.dataset, ids)

    dataset = _open_dataset(fo, name, run_dir)
    existing = dict(zip(dataset.values(ID_FIELD), dataset.values("id"), strict=True))
    live = set(ids.tolist())
    gone = [sample_id for image_id, sample_id in existing.items() if image_id not in live]
    dataset.delete_samples(gone)

    new, kept = [], {}
    for k, (image_id, path) in enumerate(zip(ids.tolist(), files.to_pylist(), strict=True)):
        fields = {n: v[k] for n, v in values.items()}
        fields[REPS_FIELD] = fo.Detections(detections=reps.get(image_id, []))
        if truth is not None:
            fields[GROUND_TRUTH_FIELD] = fo.Detections(detections=truth.get(image_id, []))
        fields["metadata"] = _metadata(fo, fields, paths.images.dataset, image_id)
        if image_id in existing:
            kept[image_id] = fields
        else:
            new.append(fo.Sample(filepath=path, **{ID_FIELD: image_id}, **fields))
    if new:
        dataset.add_samples(new, progress=progress)
    for field in sorted({f for fields in kept.values() for f in fields}):
        updates = {i: fields[field] for i, fields in kept.items() if field in fields}
        dataset.set_values(field, updates, key_field=ID_FIELD)

    result = ExportedDataset(
        name=name,
        samples=len(dataset),
        added=len(new),
        removed=len(gone),
        updated=len(kept),
        representatives=len(rows),
    )
    if index is not None:
        register_index(dataset, index, brain_key)
        result.brain_key = brain_key
    return result


def register_index(dataset: Any, index: str | Path, brain_key: str = BRAIN_KEY) -> Any:
    """Registers ``index`` (an index of the run ``dataset`` was exported from) as the
    dataset's similarity brain run ``brain_key`` over its representatives, replacing a
    run of that key; returns the :class:`RetrievalSimilarityIndex`."""
    import fiftyone.brain as fob

    from retrieval.integrations.fiftyone.similarity import RetrievalSimilarityConfig

    folder = _check_index_run(
        index,
        Path(dataset.info.get(RUN_INFO, "")),
        f"dataset {dataset.name!r}, exported from {dataset.info.get(RUN_INFO)}",
    )
    if brain_key in dataset.list_brain_runs():
        dataset.delete_brain_run(brain_key)
    return fob.compute_similarity(
        dataset,
        patches_field=REPS_FIELD,
        embeddings=False,
        brain_key=brain_key,
        backend=RetrievalSimilarityConfig,
        index=str(folder),
    )


def _check_index_run(index: str | Path, run_dir: Path, what: str) -> Path:
    """The index folder (absolute), if it was built from ``run_dir``; else a
    :class:`ConfigError` naming both runs."""
    from retrieval.index import open_index

    folder = Path(index).resolve()
    with open_index(folder) as opened:
        run = opened.run_dir.resolve()
    if run != run_dir:
        raise ConfigError(
            f"index {folder} was built from run {run}, not from {what}: pass an index "
            f"built from it (retrieval index build RUN --out INDEX)"
        )
    return folder


def _open_dataset(fo: Any, name: str, run_dir: Path) -> Any:
    """The persistent dataset ``name``: created for ``run_dir``, or loaded when an earlier
    export of this run made it."""
    if not fo.dataset_exists(name):
        dataset = fo.Dataset(name, persistent=True)
        dataset.info[RUN_INFO] = str(run_dir)
        dataset.save()
        dataset.add_sample_field(ID_FIELD, fo.IntField)
        dataset.create_index(ID_FIELD, unique=True)  # a second sample of an image: refused
        return dataset
    dataset = fo.load_dataset(name)
    source = dataset.info.get(RUN_INFO)
    if source != str(run_dir):
        raise ConfigError(
            f"FiftyOne dataset {name!r} was not exported from {run_dir} "
            f"({'from ' + source if source else 'not made by retrieval export'}): pass "
            f"another --name, or delete it (fiftyone datasets delete {name})"
        )
    return dataset


def _live_embedded_ids(run_dir: Path) -> np.ndarray:
    """Ids (ascending) of the images the run embedded and still holds."""
    embedded = np.unique(open_run_store(run_dir).contents()[0])
    live = live_image_ids(run_dir)
    return embedded if live is None else np.intersect1d(embedded, live)


def _representative_rows(run_dir: Path, progress: bool) -> list[dict[str, Any]]:
    """Every valid representative of the run's live images (image_id, rep_index, box),
    read through ``retrieval export``'s parquet writer."""
    with tempfile.TemporaryDirectory(prefix="fiftyone-export-") as tmp:
        out = Path(tmp) / "representatives.parquet"
        export_run(run_dir, out, format="parquet", progress=progress)
        return pq.read_table(out, columns=["image_id", "rep_index", "box"]).to_pylist()


def _retriever_name(run_dir: Path) -> str:
    fingerprint = open_run_store(run_dir).read_manifest().get("fingerprint") or {}
    return str(fingerprint.get("retriever", {}).get("name", "representative"))


def _representatives(rows: list[dict[str, Any]], label: str) -> dict[int, list[Any]]:
    """Per image, one ``Detection`` per representative: its box as FiftyOne's relative
    ``[x, y, w, h]`` (the whole image for a retriever without boxes) and ``rep_index``."""
    import fiftyone as fo

    out: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        x0, y0, x1, y1 = row["box"] if row["box"] is not None else (0.0, 0.0, 1.0, 1.0)
        out[row["image_id"]].append(
            fo.Detection(
                label=label, bounding_box=[x0, y0, x1 - x0, y1 - y0], rep_index=row["rep_index"]
            )
        )
    return out


def _ground_truth(dataset: Any, ids: np.ndarray) -> dict[int, list[Any]] | None:
    """Per image, its COCO-format annotations as ``Detection``s (category name, relative
    box, ``iscrowd``); None for a run without a COCO-format labelled dataset."""
    coco = getattr(dataset, "coco", None)
    if coco is None:
        return None
    import fiftyone as fo

    out: dict[int, list[Any]] = {}
    for image_id in ids.tolist():
        image = coco.imgs[image_id]  # every id has a path, so the dataset lists it
        w, h = float(image["width"]), float(image["height"])
        out[image_id] = [
            fo.Detection(
                label=coco.cats[a["category_id"]]["name"],
                bounding_box=[
                    a["bbox"][0] / w,
                    a["bbox"][1] / h,
                    a["bbox"][2] / w,
                    a["bbox"][3] / h,
                ],
                iscrowd=int(a.get("iscrowd", 0)),
            )
            for a in coco.imgToAnns.get(image_id, [])
        ]
    return out


def _metadata(fo: Any, fields: dict[str, Any], dataset: Any, image_id: int) -> Any:
    """FiftyOne's ``ImageMetadata`` from the collection's columns or the COCO image
    record; None when neither knows the size."""
    coco = getattr(dataset, "coco", None)
    if coco is not None:
        image = coco.imgs[image_id]
        return fo.ImageMetadata(width=image.get("width"), height=image.get("height"))
    if fields.get("width") is None:
        return None
    return fo.ImageMetadata(
        width=fields["width"], height=fields.get("height"), size_bytes=fields.get("size_bytes")
    )
