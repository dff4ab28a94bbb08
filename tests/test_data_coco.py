"""COCO-format data layer: ground truth, image loading, bad files, config errors, names."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from retrieval.data import (
    BadImageError,
    CocoDataset,
    clean_category_name,
    create_dataset,
    list_datasets,
    load_image,
    query_name,
)
from retrieval.data.base import pil_to_uint8_tensor
from retrieval.data.synthetic import make_synthetic_coco
from retrieval.errors import ConfigError


def resize16(image: Image.Image) -> torch.Tensor:
    return pil_to_uint8_tensor(image.resize((16, 16)))


def write_image(path: Path, size: tuple[int, int] = (12, 10), colour=(200, 50, 50)) -> None:
    Image.new("RGB", size, colour).save(path, format="JPEG")


def write_dataset(root: Path, data: dict) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for record in data["images"]:
        write_image(images / record["file_name"])
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(data))
    return annotations, images


def ann(ann_id: int, image_id: int, category_id: int, area: float, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "area": area,
        "bbox": [0, 0, 2, 2],
        "iscrowd": iscrowd,
        "segmentation": [[0, 0, 2, 0, 2, 2]],
    }


HANDMADE = {
    # Ids out of order on purpose: the dataset must sort them.
    "images": [
        {"id": i, "file_name": f"img{i}.jpg", "width": 12, "height": 10} for i in (5, 2, 9, 7)
    ],
    "categories": [
        {"id": 3, "name": "dog", "supercategory": "animal"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 10, "name": "kite", "supercategory": "sports"},  # never annotated
    ],
    "annotations": [
        ann(1, 5, 1, 50.0),
        ann(2, 5, 1, 400.0, iscrowd=1),  # crowd is the largest person in image 5
        ann(3, 5, 3, 10.5),
        ann(4, 2, 3, 30.0),
        ann(5, 2, 3, 20.0),
        ann(6, 9, 1, 900.0, iscrowd=1),  # image 9 holds a person only as a crowd
        # image 7: no annotations at all
    ],
}


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, Path]:
    return write_dataset(tmp_path, HANDMADE)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_images=12)


# --- ground truth -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["handmade", "synthetic"])
@pytest.mark.parametrize("include_crowd", [True, False])
def test_ground_truth_matches_pycocotools(request, source: str, include_crowd: bool) -> None:
    """Invariant: for every (category, image), relevant == pycocotools finds >= 1 annotation
    (crowd ones only when include_crowd), and max_area == the largest of their areas."""
    annotations, images = request.getfixturevalue(source)
    gt = CocoDataset(annotations, images, include_crowd=include_crowd).ground_truth()
    coco = COCO(str(annotations))
    assert list(gt.image_ids) == sorted(coco.getImgIds())
    assert [c.id for c in gt.categories] == sorted(coco.getCatIds())
    assert gt.relevant.shape == gt.max_area.shape == (len(coco.getCatIds()), len(coco.getImgIds()))
    for q, category in enumerate(gt.categories):
        for n, image_id in enumerate(gt.image_ids):
            ids = coco.getAnnIds(
                imgIds=[int(image_id)],
                catIds=[category.id],
                iscrowd=None if include_crowd else False,
            )
            areas = [a["area"] for a in coco.loadAnns(ids)]
            assert gt.relevant[q, n] == (len(ids) > 0)
            assert gt.max_area[q, n] == pytest.approx(max(areas, default=0.0))
    assert not gt.ignore.any()
    assert gt.notes == {"include_crowd": include_crowd, "area_source": "annotation area"}


def test_ground_truth_crowd_cases_by_hand(handmade) -> None:
    """Invariant: a crowd-only image is relevant only with crowds included, and a crowd
    annotation counts towards max_area only then (hand-checked values)."""
    with_crowd = CocoDataset(*handmade).ground_truth()
    without = CocoDataset(*handmade, include_crowd=False).ground_truth()
    person, img5, img9 = 0, 1, 3  # rows: categories [1, 3, 10]; columns: images [2, 5, 7, 9]
    assert with_crowd.relevant[person, img9]
    assert not without.relevant[person, img9]
    assert with_crowd.max_area[person, img5] == 400.0
    assert without.max_area[person, img5] == 50.0
    kite = 2
    assert not with_crowd.relevant[kite].any()


def test_max_images_keeps_first_ids(handmade) -> None:
    """Invariant: max_images=N keeps the N smallest image ids, and the ground truth is
    the full one restricted to them."""
    full = CocoDataset(*handmade).ground_truth()
    dataset = CocoDataset(*handmade, max_images=2)
    assert dataset.image_ids.tolist() == [2, 5]
    assert len(dataset) == 2
    part = dataset.ground_truth()
    expected = full.select_images(np.array([2, 5]))
    np.testing.assert_array_equal(part.relevant, expected.relevant)
    np.testing.assert_array_equal(part.max_area, expected.max_area)


def test_missing_area_falls_back_to_box(tmp_path: Path) -> None:
    """Invariant: an annotation without 'area' counts with its box area, and notes say so."""
    data = json.loads(json.dumps(HANDMADE))
    del data["annotations"][0]["area"]  # bbox is 2x2
    data["annotations"] = data["annotations"][:1]
    gt = CocoDataset(*write_dataset(tmp_path, data)).ground_truth()
    assert gt.max_area[0, 1] == 4.0  # category 1, image 5
    assert "bbox" in gt.notes["area_source"]


# --- items and batches --------------------------------------------------------------


def test_items_and_collate(handmade) -> None:
    """Invariant: items come in image-id order; without a transform pixels are the exact
    uint8 [3, H, W] image; collate stacks transformed items in order."""
    dataset = CocoDataset(*handmade)
    item = dataset[0]
    assert item["image_id"] == 2
    assert item["error"] is None
    assert item["pixels"].dtype == torch.uint8
    assert item["pixels"].shape == (3, 10, 12)
    assert dataset.image_path(2) == handmade[1] / "img2.jpg"

    dataset.transform = resize16
    loader = DataLoader(dataset, batch_size=3, collate_fn=CocoDataset.collate)
    batches = list(loader)
    assert [b["image_ids"].tolist() for b in batches] == [[2, 5, 7], [9]]
    assert batches[0]["pixels"].shape == (3, 3, 16, 16)
    assert batches[0]["image_ids"].dtype == torch.int64
    assert all(b["failures"] == [] for b in batches)


def test_collate_rejects_mixed_sizes(tmp_path: Path) -> None:
    """Invariant: untransformed images of different sizes fail with the fix, not a torch error."""
    annotations, images = write_dataset(tmp_path, HANDMADE)
    write_image(images / "img5.jpg", size=(20, 10))
    dataset = CocoDataset(annotations, images)
    with pytest.raises(ValueError, match="transform"):
        CocoDataset.collate([dataset[0], dataset[1]])


def test_exif_orientation_applied(tmp_path: Path) -> None:
    """Invariant: a JPEG stored 40x20 with EXIF orientation 6 (rotate 90) loads as 20x40."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (10, 200, 10)).save(path, format="JPEG", exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (40, 20)
    assert load_image(path).size == (20, 40)
    assert load_image(path).mode == "RGB"


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    """Invariant: greyscale and RGBA files come back as RGB."""
    for mode in ("L", "RGBA", "P"):
        path = tmp_path / f"{mode}.png"
        Image.new(mode, (5, 4)).save(path)
        assert load_image(path).mode == "RGB"


# --- bad files ----------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, Path]:
    """The hand-made dataset with image 5 corrupt and image 9 missing."""
    annotations, images = write_dataset(tmp_path, HANDMADE)
    (images / "img5.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "img9.jpg").unlink()
    return annotations, images


def test_corrupt_image_error_policy(broken) -> None:
    """Invariant: under 'error' a corrupt file raises BadImageError naming the file and the fix."""
    annotations, images = broken
    (images / "img5.jpg").write_bytes(b"garbage")
    write_image(images / "img9.jpg")
    dataset = CocoDataset(annotations, images)
    with pytest.raises(BadImageError) as info:
        dataset[1]
    message = str(info.value)
    assert str(images / "img5.jpg") in message
    assert "data.on_bad_image=skip" in message
    assert info.value.path == images / "img5.jpg"


def test_missing_image_error_policy(broken) -> None:
    """Invariant: under 'error' missing files fail at construction, with their count,
    their paths and the config keys to fix."""
    annotations, images = broken
    with pytest.raises(FileNotFoundError) as info:
        CocoDataset(annotations, images)
    message = str(info.value)
    assert "1 of 4 images" in message
    assert str(images / "img9.jpg") in message
    assert "data.images" in message
    assert "data.on_bad_image=skip" in message


def test_bad_images_skip_policy(broken) -> None:
    """Invariant: under 'skip' a missing file is left out up front and listed in
    failures_at_start; a corrupt one yields pixels=None with the reason, and collate drops
    it and reports it; the good images still batch."""
    annotations, images = broken
    dataset = CocoDataset(annotations, images, transform=resize16, on_bad_image="skip")
    assert dataset.failures_at_start == [
        {"image_id": 9, "path": str(images / "img9.jpg"), "reason": "file not found"}
    ]
    assert dataset.image_ids.tolist() == [2, 5, 7]
    assert dataset.ground_truth().image_ids.tolist() == [2, 5, 7]

    item = dataset[1]
    assert item["image_id"] == 5
    assert item["pixels"] is None
    assert item["error"]

    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=CocoDataset.collate)))
    assert batch["image_ids"].tolist() == [2, 7]
    assert batch["pixels"].shape == (2, 3, 16, 16)
    (failure,) = batch["failures"]
    assert failure["image_id"] == 5
    assert failure["path"] == str(images / "img5.jpg")
    assert failure["reason"] == item["error"]

    only_bad = CocoDataset.collate([item])
    assert only_bad["pixels"] is None
    assert only_bad["image_ids"].shape == (0,)


def test_bad_image_error_pickles() -> None:
    """Invariant: BadImageError survives pickling (DataLoader workers send it to the main
    process) with its path and reason."""
    err = pickle.loads(pickle.dumps(BadImageError("/x/y.jpg", "truncated")))
    assert err.path == Path("/x/y.jpg")
    assert err.reason == "truncated"
    assert "/x/y.jpg" in str(err)


# --- configuration errors -----------------------------------------------------------


def test_missing_annotations_file(tmp_path: Path) -> None:
    """Invariant: a missing annotation file names the path and data.annotations."""
    with pytest.raises(FileNotFoundError, match="data.annotations") as info:
        CocoDataset(tmp_path / "nope.json", tmp_path)
    assert str(tmp_path / "nope.json") in str(info.value)


def test_invalid_json(tmp_path: Path) -> None:
    """Invariant: a file that is not JSON names the path and data.annotations."""
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        CocoDataset(path, tmp_path)
    assert str(path) in str(info.value)
    assert "data.annotations" in str(info.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"images": []}, "'categories'"),
        ({"categories": [], "annotations": []}, "'images'"),
        ([1, 2], "not an object"),
        ({"images": [{"id": 1}], "categories": []}, "file_name"),
        ({"images": {}, "categories": []}, "must be a list"),
    ],
)
def test_malformed_annotations(tmp_path: Path, data, expected: str) -> None:
    """Invariant: JSON without the COCO structure fails with what is missing and the key."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=expected) as info:
        CocoDataset(path, tmp_path)
    assert "data.annotations" in str(info.value)


def test_annotation_with_unknown_category(tmp_path: Path) -> None:
    """Invariant: an annotation pointing at an unlisted category is reported, not dropped."""
    data = json.loads(json.dumps(HANDMADE))
    data["annotations"].append(ann(99, 2, 42, 1.0))
    with pytest.raises(ValueError, match=r"category_id values not in 'categories': \[42\]"):
        CocoDataset(*write_dataset(tmp_path, data))


def test_missing_images_folder(tmp_path: Path) -> None:
    """Invariant: a missing images folder names the path and data.images."""
    annotations, _ = write_dataset(tmp_path, HANDMADE)
    with pytest.raises(FileNotFoundError, match="data.images") as info:
        CocoDataset(annotations, tmp_path / "missing")
    assert str(tmp_path / "missing") in str(info.value)


def test_bad_options(handmade) -> None:
    """Invariant: option values outside their domain fail with the config key."""
    with pytest.raises(ValueError, match="data.on_bad_image"):
        CocoDataset(*handmade, on_bad_image="ignore")
    with pytest.raises(ValueError, match="data.max_images"):
        CocoDataset(*handmade, max_images=0)


# --- names and registry -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "raw", "query"),
    [
        ("coco", "traffic light", "traffic light"),
        ("coco", "hot_dog", "hot_dog"),
        ("lvis", "bow_(weapon)", "bow"),
        ("lvis", "hair_dryer", "hair dryer"),
        ("lvis", "bow_(decorative_ribbons)", "bow"),
        ("lvis", "Bible", "Bible"),
        ("nuimages", "vehicle.car", "car"),
        ("nuimages", "human.pedestrian.adult", "adult pedestrian"),
        ("nuimages", "movable_object.barrier", "barrier"),
        ("nuimages", "vehicle.bus.rigid", "rigid bus"),
        ("nuimages", "static_object.bicycle_rack", "bicycle rack"),
        ("nuimages", "animal", "animal"),
    ],
)
def test_clean_category_name(dataset: str, raw: str, query: str) -> None:
    """Invariant: the docs/protocol.md cleaning rules, on its examples and a few more."""
    assert clean_category_name(raw, dataset) == query


def test_query_name_mapping_overrides() -> None:
    """Invariant: a user mapping wins for the names it lists; the rule does the rest."""
    mapping = {"movable_object.trafficcone": "traffic cone"}
    assert query_name("movable_object.trafficcone", "nuimages", mapping) == "traffic cone"
    assert query_name("vehicle.car", "nuimages", mapping) == "car"
    assert query_name("vehicle.car", "nuimages") == "car"
    with pytest.raises(ValueError, match="lvis"):
        clean_category_name("car", "kitti")


def test_dataset_query_names(handmade) -> None:
    """Invariant: CocoDataset's categories carry raw names and (overridable) queries."""
    dataset = CocoDataset(*handmade, query_names={"dog": "puppy"})
    assert [(c.id, c.name, c.query) for c in dataset.categories] == [
        (1, "person", "person"),
        (3, "dog", "puppy"),
        (10, "kite", "kite"),
    ]


def test_registry(handmade) -> None:
    """Invariant: 'coco' is registered and builds a CocoDataset; typos get a did-you-mean."""
    assert "coco" in list_datasets()
    annotations, images = handmade
    dataset = create_dataset("coco", annotations=annotations, images=images, max_images=1)
    assert isinstance(dataset, CocoDataset)
    assert len(dataset) == 1
    with pytest.raises(ConfigError, match="Did you mean 'coco'"):
        create_dataset("cocoo")
    with pytest.raises(ConfigError, match="Did you mean 'max_images'"):
        create_dataset("coco", annotations=annotations, images=images, max_image=3)
