"""Issue 15, data side: image paths confined to their roots, every PIL mode loaded as
8-bit RGB, wrong annotations refused (never scored), and bad annotations found before
any model is built. One test per class, each stating its invariant."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_data_lvis import HANDMADE as LVIS_HANDMADE

from retrieval.data import download as dl
from retrieval.data.coco import CocoDataset
from retrieval.data.images import BadImageError, load_image, to_rgb8
from retrieval.data.listfile import ListDataset
from retrieval.data.lvis import LvisDataset
from retrieval.errors import DataError, RetrievalError


def _coco(file_names: list[str]) -> dict:
    return {
        "images": [{"id": k + 1, "file_name": name} for k, name in enumerate(file_names)],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 10 + k, "image_id": k + 1, "category_id": 1, "bbox": [0, 0, 2, 3], "area": 6}
            for k in range(len(file_names))
        ],
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


def test_image_paths_never_leave_the_image_root(tmp_path: Path) -> None:
    """Invariant: every image path is read only when it resolves (after '..' and
    symlinks) inside the dataset's image root(s); otherwise a counted skip with the
    reason under on_bad_image=skip, a DataError naming the entry and the root under
    error. Holds for COCO file_name, LVIS coco_url, list files with data.images, a
    symlink swapped in after construction, and `data download` (http(s) only, inside
    the root)."""
    images = tmp_path / "images"
    _jpeg(images / "good.jpg")
    outside = _jpeg(tmp_path / "elsewhere" / "secret.jpg")
    (images / "link.jpg").symlink_to(outside)
    escapes = ["../elsewhere/secret.jpg", str(outside), "link.jpg"]
    ann = _write(tmp_path / "a.json", _coco(["good.jpg", *escapes]))

    with pytest.raises(DataError) as info:
        CocoDataset(ann, images)
    message = str(info.value)
    assert "3 image paths" in message
    assert "outside the image root" in message
    assert "../elsewhere/secret.jpg" in message
    assert str(images.resolve()) in message

    skipping = CocoDataset(ann, images, on_bad_image="skip")
    assert skipping.image_ids.tolist() == [1]
    assert [f["image_id"] for f in skipping.failures_at_start] == [2, 3, 4]
    assert all("outside the image root" in f["reason"] for f in skipping.failures_at_start)

    # checked again at read time: a file replaced by a symlink out after construction
    (images / "good.jpg").unlink()
    (images / "good.jpg").symlink_to(outside)
    item = skipping[0]
    assert item["pixels"] is None
    assert "outside the image root" in item["error"]
    skipping.on_bad_image = "error"
    with pytest.raises(BadImageError, match="outside the image root"):
        skipping[0]

    # LVIS: a coco_url whose split is '..' cannot lead out of the split folders
    lvis = json.loads(json.dumps(LVIS_HANDMADE))
    lvis["images"][0]["coco_url"] = "http://x/../secret.jpg"
    coco_root = tmp_path / "coco"
    for record in lvis["images"][1:]:
        split, name = record["coco_url"].split("/")[-2:]
        _jpeg(coco_root / split / name)
    (coco_root / "secret.jpg").write_bytes(outside.read_bytes())
    with pytest.raises(DataError, match="outside the image root"):
        LvisDataset(_write(tmp_path / "lvis.json", lvis), coco_root)

    # list files: with data.images given, a listed path outside it is refused / skipped
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\ngood2.jpg\n{outside}\n")
    _jpeg(images / "good2.jpg")
    with pytest.raises(DataError, match="outside the image root"):
        ListDataset(str(listing), images=str(images), on_bad_image="error")
    listed = ListDataset(str(listing), images=str(images), on_bad_image="skip")
    assert len(listed.image_ids) == 1
    assert "outside the image root" in listed.failures_at_start[0]["reason"]

    # data download: only http(s), only inside the images root
    for url in ("file:///etc/passwd", "http://x/../../evil.jpg"):
        bad = {"images": [{"coco_url": url}]}
        with pytest.raises(dl.DownloadError, match="fix the entry"):
            dl.lvis_image_files(_write(tmp_path / "dl.json", bad), tmp_path / "root" / "coco")
    with pytest.raises(dl.DownloadError, match="only http"):
        dl.fetch_file("file:///etc/passwd", tmp_path / "root" / "x")


def _modes() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """mode -> (an image in that mode, the 8-bit grey or RGB NumPy expectation)."""
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 65536, (4, 5)).astype(np.uint16)
    i32 = rng.integers(-5000, 100000, (4, 5)).astype(np.int32)
    i16_in_i = rng.integers(0, 65536, (4, 5)).astype(np.int32)
    f01 = rng.random((4, 5)).astype(np.float32)
    fwide = (rng.random((4, 5)) * 3000 - 1000).astype(np.float32)
    rgba = rng.integers(0, 256, (4, 5, 4)).astype(np.uint8)
    la = rng.integers(0, 256, (4, 5, 2)).astype(np.uint8)
    bits = rng.random((4, 5)) > 0.5
    stretch = lambda a: np.rint((a - a.min()) * (255 / (a.max() - a.min())))  # noqa: E731
    return {
        "I;16": (Image.frombytes("I;16", (5, 4), u16.astype("<u2").tobytes()), u16 >> 8),
        "I;16B": (Image.frombytes("I;16B", (5, 4), u16.astype(">u2").tobytes()), u16 >> 8),
        "I;16L": (Image.frombytes("I;16L", (5, 4), u16.astype("<u2").tobytes()), u16 >> 8),
        "I": (Image.fromarray(i32, "I"), stretch(i32.astype(np.float64))),
        "I-16bit": (Image.fromarray(i16_in_i, "I"), i16_in_i >> 8),
        "F": (Image.fromarray(f01, "F"), np.rint(f01.astype(np.float64) * 255)),
        "F-wide": (Image.fromarray(fwide, "F"), stretch(fwide.astype(np.float64))),
        "1": (Image.fromarray(bits).convert("1"), bits * 255),
        "L": (Image.fromarray(la[..., 0], "L"), la[..., 0]),
        "LA": (Image.fromarray(la, "LA"), la[..., 0]),
        "RGBA": (Image.fromarray(rgba, "RGBA"), rgba[..., :3]),
        "CMYK": (
            Image.fromarray(rgba, "CMYK"),
            np.rint((255 - rgba[..., :3].astype(int)) * (255 - rgba[..., 3:].astype(int)) / 255),
        ),
        "P": (Image.fromarray(la[..., 0], "L").convert("P"), None),
        "PA": (Image.fromarray(la[..., 0], "L").convert("PA"), None),
        "La": (Image.fromarray(la, "LA").convert("La"), None),
        "RGBa": (Image.fromarray(rgba, "RGBA").convert("RGBa"), None),
        "LAB": (Image.new("LAB", (5, 4), (128, 128, 128)), None),
    }


@pytest.mark.parametrize("name", list(_modes()))
def test_every_pil_mode_loads_as_8bit_rgb(tmp_path: Path, name: str) -> None:
    """Invariant: load_image gives 8-bit RGB for every mode PIL returns, with deep
    samples scaled (16-bit >> 8; I and F by the documented rule), never clipped to
    white; checked against a NumPy expectation, through a file where a format can
    hold the mode (PNG / TIFF) and through to_rgb8 otherwise."""
    image, expected = _modes()[name]
    mode = image.mode
    for suffix in (".png", ".tiff"):
        path = tmp_path / f"x{suffix}"
        try:
            image.save(path)
        except (OSError, ValueError, KeyError):
            continue
        with Image.open(path) as reopened:
            if reopened.mode == mode:
                got = np.asarray(load_image(path))
                break
    else:
        got = np.asarray(to_rgb8(image))
    assert got.dtype == np.uint8
    assert got.shape == (4, 5, 3)
    if expected is None:  # palette / premultiplied / LAB: PIL's own colour result
        reference = {
            "P": lambda: image.convert("RGB"),
            "PA": lambda: image.convert("RGB"),
            "La": lambda: image.convert("LA").convert("RGB"),
            "RGBa": lambda: image.convert("RGBA").convert("RGB"),
            "LAB": lambda: Image.new("RGB", (5, 4), (119, 119, 119)),
        }[mode]()
        tolerance = 2 if mode == "LAB" else 0
        assert np.abs(got.astype(int) - np.asarray(reference, dtype=int)).max() <= tolerance
        return
    expected = np.asarray(expected, dtype=np.uint8)
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=2)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["annotations"][0].update(bbox=[0, 0, -2, 3]), "annotations[0] (id 10)"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, 2]), "has bbox [0, 0, 2]"),
        (lambda d: d["annotations"][0].update(bbox=[0, "a", 2, 2]), "bbox"),
        (lambda d: d["annotations"][0].update(bbox=None, area=-1), "has area -1"),
        (lambda d: d["categories"][0].update(name=""), "categories[0] (id 1) has name ''"),
        (lambda d: d["categories"][0].update(name="   "), "has name '   '"),
        (lambda d: d["categories"][0].update(name=7), "has name 7"),
        (lambda d: d["images"][0].update(id=2**63), "ids must be integers"),
        (lambda d: d["annotations"][0].update(image_id=-(2**64)), "image_id"),
        (lambda d: d["images"].clear(), "'images' is empty"),
        (lambda d: d["categories"].clear(), "'categories' is empty"),
    ],
)
def test_wrong_annotations_are_refused_with_the_entry_named(
    tmp_path: Path, change, named: str
) -> None:
    """Invariant: an annotation file whose entries are wrong but parseable (negative,
    short or non-numeric bbox; negative area without a box; empty, blank or non-string
    category name; an id outside int64; no images or no categories) is refused with a
    DataError naming the file and the entry, never scored as if valid; a negative or
    non-numeric area with a valid bbox is recomputed from it with a warning."""
    data = _coco(["a.jpg"])
    change(data)
    images = tmp_path / "images"
    _jpeg(images / "a.jpg")
    ann = _write(tmp_path / "a.json", data)
    with pytest.raises(DataError) as info:
        CocoDataset(ann, images)
    assert named in str(info.value)
    assert str(ann) in str(info.value)


def test_bad_area_is_recomputed_from_the_box(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant: a negative or non-numeric area is replaced by the valid bbox's
    width * height, with a warning, so the s-m split never sees it."""
    data = _coco(["a.jpg", "b.jpg"])
    data["annotations"][0]["area"] = -5
    data["annotations"][1]["area"] = "big"
    images = tmp_path / "images"
    _jpeg(images / "a.jpg")
    _jpeg(images / "b.jpg")
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        truth = CocoDataset(_write(tmp_path / "a.json", data), images).ground_truth()
    assert truth.max_area.tolist() == [[6.0, 6.0]]
    assert "2 annotations have a negative or non-numeric 'area'" in caplog.text


def test_bad_annotations_fail_before_the_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: build_parts builds (and so checks) the dataset before the retriever:
    annotations with 0 images stop the run with a DataError and no model is loaded."""
    from retrieval.config import load_config
    from retrieval.engine import parts

    ann = _write(tmp_path / "a.json", {"images": [], "categories": [{"id": 1, "name": "x"}]})
    (tmp_path / "images").mkdir()
    built = []
    monkeypatch.setattr(parts, "build_retriever", lambda cfg: built.append(cfg))
    cfg = load_config("demo", [f"data.annotations={ann}", f"data.images={tmp_path / 'images'}"])
    with pytest.raises(DataError, match="'images' is empty"):
        parts.build_parts(cfg)
    assert not built


# -- fuzz: COCO-format annotation dicts -------------------------------------------------

_JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=5,
)
_ID = st.integers(min_value=-2, max_value=4) | _JUNK
_NUMBER = st.integers(min_value=-5, max_value=50) | st.floats(min_value=-5, max_value=50) | _JUNK


_FIELDS = {
    "images": ["id", "file_name", "width", "height"],
    "categories": ["id", "name", "supercategory"],
    "annotations": ["id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"],
}
_VALUES = (
    _JUNK
    | _ID
    | _NUMBER
    | st.sampled_from(["a.jpg", "b.png", "gone.jpg", "../a.jpg", "/etc/passwd", "", " "])
    | st.lists(_NUMBER, min_size=0, max_size=5)
)


@st.composite
def _annotations(draw: st.DrawFn) -> object:
    """A valid COCO document over a.jpg/b.png, then 0-3 random breakages: a field set to
    a value of any type, a field or entry dropped, an entry or section replaced by junk
    (so most examples get past the first checks and reach the deeper ones)."""
    n_images = draw(st.integers(1, 3))
    n_categories = draw(st.integers(1, 2))
    doc: dict = {
        "images": [
            {"id": k + 1, "file_name": ["a.jpg", "b.png"][k % 2], "width": 4, "height": 4}
            for k in range(n_images)
        ],
        "categories": [{"id": k + 1, "name": f"thing{k}"} for k in range(n_categories)],
        "annotations": [
            {
                "id": 100 + k,
                "image_id": draw(st.integers(1, n_images)),
                "category_id": draw(st.integers(1, n_categories)),
                "bbox": [0, 0, draw(st.integers(0, 4)), draw(st.integers(0, 4))],
                "area": draw(st.integers(0, 16)),
                "iscrowd": draw(st.sampled_from([0, 1])),
            }
            for k in range(draw(st.integers(0, 4)))
        ],
    }
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from([*_FIELDS, "top"]))
        how = draw(st.sampled_from(["set", "set", "set", "drop", "entry", "section"]))
        if section == "top":
            doc[draw(st.sampled_from(["images", "categories", "annotations", "info"]))] = draw(
                _VALUES
            )
            continue
        entries = doc.get(section)
        if how == "section" or not isinstance(entries, list) or not entries:
            doc[section] = draw(_VALUES)
            continue
        k = draw(st.integers(0, len(entries) - 1))
        if how == "entry" or not isinstance(entries[k], dict):
            entries[k] = draw(_VALUES)
        elif how == "drop":
            entries[k].pop(draw(st.sampled_from(_FIELDS[section])), None)
        else:
            entries[k][draw(st.sampled_from(_FIELDS[section]))] = draw(_VALUES)
    return draw(st.just(doc) | _JUNK) if draw(st.integers(0, 20)) == 0 else doc


_ANNOTATIONS = _annotations()


@settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=_ANNOTATIONS, policy=st.sampled_from(["skip", "error"]))
def test_fuzz_coco_annotations_fail_only_with_named_errors(
    tmp_path: Path, data: object, policy: str
) -> None:
    """Invariant: any JSON annotation file, valid-ish or broken in any field and type,
    either builds a dataset (whose ground truth and first item can be read) or raises a
    RetrievalError with a message -- never another exception."""
    from retrieval.factory import create_dataset

    images = tmp_path / "images"
    if not images.is_dir():
        _jpeg(images / "a.jpg")
        Image.new("RGB", (5, 4), (1, 2, 3)).save(images / "b.png")
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(data))
    message = None
    try:
        dataset = create_dataset("coco", annotations=ann, images=images, on_bad_image=policy)
        dataset.ground_truth()  # type: ignore[attr-defined]
        if len(dataset):
            dataset[0]
    except RetrievalError as err:
        message = str(err)
    assert message is None or message.strip()
