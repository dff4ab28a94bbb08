"""LVIS data layer: federated ground truth, frequency splits, queries, image look-up."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lvis import LVIS
from PIL import Image
from torch.utils.data import DataLoader

from retrieval.data import create_dataset, list_datasets
from retrieval.data.base import pil_to_uint8_tensor
from retrieval.data.lvis import LvisDataset, _lvis_loader, image_root
from retrieval.metrics import evaluate_rankings

URL = "http://images.cocodataset.org/{split}/{id:012d}.jpg"


def lvis_image(image_id: int, split: str, neg=(), not_exhaustive=()) -> dict:
    """An LVIS v1 image record: no file_name, the split folder only in coco_url."""
    return {
        "id": image_id,
        "coco_url": URL.format(split=split, id=image_id),
        "flickr_url": "http://farm.example/x.jpg",
        "width": 12,
        "height": 10,
        "date_captured": "2013-11-14 16:28:13",
        "license": 1,
        "neg_category_ids": list(neg),
        "not_exhaustive_category_ids": list(not_exhaustive),
    }


def lvis_category(cat_id: int, name: str, frequency: str, synonyms=None) -> dict:
    return {
        "id": cat_id,
        "name": name,
        "synonyms": synonyms or [name],
        "frequency": frequency,
        "synset": f"{name}.n.01",
        "def": "a thing",
        "image_count": 1,
        "instance_count": 1,
    }


def lvis_ann(ann_id: int, image_id: int, category_id: int, area: float) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "area": area,
        "bbox": [0, 0, 2, 2],
        "segmentation": [[0, 0, 2, 0, 2, 2]],
    }


HANDMADE = {
    "info": {"description": "hand-made LVIS v1"},
    "licenses": [],
    # Ids out of order; images from both COCO split folders, as in LVIS v1 val.
    "images": [
        lvis_image(30, "train2017", neg=[11, 2], not_exhaustive=[3]),
        lvis_image(4, "val2017", neg=[7]),
        lvis_image(17, "train2017"),
        lvis_image(9, "val2017", neg=[3, 5, 11], not_exhaustive=[7]),
        lvis_image(25, "val2017", neg=[2]),  # no annotations at all
    ],
    "categories": [
        lvis_category(7, "bow_(weapon)", "r", ["bow_(weapon)", "longbow"]),
        lvis_category(2, "hair_dryer", "c"),
        lvis_category(3, "apple", "f"),
        lvis_category(11, "aerosol_can", "r", ["aerosol_can", "spray_can"]),  # never annotated
        lvis_category(5, "person", "f", ["person", "baby"]),
    ],
    "annotations": [
        lvis_ann(1, 30, 3, 50.0),
        lvis_ann(2, 30, 3, 120.0),
        lvis_ann(3, 30, 5, 400.0),
        lvis_ann(4, 4, 2, 10.0),
        lvis_ann(5, 4, 5, 9300.0),
        lvis_ann(6, 17, 7, 64.0),
        lvis_ann(7, 17, 3, 30.0),
        lvis_ann(8, 9, 7, 200.0),
        lvis_ann(9, 9, 2, 5.0),
    ],
}

# Hand-computed for HANDMADE. Rows: categories [2, 3, 5, 7, 11]; columns: images
# [4, 9, 17, 25, 30].
RELEVANT = np.array(
    [
        [1, 1, 0, 0, 0],  # hair_dryer
        [0, 0, 1, 0, 1],  # apple
        [1, 0, 0, 0, 1],  # person
        [0, 1, 1, 0, 0],  # bow
        [0, 0, 0, 0, 0],  # aerosol_can
    ],
    dtype=bool,
)
FEDERATED_IGNORE = np.array(  # neither annotated nor in the image's neg_category_ids
    [
        [0, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
        [1, 0, 1, 1, 0],
    ],
    dtype=bool,
)
MAX_AREA = np.array(
    [
        [10, 5, 0, 0, 0],
        [0, 0, 30, 0, 120],
        [9300, 0, 0, 0, 400],
        [0, 200, 64, 0, 0],
        [0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)


def write_image(path: Path, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 120, 200)).save(path, format="JPEG")


def write_lvis(root: Path, data: dict, layout: str = "coco_root") -> tuple[Path, Path]:
    """Writes the JSON and the images; returns (annotations, data.images).

    ``coco_root``: <root>/coco/{train2017,val2017}/; ``flat``: every file in one folder.
    """
    annotations = root / "lvis_v1_val.json"
    annotations.write_text(json.dumps(data))
    images = root / ("coco" if layout == "coco_root" else "flat")
    for record in data["images"]:
        split, name = record["coco_url"].split("/")[-2:]
        write_image(images / split / name if layout == "coco_root" else images / name)
    return annotations, images


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, Path]:
    return write_lvis(tmp_path, HANDMADE)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random LVIS-format set: 40 images, 30 categories of all frequencies, random
    negative and not-exhaustive lists (consistent with the annotations, as in LVIS)."""
    rng = np.random.default_rng(7)
    categories = [lvis_category(c, f"thing_{c}_(kind)", "rcf"[c % 3]) for c in range(1, 31)]
    images, annotations = [], []
    for image_id in rng.choice(np.arange(1, 500), size=40, replace=False):
        present = rng.choice(np.arange(1, 31), size=rng.integers(0, 5), replace=False)
        absent = np.setdiff1d(np.arange(1, 31), present)
        neg = rng.choice(absent, size=rng.integers(0, 8), replace=False)
        not_exhaustive = present[: rng.integers(0, len(present) + 1)]
        split = "train2017" if image_id % 2 else "val2017"
        images.append(lvis_image(int(image_id), split, neg.tolist(), not_exhaustive.tolist()))
        for c in present:
            for _ in range(rng.integers(1, 4)):
                area = float(rng.uniform(1, 20000))
                annotations.append(lvis_ann(len(annotations) + 1, int(image_id), int(c), area))
    data = {"images": images, "categories": categories, "annotations": annotations}
    return write_lvis(tmp_path_factory.mktemp("lvis"), data)


# --- ground truth -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["handmade", "generated"])
@pytest.mark.parametrize("federated", [True, False])
def test_ground_truth_matches_lvis_api(request, source: str, federated: bool) -> None:
    """Invariant: for every (category, image), relevant == the lvis API finds >= 1
    annotation (get_ann_ids), max_area == the largest of their areas, and ignore ==
    (federated and not relevant and the category is not in the image's
    neg_category_ids from load_imgs); with federated=False nothing is ignored."""
    annotations, images = request.getfixturevalue(source)
    gt = LvisDataset(annotations, images, federated=federated).ground_truth()
    api = LVIS(str(annotations))
    assert list(gt.image_ids) == sorted(api.get_img_ids())
    assert [c.id for c in gt.categories] == sorted(api.get_cat_ids())
    for q, category in enumerate(gt.categories):
        for n, image_id in enumerate(gt.image_ids):
            ids = api.get_ann_ids(img_ids=[int(image_id)], cat_ids=[category.id])
            areas = [a["area"] for a in api.load_anns(ids)]
            (record,) = api.load_imgs([int(image_id)])
            verified_absent = category.id in record["neg_category_ids"]
            assert gt.relevant[q, n] == bool(ids)
            assert gt.max_area[q, n] == pytest.approx(max(areas, default=0.0), rel=1e-6)
            assert gt.ignore[q, n] == (federated and not ids and not verified_absent)
    assert not (gt.ignore & gt.relevant).any()


@pytest.mark.parametrize("federated", [True, False])
def test_ground_truth_by_hand(handmade, federated: bool) -> None:
    """Invariant: the hand-computed relevance, federated ignore mask and areas of
    HANDMADE; the notes say which reading was used and count not-exhaustive pairs."""
    gt = LvisDataset(*handmade, federated=federated).ground_truth()
    assert gt.image_ids.tolist() == [4, 9, 17, 25, 30]
    assert [c.id for c in gt.categories] == [2, 3, 5, 7, 11]
    np.testing.assert_array_equal(gt.relevant, RELEVANT)
    np.testing.assert_array_equal(gt.ignore, FEDERATED_IGNORE if federated else 0)
    np.testing.assert_array_equal(gt.max_area, MAX_AREA)
    assert gt.notes["lvis_federated"] is federated
    assert gt.notes["lvis_ignored_pairs"] == (FEDERATED_IGNORE.sum() if federated else 0)
    assert gt.notes["lvis_not_exhaustive_pairs"] == 2  # (apple, 30), (bow, 9)


def test_not_exhaustive_images_stay_relevant(handmade) -> None:
    """Invariant: a category listed as not exhaustively annotated in an image, with an
    annotation there, is relevant under both readings and never ignored."""
    for federated in (True, False):
        gt = LvisDataset(*handmade, federated=federated).ground_truth()
        apple, img30, bow, img9 = 1, 4, 3, 1
        assert gt.relevant[apple, img30]
        assert gt.relevant[bow, img9]
        assert not gt.ignore[apple, img30]
        assert not gt.ignore[bow, img9]


def test_federated_reading_changes_the_ranking(handmade) -> None:
    """Invariant: federated ignore leaves unverified images out of a category's ranking:
    apple, with its two relevant images ranked below the unverified ones (4, 25) and
    above the verified negative (9), has AP 1 federated and AP (1/3 + 2/4) / 2 when the
    unverified images count as negatives."""
    scores = np.zeros((5, 5), dtype=np.float32)
    scores[1] = [0.9, 0.1, 0.5, 0.8, 0.4]  # images [4, 9, 17, 25, 30]
    results = {}
    for federated in (True, False):
        gt = LvisDataset(*handmade, federated=federated).ground_truth()
        results[federated] = evaluate_rankings(
            scores, gt.relevant, gt.ignore, gt.max_area, gt.image_ids,
            splits=[c.split for c in gt.categories],
        )  # fmt: skip
    assert results[True]["ap"][1] == pytest.approx(1.0)
    assert results[False]["ap"][1] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert results[True]["rare.categories"] == 2
    assert results[True]["rare.categories_skipped"] == 1  # aerosol_can has no image


def test_max_images_restricts_ground_truth(handmade) -> None:
    """Invariant: max_images=N keeps the N smallest ids; the ground truth is the full one
    restricted to them."""
    full = LvisDataset(*handmade).ground_truth()
    part = LvisDataset(*handmade, max_images=3).ground_truth()
    expected = full.select_images(np.array([4, 9, 17]))
    assert part.image_ids.tolist() == [4, 9, 17]
    np.testing.assert_array_equal(part.relevant, expected.relevant)
    np.testing.assert_array_equal(part.ignore, expected.ignore)
    np.testing.assert_array_equal(part.max_area, expected.max_area)


# --- categories and queries ---------------------------------------------------------


def test_categories_splits_and_queries(handmade) -> None:
    """Invariant: frequency r/c/f -> split rare/common/frequent; the query is synonyms[0]
    cleaned (docs/protocol.md), the name stays raw, and data.query_names (keyed by name) wins."""
    dataset = LvisDataset(*handmade, query_names={"person": "human"})
    assert [(c.id, c.name, c.query, c.split) for c in dataset.categories] == [
        (2, "hair_dryer", "hair dryer", "common"),
        (3, "apple", "apple", "frequent"),
        (5, "person", "human", "frequent"),
        (7, "bow_(weapon)", "bow", "rare"),
        (11, "aerosol_can", "aerosol can", "rare"),
    ]


# --- images -------------------------------------------------------------------------


def test_images_from_coco_root(handmade) -> None:
    """Invariant: with data.images at the COCO root, each file is <root>/<split>/<file>
    with the split folder taken from coco_url; items and batches work as for COCO."""
    annotations, images = handmade
    dataset = LvisDataset(annotations, images)
    assert dataset.image_path(30) == images / "train2017" / "000000000030.jpg"
    assert dataset.image_path(4) == images / "val2017" / "000000000004.jpg"
    item = dataset[0]
    assert item["image_id"] == 4
    assert item["pixels"].shape == (3, 10, 12)
    dataset.transform = lambda image: pil_to_uint8_tensor(image.resize((8, 8)))
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=dataset.collate)))
    assert batch["image_ids"].tolist() == [4, 9, 17, 25, 30]
    assert batch["pixels"].shape == (5, 3, 8, 8)
    assert batch["pixels"].dtype == torch.uint8


def test_images_from_val2017_folder(handmade) -> None:
    """Invariant: data.images may be the val2017 folder itself; train2017 images are then
    found in the sibling train2017 folder, and both give the same ground truth."""
    annotations, images = handmade
    dataset = LvisDataset(annotations, images / "val2017")
    assert dataset.image_path(4) == images / "val2017" / "000000000004.jpg"
    assert dataset.image_path(17) == images / "train2017" / "000000000017.jpg"
    np.testing.assert_array_equal(
        dataset.ground_truth().relevant, LvisDataset(annotations, images).ground_truth().relevant
    )


def test_images_from_flat_folder(tmp_path: Path) -> None:
    """Invariant: a folder without split folders is read flat: <images>/<file>."""
    annotations, images = write_lvis(tmp_path, HANDMADE, layout="flat")
    dataset = LvisDataset(annotations, images)
    assert dataset.image_path(30) == images / "000000000030.jpg"
    assert len(dataset) == 5


def test_val2017_only_fails_naming_train2017(handmade) -> None:
    """Invariant: pointing at a val2017 folder without train2017 beside it fails at
    construction with how many files each split misses and the fix (COCO root)."""
    annotations, images = handmade
    for path in (images / "train2017").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError) as info:
        LvisDataset(annotations, images / "val2017")
    message = str(info.value)
    assert "2 of 5 images" in message
    assert "2 from train2017" in message
    assert "COCO root" in message
    assert "data.on_bad_image=skip" in message


def test_skip_policy_lists_missing(handmade) -> None:
    """Invariant: under 'skip' missing files are left out of image_ids and the ground
    truth, and listed in failures_at_start."""
    annotations, images = handmade
    (images / "train2017" / "000000000017.jpg").unlink()
    dataset = LvisDataset(annotations, images, on_bad_image="skip")
    assert dataset.image_ids.tolist() == [4, 9, 25, 30]
    assert dataset.failures_at_start == [
        {
            "image_id": 17,
            "path": str(images / "train2017" / "000000000017.jpg"),
            "reason": "file not found",
        }
    ]
    assert dataset.ground_truth().image_ids.tolist() == [4, 9, 25, 30]


# --- errors, registry, import ---------------------------------------------------------


def _broken(data: dict, change) -> dict:
    data = json.loads(json.dumps(data))
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["images"][0].pop("coco_url"), "coco_url"),
        (lambda d: d.pop("annotations"), "not in LVIS format"),
        (lambda d: d["images"][1].update(neg_category_ids=[99]), r"neg_category_ids .*\[99\]"),
        (lambda d: d["annotations"][0].update(category_id=42), r"category_id .*\[42\]"),
        (lambda d: d["categories"][0].update(frequency="x"), "frequency"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate ids"),
    ],
)
def test_malformed_files(tmp_path: Path, change, expected: str) -> None:
    """Invariant: a file LVIS-shaped in the wrong way fails with what is wrong, never a
    bare KeyError/AssertionError from the lvis package."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(HANDMADE, change)))
    with pytest.raises(ValueError, match=expected):
        LvisDataset(path, tmp_path)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    """Invariant: a missing or non-JSON annotation file names the path and data.annotations."""
    with pytest.raises(FileNotFoundError, match="data.annotations"):
        LvisDataset(tmp_path / "nope.json", tmp_path)
    path = tmp_path / "broken.json"
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        LvisDataset(path, tmp_path)


def test_registry(handmade) -> None:
    """Invariant: 'lvis' is registered, takes the data.* keys the engine passes, and the
    federated keyword the lead wires from protocol.lvis_federated."""
    assert "lvis" in list_datasets()
    annotations, images = handmade
    dataset = create_dataset(
        "lvis",
        annotations=annotations,
        images=images,
        on_bad_image="error",
        include_crowd=True,
        max_images=None,
        query_names=None,
        federated=False,
    )
    assert isinstance(dataset, LvisDataset)
    assert not dataset.ground_truth().ignore.any()


def test_image_root_rule(tmp_path: Path) -> None:
    """Invariant: the COCO root holds split folders; a split folder maps to its parent;
    anything else is flat (None)."""
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    splits = {"train2017", "val2017"}
    assert image_root(tmp_path / "coco", splits) == tmp_path / "coco"
    assert image_root(tmp_path / "coco" / "val2017", splits) == tmp_path / "coco"
    assert image_root(tmp_path, splits) is None


def test_lvis_import_leaves_logging_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: loading the lvis package through the dataset does not configure the root
    logger (lvis calls logging.basicConfig when imported)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    for name in [m for m in sys.modules if m == "lvis" or m.startswith("lvis.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, restored afterwards
    assert _lvis_loader().__module__ == "lvis.lvis"
    assert root.handlers == []
    assert root.level == logging.WARNING
