"""The synthetic COCO-format generator: deterministic, valid, every size bucket."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from retrieval.data import BadImageError, CocoDataset, load_image
from retrieval.data.synthetic import (
    COLOURS,
    LARGE_AREA,
    SHAPES,
    SMALL_AREA,
    SyntheticOptions,
    main,
    make_synthetic_coco,
    polygon_area,
    write_synthetic_coco,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_synthetic_coco(tmp_path_factory.mktemp("syn"), num_images=12, seed=0)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic(tmp_path: Path, dataset) -> None:
    """Invariant: the same seed writes byte-identical files; another seed does not."""
    make_synthetic_coco(tmp_path / "again", num_images=12, seed=0)
    first = files(dataset[0].parent)
    assert first == files(tmp_path / "again")
    assert len(first) == 13
    make_synthetic_coco(tmp_path / "other", num_images=12, seed=1)
    assert files(tmp_path / "other")["annotations.json"] != first["annotations.json"]


def test_image_independent_of_count(tmp_path: Path) -> None:
    """Invariant: image i depends on (seed, i) only, not on how many images are made."""
    _, few = make_synthetic_coco(tmp_path / "few", num_images=2)
    _, many = make_synthetic_coco(tmp_path / "many", num_images=4)
    for name in ("000000000001.jpg", "000000000002.jpg"):
        assert (few / name).read_bytes() == (many / name).read_bytes()


def test_valid_coco(dataset) -> None:
    """Invariant: pycocotools loads it; every bbox lies in its image and equals the
    segmentation polygon's bounds; area is the polygon's area and agrees with the
    rasterised mask; every object's colour is a palette name."""
    annotations, images = dataset
    coco = COCO(str(annotations))
    assert sorted(coco.getImgIds()) == list(range(1, 13))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(SHAPES)
    for a in coco.dataset["annotations"]:
        image = coco.imgs[a["image_id"]]
        assert (images / image["file_name"]).is_file()
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
        polygon = np.array(a["segmentation"][0]).reshape(-1, 2)
        np.testing.assert_allclose(
            [x, y, x + w, y + h], [*polygon.min(0), *polygon.max(0)], atol=0.01
        )
        assert 0 < a["area"] <= w * h + 0.01
        assert a["area"] == pytest.approx(polygon_area(polygon), abs=0.01)
        if a["area"] >= 100:
            assert coco.annToMask(a).sum() == pytest.approx(a["area"], rel=0.1)
        assert a["iscrowd"] == 0 and a["colour"] in COLOURS


def test_sizes_span_buckets(dataset) -> None:
    """Invariant: default options give small (< 32²), medium and large (>= 96²) objects,
    and 1 to 5 objects per image."""
    data = json.loads(dataset[0].read_text())
    areas = np.array([a["area"] for a in data["annotations"]])
    assert (areas < SMALL_AREA).any()
    assert ((areas >= SMALL_AREA) & (areas < LARGE_AREA)).any()
    assert (areas >= LARGE_AREA).any()
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert counts.min() >= 1 and counts.max() <= 5


def test_large_objects_need_room(tmp_path: Path) -> None:
    """Invariant: with a shape that cannot reach 96² px in 160x128 (a star), a larger
    image size gives a large object; the small size keeps every object inside."""
    small, _ = make_synthetic_coco(tmp_path / "s", num_images=3, categories=["star"])
    big, _ = make_synthetic_coco(
        tmp_path / "b", num_images=3, image_size=(320, 240), categories=["star"]
    )
    small_areas = [a["area"] for a in json.loads(small.read_text())["annotations"]]
    big_areas = [a["area"] for a in json.loads(big.read_text())["annotations"]]
    assert max(small_areas) < LARGE_AREA <= max(big_areas)


def test_objects_drawn_in_their_colour(dataset) -> None:
    """Invariant: the pixels inside an unoccluded object (eroded mask) are its colour."""
    annotations, images = dataset
    coco = COCO(str(annotations))
    checked = 0
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        pixels = np.asarray(load_image(images / coco.imgs[image_id]["file_name"]), dtype=float)
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        for k, a in enumerate(anns):
            others = np.any([m for j, m in enumerate(masks) if j != k], axis=0)
            inside = masks[k] & ~others
            for axis in (0, 1):
                for step in (-2, 2):
                    inside &= np.roll(masks[k], step, axis=axis)
            if inside.sum() < 30:
                continue
            mean = pixels[inside].mean(axis=0)
            assert np.abs(mean - COLOURS[a["colour"]]).max() < 25, (image_id, a["id"])
            checked += 1
    assert checked >= 10


def test_bad_images(tmp_path: Path) -> None:
    """Invariant: bad_images adds annotated images (ids after the good ones) whose files
    fail to load; CocoDataset under 'skip' reports exactly those."""
    annotations, images = make_synthetic_coco(tmp_path, num_images=3, bad_images=2)
    coco = COCO(str(annotations))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5]
    assert coco.getAnnIds(imgIds=[4]) and coco.getAnnIds(imgIds=[5])
    for image_id in (4, 5):
        with pytest.raises(BadImageError):
            load_image(images / coco.imgs[image_id]["file_name"])
    data = CocoDataset(annotations, images, on_bad_image="skip")
    errors = {data[i]["image_id"]: data[i]["error"] for i in range(len(data))}
    assert [i for i, e in errors.items() if e] == [4, 5]
    assert "truncated" in errors[4]


def test_options_validated() -> None:
    """Invariant: unknown shapes or colours fail with the known ones listed."""
    with pytest.raises(ValueError, match="circle"):
        SyntheticOptions(categories=("circle", "blob"))
    with pytest.raises(ValueError, match="red"):
        SyntheticOptions(colours=("mauve",))


def test_options_extend(tmp_path: Path) -> None:
    """Invariant: write_synthetic_coco honours options the short form does not expose."""
    options = SyntheticOptions(num_images=2, colours=("red",), objects_per_image=(2, 2))
    annotations, _ = write_synthetic_coco(tmp_path, options)
    anns = json.loads(annotations.read_text())["annotations"]
    assert len(anns) == 4 and {a["colour"] for a in anns} == {"red"}


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: the command-line entry writes the dataset and prints where."""
    main([str(tmp_path / "out"), "--num-images", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "annotations.json") in out
    assert len(list((tmp_path / "out" / "images").glob("*.jpg"))) == 2
