"""nuImages data layer: key frames only, object relevance, box areas, class names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data import clean_category_name, create_dataset, list_datasets
from retrieval.data.nuimages import (
    SURFACE_CATEGORIES,
    NuImagesDataset,
    default_query_names,
)
from retrieval.errors import ConfigError

OBJECT_CLASSES = (
    "animal",
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.barrier",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "movable_object.trafficcone",
    "static_object.bicycle_rack",
    "vehicle.bicycle",
    "vehicle.bus.bendy",
    "vehicle.bus.rigid",
    "vehicle.car",
    "vehicle.construction",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
    "vehicle.motorcycle",
    "vehicle.trailer",
    "vehicle.truck",
)
"""nuImages v1.0's 23 object classes (nuScenes' classes)."""


def token(kind: str, k: int) -> str:
    """A 32-hex token like nuImages', distinct per (kind, k), in no particular order."""
    return hashlib.md5(f"{kind}-{k}".encode()).hexdigest()


class Tables:
    """Builds a nuImages version folder + dataroot: tables, key frames, sweeps, lidar."""

    def __init__(self, categories: tuple[str, ...]) -> None:
        self.category = [
            {"token": token("cat", k), "name": name, "description": f"{name} things"}
            for k, name in enumerate(categories)
        ]
        self.sample: list[dict] = []
        self.sample_data: list[dict] = []
        self.object_ann: list[dict] = []
        self.surface_ann: list[dict] = []

    def cat(self, name: str) -> str:
        return next(c["token"] for c in self.category if c["name"] == name)

    def add_sample(self, k: int, camera: str = "CAM_FRONT") -> str:
        """A sample: its key camera frame, two camera sweeps and a lidar key frame.

        Returns the key camera frame's sample_data token.
        """
        key, lidar = token("sd", k), token("lidar", k)
        stem = f"n008-2018-08-01-15-16-36-0400__{camera}__{1533151603512404 + k}"
        records = [
            (key, True, f"samples/{camera}/{stem}.jpg", "jpg"),
            (token("sweep-a", k), False, f"sweeps/{camera}/{stem}1.jpg", "jpg"),
            (token("sweep-b", k), False, f"sweeps/{camera}/{stem}2.jpg", "jpg"),
            (lidar, True, f"samples/LIDAR_TOP/{stem}.pcd.bin", "pcd"),
        ]
        for sd_token, is_key, filename, fileformat in records:
            self.sample_data.append(
                {
                    "token": sd_token,
                    "sample_token": token("sample", k),
                    "ego_pose_token": token("ego", k),
                    "calibrated_sensor_token": token("calib", 0),
                    "filename": filename,
                    "fileformat": fileformat,
                    "width": 16,
                    "height": 9,
                    "timestamp": 1533151603512404 + k,
                    "is_key_frame": is_key,
                    "next": "",
                    "prev": "",
                }
            )
        self.sample.append(
            {
                "token": token("sample", k),
                "timestamp": 1533151603512404 + k,
                "log_token": token("log", 0),
                "key_camera_token": key,
                "key_lidar_token": lidar,
            }
        )
        return key

    def add_object(self, frame: str, category: str, box: tuple[int, int, int, int]) -> None:
        self.object_ann.append(
            {
                "token": token("obj", len(self.object_ann)),
                "sample_data_token": frame,
                "category_token": self.cat(category),
                "attribute_tokens": [],
                "bbox": list(box),
                "mask": {"size": [9, 16], "counts": "abc"},
            }
        )

    def write(self, root: Path, version: str = "v1.0-val") -> tuple[Path, Path]:
        """Tables under <root>/<version>/, image files for camera frames (key and sweep)."""
        folder = root / version
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("category", "sample", "sample_data", "object_ann", "surface_ann"):
            (folder / f"{name}.json").write_text(json.dumps(getattr(self, name)))
        for record in self.sample_data:
            if record["fileformat"] == "jpg":
                path = root / record["filename"]
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 9), (90, 90, 90)).save(path, format="JPEG")
        return folder, root


CLASSES = (
    "animal",
    "human.pedestrian.adult",
    "movable_object.trafficcone",
    "vehicle.car",
    "vehicle.emergency.ambulance",
    "flat.driveable_surface",
    "vehicle.ego",
)


def handmade_tables() -> tuple[Tables, list[str]]:
    """Four samples; objects on three of them; surface masks on the fourth."""
    t = Tables(CLASSES)
    frames = [t.add_sample(k, camera) for k, camera in enumerate(
        ("CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT", "CAM_FRONT")
    )]  # fmt: skip
    t.add_object(frames[0], "vehicle.car", (0, 0, 10, 5))  # area 50
    t.add_object(frames[0], "vehicle.car", (2, 2, 14, 8))  # area 72: the largest car
    t.add_object(frames[0], "human.pedestrian.adult", (1, 1, 3, 7))  # 12
    t.add_object(frames[1], "movable_object.trafficcone", (5, 5, 6, 8))  # 3
    t.add_object(frames[2], "vehicle.emergency.ambulance", (0, 0, 16, 9))  # 144
    t.add_object(frames[2], "vehicle.car", (0, 0, 4, 4))  # 16
    t.surface_ann.append(
        {"token": "s1", "sample_data_token": frames[3], "category_token": t.cat("vehicle.ego")}
    )
    return t, frames


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    tables, frames = handmade_tables()
    return (*tables.write(tmp_path), frames)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """30 samples over the 23 object classes (+ surface classes), random boxes."""
    rng = np.random.default_rng(3)
    t = Tables(OBJECT_CLASSES + SURFACE_CATEGORIES)
    frames = [t.add_sample(k) for k in range(30)]
    for frame in frames:
        for _ in range(rng.integers(0, 6)):
            x0, y0 = rng.integers(0, 12), rng.integers(0, 6)
            box = (x0, y0, x0 + rng.integers(1, 5), y0 + rng.integers(1, 4))
            t.add_object(frame, str(rng.choice(OBJECT_CLASSES)), tuple(int(v) for v in box))
    return t.write(tmp_path_factory.mktemp("nuimages"))[:2]


def reference_ground_truth(annotations: Path, dataset: NuImagesDataset):
    """Relevance and max box area by plain loops over the raw tables."""
    table = {n: json.loads((annotations / f"{n}.json").read_text()) for n in
             ("category", "object_ann")}  # fmt: skip
    name_of = {c["token"]: c["name"] for c in table["category"]}
    column = {dataset.tokens[int(i) - 1]: n for n, i in enumerate(dataset.image_ids)}
    row = {c.name: q for q, c in enumerate(dataset.categories)}
    relevant = np.zeros((len(row), len(column)), dtype=bool)
    max_area = np.zeros((len(row), len(column)))
    for ann in table["object_ann"]:
        q, n = row[name_of[ann["category_token"]]], column[ann["sample_data_token"]]
        x0, y0, x1, y1 = ann["bbox"]
        relevant[q, n] = True
        max_area[q, n] = max(max_area[q, n], (x1 - x0) * (y1 - y0))
    return relevant, max_area


# --- ground truth -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["handmade", "generated"])
def test_ground_truth_matches_tables(request, source: str) -> None:
    """Invariant: for every (class, key frame), relevant == some object_ann record of the
    class on that frame, and max_area == the largest (xmax-xmin)*(ymax-ymin) among them;
    nothing is ignored."""
    annotations, images = request.getfixturevalue(source)[:2]
    dataset = NuImagesDataset(annotations, images)
    gt = dataset.ground_truth()
    relevant, max_area = reference_ground_truth(annotations, dataset)
    np.testing.assert_array_equal(gt.relevant, relevant)
    np.testing.assert_allclose(gt.max_area, max_area)
    assert not gt.ignore.any()


def test_ground_truth_by_hand(handmade) -> None:
    """Invariant: the hand-computed relevance and box areas of the hand-made tables; the
    surface-only frame is in the database with no relevant class."""
    annotations, images, frames = handmade
    dataset = NuImagesDataset(annotations, images)
    gt = dataset.ground_truth()
    assert [c.name for c in gt.categories] == [
        "animal",
        "human.pedestrian.adult",
        "movable_object.trafficcone",
        "vehicle.car",
        "vehicle.emergency.ambulance",
    ]
    col = {f: dataset.tokens.index(f) for f in frames}  # ids are 1..N in token order
    expected = np.zeros((5, 4), dtype=np.float32)
    expected[3, col[frames[0]]] = 72
    expected[1, col[frames[0]]] = 12
    expected[2, col[frames[1]]] = 3
    expected[4, col[frames[2]]] = 144
    expected[3, col[frames[2]]] = 16
    np.testing.assert_array_equal(gt.max_area, expected)
    np.testing.assert_array_equal(gt.relevant, expected > 0)
    assert not gt.relevant[:, col[frames[3]]].any()
    assert "box area" in gt.notes["area_source"]


def test_only_key_camera_frames(handmade) -> None:
    """Invariant: the database is the samples' key camera frames: no camera sweeps
    (is_key_frame false) and no lidar key frames; ids 1..N follow the token order."""
    annotations, images, frames = handmade
    dataset = NuImagesDataset(annotations, images)
    assert dataset.image_ids.tolist() == [1, 2, 3, 4]
    assert dataset.tokens == sorted(frames)
    paths = [str(dataset.image_path(int(i))) for i in dataset.image_ids]
    assert all("/samples/CAM_" in p and p.endswith(".jpg") for p in paths)
    assert dataset.image_path(dataset.tokens.index(frames[1]) + 1) == images / (
        "samples/CAM_BACK/n008-2018-08-01-15-16-36-0400__CAM_BACK__1533151603512405.jpg"
    )
    assert dataset[0]["pixels"].shape == (3, 9, 16)


def test_max_images(handmade) -> None:
    """Invariant: max_images=N keeps ids 1..N and the ground truth restricted to them."""
    annotations, images, _ = handmade
    full = NuImagesDataset(annotations, images).ground_truth()
    part = NuImagesDataset(annotations, images, max_images=2).ground_truth()
    assert part.image_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(part.relevant, full.select_images(np.array([1, 2])).relevant)


# --- classes and queries ------------------------------------------------------------


def test_shipped_names_cover_the_23_object_classes() -> None:
    """Invariant: nuimages_names.yaml maps exactly the 23 object classes (no surface
    class) to non-empty query texts."""
    names = default_query_names()
    assert sorted(names) == sorted(OBJECT_CLASSES)
    assert len(names) == 23
    assert not set(names) & set(SURFACE_CATEGORIES)
    assert all(isinstance(q, str) and q.strip() for q in names.values())
    assert names["vehicle.emergency.ambulance"] == "ambulance"
    assert names["movable_object.trafficcone"] == "traffic cone"


def test_queries_default_override_and_rule(tmp_path: Path) -> None:
    """Invariant: queries come from the shipped mapping, data.query_names overrides single
    entries, and a class in neither falls back to the names.py rule."""
    t = Tables(("vehicle.car", "movable_object.trafficcone", "vehicle.bus.double_decker"))
    t.add_sample(0)
    dataset = NuImagesDataset(*t.write(tmp_path), query_names={"vehicle.car": "automobile"})
    assert [(c.id, c.name, c.query) for c in dataset.categories] == [
        (1, "movable_object.trafficcone", "traffic cone"),
        (2, "vehicle.bus.double_decker", "double decker bus"),
        (3, "vehicle.car", "automobile"),
    ]
    assert clean_category_name("vehicle.bus.double_decker", "nuimages") == "double decker bus"


def test_generated_classes_are_the_23(generated) -> None:
    """Invariant: with every class in category.json, the queries are the 23 object
    classes; the surface classes (no object annotation) are left out."""
    dataset = NuImagesDataset(*generated)
    assert [c.name for c in dataset.categories] == sorted(OBJECT_CLASSES)


def test_surface_class_with_objects_is_kept(tmp_path: Path) -> None:
    """Invariant: a surface class that object_ann does annotate becomes a query (counted,
    never silently dropped)."""
    t = Tables(("vehicle.car", "vehicle.ego"))
    frame = t.add_sample(0)
    t.add_object(frame, "vehicle.ego", (0, 0, 16, 3))
    gt = NuImagesDataset(*t.write(tmp_path)).ground_truth()
    assert [c.name for c in gt.categories] == ["vehicle.car", "vehicle.ego"]
    assert gt.relevant[1, 0]
    assert gt.max_area[1, 0] == 48


# --- errors, registry -----------------------------------------------------------------


def test_missing_table_and_folder(handmade, tmp_path: Path) -> None:
    """Invariant: a missing table folder or table names the path and data.annotations."""
    annotations, images, _ = handmade
    with pytest.raises(FileNotFoundError, match="data.annotations"):
        NuImagesDataset(tmp_path / "v1.0-nope", images)
    (annotations / "object_ann.json").unlink()
    with pytest.raises(FileNotFoundError, match="object_ann.json"):
        NuImagesDataset(annotations, images)


def test_object_on_sweep_is_an_error(tmp_path: Path) -> None:
    """Invariant: an object annotation on a non-key frame breaks the schema and fails at
    construction, before any embedding."""
    t = Tables(("vehicle.car",))
    t.add_sample(0)
    t.add_object(token("sweep-a", 0), "vehicle.car", (0, 0, 2, 2))
    with pytest.raises(ValueError, match="no sample's key camera frame"):
        NuImagesDataset(*t.write(tmp_path))


def test_key_camera_token_must_be_key_frame(tmp_path: Path) -> None:
    """Invariant: a sample whose key camera frame is marked is_key_frame=false is reported."""
    t = Tables(("vehicle.car",))
    t.add_sample(0)
    t.sample[0]["key_camera_token"] = token("sweep-a", 0)
    with pytest.raises(ValueError, match="not a key frame"):
        NuImagesDataset(*t.write(tmp_path))


def test_malformed_table(handmade) -> None:
    """Invariant: a record without a needed field names the table and the field."""
    annotations, images, _ = handmade
    (annotations / "sample_data.json").write_text(json.dumps([{"token": "x"}]))
    with pytest.raises(ValueError, match="sample_data.json.*filename"):
        NuImagesDataset(annotations, images)


def test_missing_images(handmade) -> None:
    """Invariant: missing key frames fail at construction under 'error' (count, path,
    data.images) and are listed and left out under 'skip'."""
    annotations, images, _ = handmade
    dataset = NuImagesDataset(annotations, images)
    lost = dataset.image_path(2)
    lost.unlink()
    with pytest.raises(FileNotFoundError) as info:
        NuImagesDataset(annotations, images)
    assert "1 of 4 images" in str(info.value)
    assert str(lost) in str(info.value)
    assert "data.images" in str(info.value)
    skipping = NuImagesDataset(annotations, images, on_bad_image="skip")
    assert skipping.image_ids.tolist() == [1, 3, 4]
    assert skipping.failures_at_start[0]["path"] == str(lost)
    assert skipping.ground_truth().relevant.shape == (5, 3)


def test_registry(handmade) -> None:
    """Invariant: 'nuimages' is registered, takes its own data.* keys and no dummy ones
    (include_crowd means nothing without crowd annotations, so it is not a nuimages key)."""
    assert "nuimages" in list_datasets()
    annotations, images, _ = handmade
    dataset = create_dataset(
        "nuimages",
        annotations=annotations,
        images=images,
        on_bad_image="skip",
        max_images=None,
        query_names=None,
    )
    assert isinstance(dataset, NuImagesDataset)
    assert len(dataset) == 4
    with pytest.raises(ConfigError, match="no option 'include_crowd'"):
        create_dataset("nuimages", annotations=annotations, images=images, include_crowd=True)
