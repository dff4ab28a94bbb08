"""The synthetic COCO-format generator: deterministic, valid, every size bucket."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from retrieval.data import BadImageError, CocoDataset, load_image
from retrieval.data.synthetic import (
    COLOURS,
    HELD_OUT_PAIRS,
    LARGE_AREA,
    SHAPES,
    SMALL_AREA,
    SyntheticOptions,
    caption,
    main,
    make_synthetic_coco,
    object_phrase,
    pair_name,
    polygon_area,
    render_scene,
    scenes_options,
    size_word,
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
    assert len(first) == 14  # 12 images, annotations.json, the generator's marker
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
        assert x >= 0
        assert y >= 0
        assert x + w <= image["width"]
        assert y + h <= image["height"]
        polygon = np.array(a["segmentation"][0]).reshape(-1, 2)
        np.testing.assert_allclose(
            [x, y, x + w, y + h], [*polygon.min(0), *polygon.max(0)], atol=0.01
        )
        assert 0 < a["area"] <= w * h + 0.01
        assert a["area"] == pytest.approx(polygon_area(polygon), abs=0.01)
        if a["area"] >= 100:
            assert coco.annToMask(a).sum() == pytest.approx(a["area"], rel=0.1)
        assert a["iscrowd"] == 0
        assert a["colour"] in COLOURS


def test_sizes_span_buckets(dataset) -> None:
    """Invariant: default options give small (< 32²), medium and large (>= 96²) objects,
    and 1 to 5 objects per image."""
    data = json.loads(dataset[0].read_text())
    areas = np.array([a["area"] for a in data["annotations"]])
    assert (areas < SMALL_AREA).any()
    assert ((areas >= SMALL_AREA) & (areas < LARGE_AREA)).any()
    assert (areas >= LARGE_AREA).any()
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert counts.min() >= 1
    assert counts.max() <= 5


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
    assert coco.getAnnIds(imgIds=[4])
    assert coco.getAnnIds(imgIds=[5])
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
    assert len(anns) == 4
    assert {a["colour"] for a in anns} == {"red"}


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: the command-line entry writes the dataset and prints where."""
    main([str(tmp_path / "out"), "--num-images", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "annotations.json") in out
    assert len(list((tmp_path / "out" / "images").glob("*.jpg"))) == 2


# ---------------------------------------------------------------- scenes benchmark mode


def test_default_categories_and_captions(dataset) -> None:
    """Invariant: the default (shape) mode lists shapes as before, and every image has one
    caption naming each of its objects by colour and shape."""
    data = json.loads(dataset[0].read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)
    assert "options" not in data["info"]
    names = {c["id"]: c["name"] for c in data["categories"]}
    for image in data["images"]:
        (text,) = image["captions"]
        assert text.startswith("a photo of ")
        assert text.endswith(".")
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert text.count(",") + text.count(" and ") == len(anns) - 1
        for a in anns:
            assert f"{a['colour']} {names[a['category_id']]}" in text


def test_caption_grammar() -> None:
    """Invariant: phrases take the right article and join with commas and one "and"."""
    assert object_phrase("red", "circle") == "a red circle"
    assert object_phrase("orange", "star") == "an orange star"
    assert object_phrase("orange", "star", "small") == "a small orange star"
    assert caption(["a red circle"]) == "a photo of a red circle."
    assert (
        caption(["a red circle", "a blue star", "a green square"], "{}.")
        == "a red circle, a blue star and a green square."
    )
    assert size_word(10, 64 * 64) == "small"
    assert size_word(0.2 * 64 * 64, 64 * 64) == "large"
    assert size_word(0.05 * 64 * 64, 64 * 64) is None


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    options = scenes_options("eval", num_images=24, seed=4)
    return write_synthetic_coco(tmp_path_factory.mktemp("pairs"), options)


def test_colour_shape_categories(pairs_dataset) -> None:
    """Invariant: in colour_shape mode a category is a colour-shape pair (ids colour-major),
    each annotation's category matches its colour and shape, the held-out pairs are
    flagged, and pycocotools loads the file."""
    coco = COCO(str(pairs_dataset[0]))
    cats = [coco.cats[i] for i in sorted(coco.cats)]
    assert len(cats) == len(COLOURS) * len(SHAPES)
    assert cats[0]["name"] == f"{next(iter(COLOURS))} {next(iter(SHAPES))}"
    assert {c["name"] for c in cats if c["held_out"]} == set(HELD_OUT_PAIRS)
    for c in cats:
        assert c["name"] == pair_name(c["colour"], c["shape"])
    for a in coco.dataset["annotations"]:
        assert coco.cats[a["category_id"]]["name"] == f"{a['colour']} {a['shape']}"
    info = coco.dataset["info"]["options"]
    assert info["category_mode"] == "colour_shape"
    assert info["clutter"] > 0


def test_held_out_pairs() -> None:
    """Invariant: one held-out pair per shape and per colour; a training set never draws
    them, an evaluation set does."""
    assert len({p.split()[0] for p in HELD_OUT_PAIRS}) == len(COLOURS)
    assert len({p.split()[1] for p in HELD_OUT_PAIRS}) == len(SHAPES)
    train = scenes_options("train", num_images=400)
    evaluation = scenes_options(
        "eval", num_images=400, image_size=(64, 64), size_mode="log_uniform"
    )
    drawn = {"train": set(), "eval": set()}
    for split, options in (("train", train), ("eval", evaluation)):
        for index in range(1, 401):
            _, objects = render_scene(index, options)
            drawn[split] |= {pair_name(o.colour, o.shape.name) for o in objects}
    assert not drawn["train"] & set(HELD_OUT_PAIRS)
    assert len(drawn["train"]) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)
    assert set(HELD_OUT_PAIRS) <= drawn["eval"]


def test_log_uniform_sizes_on_small_images() -> None:
    """Invariant: log_uniform sizes fit 64x64 training scenes (areas within [min_area,
    cap]) with every shape drawn, where COCO's absolute buckets cannot (no large object
    fits); both small and big objects occur."""
    options = scenes_options("train", num_images=200)
    areas, shapes = [], set()
    for index in range(1, 201):
        _, objects = render_scene(index, options)
        areas += [o.area for o in objects]
        shapes |= {o.shape.name for o in objects}
    areas = np.array(areas)
    cap = options.max_area_fraction * 64 * 64
    assert areas.min() >= options.min_area * 0.99
    assert areas.max() <= cap * 1.01
    assert (areas < 100).any()
    assert (areas > 0.25 * 64 * 64).any()
    assert shapes == set(SHAPES)


def test_clutter_draws_only_background(tmp_path: Path) -> None:
    """Invariant: clutter changes pixels, never the objects or their annotations, and its
    strokes are muted (no saturated vocabulary colour appears off the objects)."""
    plain = SyntheticOptions(num_images=6, image_size=(128, 128), seed=2)
    busy = dataclasses.replace(plain, clutter=12)
    a = json.loads(write_synthetic_coco(tmp_path / "a", plain)[0].read_text())
    b = json.loads(write_synthetic_coco(tmp_path / "b", busy)[0].read_text())
    assert a["annotations"] == b["annotations"]
    assert (tmp_path / "a/images/000000000001.jpg").read_bytes() != (
        tmp_path / "b/images/000000000001.jpg"
    ).read_bytes()
    image, objects = render_scene(1, busy)
    pixels = np.asarray(image, dtype=float)
    mask = Image.new("L", image.size)
    for o in objects:
        ImageDraw.Draw(mask).polygon([tuple(p) for p in o.polygon.tolist()], fill=255)
    off = pixels[np.asarray(mask) == 0]
    saturation = off.max(axis=1) - off.min(axis=1)
    assert np.percentile(saturation, 99.9) < 150  # vocabulary colours span >= 170


def test_scenes_presets_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: the presets are the benchmark's settings; --preset writes them."""
    evaluation, train = scenes_options("eval"), scenes_options("train")
    assert evaluation.image_size == (256, 256)
    assert evaluation.draw_held_out
    assert train.image_size == (64, 64)
    assert not train.draw_held_out
    assert scenes_options("eval", num_images=5, seed=1).num_images == 5
    with pytest.raises(ValueError, match="split"):
        scenes_options("test")
    main([str(tmp_path / "s"), "--preset", "scenes", "--num-images", "3"])
    data = json.loads((tmp_path / "s" / "annotations.json").read_text())
    assert len(data["images"]) == 3
    assert data["images"][0]["width"] == 256
    assert len(data["categories"]) == len(COLOURS) * len(SHAPES)
    assert "--preset" not in capsys.readouterr().err


def test_scene_options_validated() -> None:
    """Invariant: bad modes and held-out pairs fail naming the option."""
    with pytest.raises(ValueError, match="category_mode"):
        SyntheticOptions(category_mode="colour")
    with pytest.raises(ValueError, match="size_mode"):
        SyntheticOptions(size_mode="uniform")
    with pytest.raises(ValueError, match="colour_shape"):
        SyntheticOptions(held_out=("red circle",))
    with pytest.raises(ValueError, match="held_out"):
        SyntheticOptions(category_mode="colour_shape", held_out=("mauve circle",))
    with pytest.raises(ValueError, match="nothing left"):
        SyntheticOptions(
            category_mode="colour_shape",
            colours=("red",),
            categories=("circle",),
            held_out=("red circle",),
            draw_held_out=False,
        )
