"""Separately installed packages add each of the four kinds through its entry-point group.

Each package below is written as pip would install it (the package and a
``*.dist-info/entry_points.txt``) into one fake site folder put on ``sys.path``; the
registries are reset around each test, so they load the plugins exactly as a fresh
process would: a retriever (``retrieval.retrievers``), a dataset
(``retrieval.datasets``), an aggregator (``retrieval.aggregators``) and an index backend
(``retrieval.index_backends``). Nothing in the project is edited.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval import create_retriever, registry
from retrieval.aggregate import create_aggregator, list_aggregators
from retrieval.cli import main
from retrieval.config import ConfigError, data_schema, load_config
from retrieval.engine import embed, evaluate
from retrieval.errors import IndexFileError
from retrieval.factory import list_datasets, list_retrievers
from retrieval.index import build_index, create_backend, list_backends, open_backend, open_index
from retrieval.representatives import Representatives

RETRIEVER_PLUGIN = '''
import torch
import torch.nn.functional as F
from retrieval import Representatives, Retriever


class ColourRetriever(Retriever):
    """Embeds an image as its mean colour; text as a fixed vector per word length."""

    def __init__(self, dim: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.embed_dim = dim
        self.scale = scale
        self.image_transform = lambda image: torch.zeros(3, 4, 4)

    def encode_images(self, pixels):
        emb = F.normalize(pixels.mean(dim=(2, 3)) * self.scale + 1e-6, dim=-1)
        return Representatives.dense(emb.unsqueeze(1))

    def encode_text(self, texts):
        return F.normalize(torch.ones(len(texts), self.embed_dim), dim=-1)
'''

DATASET_PLUGIN = '''
"""Tiles: ``count`` generated one-colour images; the query of a colour finds its tiles."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.data.base import OnBadImage, RetrievalDataset, Transform
from retrieval.data.ground_truth import Category, GroundTruth

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220)}


class TileDataset(RetrievalDataset):
    """``annotations``: a JSON file of each tile's colour (written when missing);
    ``images``: the folder of the tiles (generated when missing)."""

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        count: int = 4,
        size: int = 24,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "error",
        max_images: int | None = None,
    ) -> None:
        super().__init__(annotations, images, transform, on_bad_image, max_images)
        if count < 1:
            raise ValueError(f"data.count must be at least 1, got {count}")
        names = list(COLOURS)
        if not self.annotations_path.exists():
            self.annotations_path.parent.mkdir(parents=True, exist_ok=True)
            labels = [names[i % len(names)] for i in range(count)]
            self.annotations_path.write_text(json.dumps(labels))
        self.labels = json.loads(self.annotations_path.read_text())[:count]
        self.images_dir.mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(self.labels):
            if not self.image_path(i).exists():
                Image.new("RGB", (size, size), COLOURS[label]).save(self.image_path(i))
        self.image_ids = np.arange(len(self.labels), dtype=np.int64)[:max_images]
        self.failures_at_start = []
        self.categories = [Category(id=k, name=n, query=n) for k, n in enumerate(names)]

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / f"tile{image_id:03d}.png"

    def ground_truth(self) -> GroundTruth:
        q, n = len(self.categories), len(self.image_ids)
        names = [c.name for c in self.categories]
        relevant = np.zeros((q, n), dtype=bool)
        for col, image_id in enumerate(self.image_ids):
            relevant[names.index(self.labels[image_id]), col] = True
        area = np.where(relevant, 24.0 * 24.0, 0.0).astype(np.float32)
        return GroundTruth(
            self.image_ids.copy(), list(self.categories), relevant, np.zeros_like(relevant), area
        )


class RootTiles(TileDataset):
    """The same tiles under options of its own only: ``root`` and ``count``."""

    def __init__(
        self, root: str | Path, count: int = 4, transform: Transform | None = None
    ) -> None:
        super().__init__(Path(root) / "labels.json", Path(root), count, transform=transform)


class PlainPathTiles(TileDataset):
    """The same tiles, with ``annotations`` and ``images`` typed plainly ``str``."""

    def __init__(
        self,
        annotations: str,
        images: str,
        count: int = 4,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "error",
    ) -> None:
        super().__init__(annotations, images, count, transform=transform, on_bad_image=on_bad_image)
'''

AGGREGATOR_PLUGIN = '''
"""first-cell: an image's first ``cells`` valid cells (raster order) are its representatives."""

import torch

from retrieval.aggregate.base import Aggregator


class FirstCell(Aggregator):
    def __init__(self, cells: int = 1) -> None:
        if cells < 1:
            raise ValueError(f"first-cell needs cells >= 1, got {cells}")
        self.cells = cells

    def labels(self, embeddings, mask, grid):
        rank = mask.long().cumsum(dim=1) - 1
        return torch.where(mask & (rank < self.cells), rank, -1)
'''

BACKEND_PLUGIN = '''
"""brute: every representative scored at once, each image keeping its best row."""

import json
from dataclasses import dataclass

import numpy as np
import torch

from retrieval.errors import IndexFileError
from retrieval.index.engine import Engine, EngineOptions
from retrieval.index.kernels import first_per_image


@dataclass
class BruteOptions(EngineOptions):
    chunk: int = 1024  # rows scored at once


class BruteForce(Engine):
    Options = BruteOptions

    def build(self, progress: bool) -> None:
        self.marker().write_text(json.dumps({"rows": self.require_table().num_rows}))

    def marker(self):
        return self.folder / "brute.json"

    def load(self) -> None:
        if json.loads(self.marker().read_text())["rows"] != self.require_table().num_rows:
            raise IndexFileError(f"{self.marker()} does not match the table")

    def own_files(self):
        return [self.marker()]

    def search(self, queries, k):
        table = self.require_table()
        q = queries.float().cpu().T
        step = self.options.chunk
        parts = [
            torch.from_numpy(np.array(table.vectors[i : i + step])).float() @ q
            for i in range(0, table.num_rows, step)
        ]
        sims = torch.cat(parts).T.numpy()
        image_of_row = table.image_ids[table.owner]
        rows = np.arange(table.num_rows)
        out = []
        for s in sims:
            order = np.lexsort((rows, image_of_row, -s))  # best first; ties: lower image id
            out.append(first_per_image(order, s[order], table.owner, k))
        return out
'''

INCOMPLETE_PLUGIN = '''
import torch
from retrieval import Representatives, Retriever


class NoDimRetriever(Retriever):
    """Forgets embed_dim: it would embed and index, and fail at the first search."""

    def __init__(self) -> None:
        super().__init__()
        self.image_transform = lambda image: torch.zeros(3, 4, 4)

    def encode_images(self, pixels):
        return Representatives.dense(torch.ones(len(pixels), 1, 3))

    def encode_text(self, texts):
        return torch.ones(len(texts), 3)


class HalfDenseRetriever(NoDimRetriever):
    """Has from_dense without check_dense_source (one dense-source hook of two)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 3

    def from_dense(self, stored, dense_config):
        return stored
'''

BROKEN_PLUGIN = 'raise RuntimeError("this plugin cannot import")\n'

# package -> (source, {group: [entry point lines]})
PACKAGES: dict[str, tuple[str, dict[str, list[str]]]] = {
    "colour_plugin": (
        RETRIEVER_PLUGIN,
        {"retrieval.retrievers": ["colour = colour_plugin:ColourRetriever"]},
    ),
    "incomplete_plugin": (
        INCOMPLETE_PLUGIN,
        {
            "retrieval.retrievers": [
                "no-dim = incomplete_plugin:NoDimRetriever",
                "half-dense = incomplete_plugin:HalfDenseRetriever",
            ]
        },
    ),
    "tile_plugin": (
        DATASET_PLUGIN,
        {
            "retrieval.datasets": [
                "tiles = tile_plugin:TileDataset",
                "root-tiles = tile_plugin:RootTiles",
                "plain-tiles = tile_plugin:PlainPathTiles",
            ]
        },
    ),
    "first_cell_plugin": (
        AGGREGATOR_PLUGIN,
        {"retrieval.aggregators": ["first-cell = first_cell_plugin:FirstCell"]},
    ),
    "brute_plugin": (
        BACKEND_PLUGIN,
        {"retrieval.index_backends": ["brute = brute_plugin:BruteForce"]},
    ),
    "broken_plugin": (
        BROKEN_PLUGIN,
        {"retrieval.test_widgets": ["broken = broken_plugin:Widget"]},
    ),
}

FAST = ["run.progress=false", "loader.num_workers=0", "logger.wandb.mode=disabled"]


def write_package(site: Path, package: str, source: str, groups: dict[str, list[str]]) -> None:
    """A package plus its dist-info with an entry_points.txt, as pip would install it."""
    (site / package).mkdir()
    (site / package / "__init__.py").write_text(source)
    dist = site / f"{package}-0.1.dist-info"
    dist.mkdir()
    name = package.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    entries = "".join(f"[{group}]\n" + "\n".join(lines) + "\n" for group, lines in groups.items())
    (dist / "entry_points.txt").write_text(entries)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder holding every plugin package, each with its own dist-info."""
    root = tmp_path_factory.mktemp("site")
    for package, (source, groups) in PACKAGES.items():
        write_package(root, package, source, groups)
    return root


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugins "installed": the site folder on sys.path and every registry reset to
    load its entry points again; the registries are restored afterwards."""
    for reg in registry.REGISTRIES:
        reg.names()  # built-ins register into the real tables, never into a copy
        monkeypatch.setattr(reg, "factories", dict(reg.factories))
        monkeypatch.setattr(reg, "defaults", dict(reg.defaults))
        monkeypatch.setattr(reg, "entry_points_loaded", False)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for package in PACKAGES:
        sys.modules.pop(package, None)


@pytest.fixture(scope="module")
def dense_run(synthetic_coco: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder, as `retrieval embed` writes it: a tiny random-weight Dense-CLIP
    (several cells per image) over the 24 synthetic images."""
    ann, images = synthetic_coco
    out = tmp_path_factory.mktemp("dense_run")
    overrides = [f"data.annotations={ann}", f"data.images={images}", f"run.output_dir={out}"]
    embed(load_config("demo", [*overrides, "retriever.name=dense_clip", *FAST]))
    return out


# retrievers ---------------------------------------------------------------------------
def test_entry_point_retriever_is_listed_and_built(installed: Path) -> None:
    """The plugin appears in list_retrievers and create_retriever builds it with options."""
    assert "colour" in list_retrievers()
    retriever = create_retriever("colour", dim=3, scale=2.0)
    reps = retriever.encode_images(torch.rand(2, 3, 4, 4))
    assert reps.embeddings.shape == (2, 1, 3)
    assert retriever.score(retriever.encode_text(["a"]), reps).shape == (1, 2)


def retriever_config(tmp_path: Path, name: str) -> Path:
    """A config of plugin retriever ``name`` over the synthetic COCO set."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"defaults:\n  - dataset: synthetic\nretriever:\n  name: {name}\n")
    return path


def test_incomplete_retriever_plugin_is_refused_at_creation(
    installed: Path, synthetic_coco: tuple[Path, Path], tmp_path: Path
) -> None:
    """A plugin retriever without ``embed_dim`` (or with one dense-source hook of two) is
    refused by create_retriever with one ConfigError naming its class and the missing
    part, before anything is embedded with it (it used to fail at the first search)."""
    with pytest.raises(ConfigError, match=r"incomplete_plugin\.NoDimRetriever .*lacks embed_dim"):
        create_retriever("no-dim")
    with pytest.raises(ConfigError, match=r"HalfDenseRetriever .*lacks check_dense_source"):
        create_retriever("half-dense")
    ann, images = synthetic_coco
    run = tmp_path / "run"
    overrides = [f"data.annotations={ann}", f"data.images={images}", f"run.output_dir={run}"]
    with pytest.raises(ConfigError, match="NoDimRetriever .*lacks embed_dim"):
        embed(load_config(retriever_config(tmp_path, "no-dim"), [*overrides, *FAST]))
    assert not list(run.glob("embeddings/*.safetensors"))  # nothing embedded with it


def test_parameterless_retriever_serves_a_picture_upload(
    installed: Path, synthetic_coco: tuple[Path, Path], tmp_path: Path
) -> None:
    """The colour plugin has no parameters (so no ``next(parameters())`` device): its run,
    indexed and served, answers a picture upload. Every image embeds to the same unit
    vector, so each hit's MaxSim score is 1 and the top holds ``top`` distinct images."""
    from fastapi.testclient import TestClient

    from retrieval.serve.app import create_app
    from retrieval.serve.served import ServedIndex
    from retrieval.serve.settings import ServeSettings

    ann, images = synthetic_coco
    run = tmp_path / "run"
    overrides = [f"data.annotations={ann}", f"data.images={images}", f"run.output_dir={run}"]
    embed(load_config(retriever_config(tmp_path, "colour"), [*overrides, *FAST]))
    folder = build_index(run, "exact", tmp_path / "index", "cpu", progress=False)
    served = {"colour": ServedIndex("colour", folder, "cpu")}
    assert create_retriever("colour").device == torch.device("cpu")
    picture = next(images.iterdir())
    with TestClient(create_app(served, ServeSettings())) as client, picture.open("rb") as f:
        response = client.post(
            "/api/search", files={"image": ("p.jpg", f, "image/jpeg")}, data={"top": "5"}
        )
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len({h["image_id"] for h in hits}) == 5
    assert [h["score"] for h in hits] == pytest.approx([1.0] * 5, abs=1e-3)  # fp16 store


def test_architecture_doc_retriever_snippet_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "A retriever" snippet of docs/architecture.md, executed as written, registers a
    retriever that create_retriever builds (its contract checked) and that embeds images
    and text in its ``embed_dim``: the guide a newcomer follows cannot rot unseen."""
    text = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    section = text[text.index("### A retriever") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    registry.RETRIEVERS.names()  # built-ins first, into the real table
    monkeypatch.setattr(registry.RETRIEVERS, "factories", dict(registry.RETRIEVERS.factories))
    monkeypatch.setattr(registry.RETRIEVERS, "defaults", dict(registry.RETRIEVERS.defaults))
    exec(compile(code, "docs/architecture.md", "exec"), {"__name__": "doc_snippet"})
    retriever = create_retriever("colour", scale=2.0)
    reps = retriever.encode_images(torch.rand(2, 3, 4, 4))
    d = retriever.embed_dim
    assert reps.embeddings.shape == (2, 1, d)
    assert retriever.device == torch.device("cpu")
    assert retriever.encode_text(["a", "b"]).shape == (2, d)


def test_architecture_doc_backend_snippet_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The "An index backend" snippet of docs/architecture.md, executed as written,
    registers an engine that builds (its own file listed and recorded), answers as the
    exact backend does, refuses an unknown option naming it, round-trips through its
    stored state, and (not updatable) refuses an update saying to rebuild."""
    text = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    section = text[text.index("### An index backend") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    backends = registry.INDEX_BACKENDS
    backends.names()  # built-ins first, into the real table
    monkeypatch.setattr(backends, "factories", dict(backends.factories))
    monkeypatch.setattr(backends, "defaults", dict(backends.defaults))
    # as written: without this test module's `from __future__ import annotations`
    exec(compile(code, "docs/architecture.md", "exec", dont_inherit=True), {"__name__": "doc"})
    dim, rng = 8, np.random.default_rng(0)
    ids = np.arange(10, 22)
    emb = F.normalize(torch.from_numpy(rng.standard_normal((12, 3, dim))).float(), dim=-1)
    reps = Representatives(emb, torch.rand(12, 3) > 0.3)
    reps.mask[:, 0] = True
    built = {}
    for name, options in (("brute", {"chunk": 5}), ("exact", {})):
        backend = create_backend(name, tmp_path / name, dim, "cpu", **options)
        backend.add(ids, reps)
        backend.finish()
        built[name] = backend
    brute = built["brute"]
    assert brute.state() == {"chunk": 5}
    assert tmp_path / "brute" / "brute.json" in brute.files()
    q = F.normalize(torch.randn(3, dim), dim=-1)
    reopened = open_backend("brute", tmp_path / "brute", dim, "cpu", **brute.state())
    for found, expected in zip(reopened.search(q, 4), built["exact"].search(q, 4), strict=True):
        assert [(h.image_id, h.rep_index) for h in found] == [
            (h.image_id, h.rep_index) for h in expected
        ]
    with pytest.raises(ConfigError, match=r"no option 'chunks' \(it accepts: chunk\)"):
        create_backend("brute", tmp_path / "other", dim, "cpu", chunks=5)
    with pytest.raises(IndexFileError, match="'brute' cannot add or remove.*rebuild"):
        reopened.remove(ids[:1])


def test_plugin_options_are_config_keys(installed: Path, tmp_path: Path) -> None:
    """The plugin's keyword arguments become validated, typed retriever.* config keys."""
    path = tmp_path / "colour.yaml"
    path.write_text("defaults:\n  - dataset: synthetic\nretriever:\n  name: colour\n  scale: 0.5\n")
    cfg = load_config(path)
    assert cfg.retriever.scale == 0.5
    assert cfg.retriever.dim == 3
    with pytest.raises(ConfigError, match="Did you mean 'retriever.scale'"):
        load_config(path, ["retriever.scal=2"])
    with pytest.raises(ConfigError, match="retriever.dim"):
        load_config(path, ["retriever.dim=three"])


def test_every_kind_is_in_retrieval_list(
    installed: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`retrieval list` shows the plugin of each kind beside the built-ins, with its options."""
    monkeypatch.setenv("COLUMNS", "250")  # rich would wrap the tables at 80
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, option in (("colour", "scale"), ("tiles", "count"), ("first-cell", "cells")):
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert option in line, line
    assert " brute " in out
    assert " clip " in out
    assert " exact " in out


def test_broken_plugin_is_an_error_naming_it(installed: Path) -> None:
    """A plugin that fails to import is an ImportError naming it and its package's group,
    not a silently missing name."""
    widgets = registry.Registry("widget", "widget.name", entry_point_group="retrieval.test_widgets")
    with pytest.raises(ImportError, match=r"widget plugin 'broken' \(broken_plugin:Widget\)"):
        widgets.names()


# datasets -----------------------------------------------------------------------------
def tiles_config(tmp_path: Path, name: str = "tiles") -> Path:
    path = tmp_path / "tiles.yaml"
    path.write_text(f"defaults:\n  - retriever: clip_tiny\ndata:\n  name: {name}\n")
    return path


def test_dataset_plugin_is_listed_and_its_options_are_config_keys(
    installed: Path, tmp_path: Path
) -> None:
    """The dataset plugin is listed; its typed keyword arguments are validated data.* keys
    (defaults filled, a typo named with the closest key, a wrong type refused), less the
    transform the retriever supplies."""
    assert {"tiles", "coco"} <= set(list_datasets())
    assert set(data_schema("tiles")) == {
        "name", "annotations", "images", "count", "size", "on_bad_image", "max_images"
    }  # fmt: skip
    path = tiles_config(tmp_path)
    cfg = load_config(path, [f"data.images={tmp_path}", "data.count=5"])
    assert cfg.data.count == 5
    assert cfg.data.size == 24
    assert cfg.data.on_bad_image == "error"
    with pytest.raises(ConfigError, match="Did you mean 'data.count'"):
        load_config(path, ["data.cont=5"])
    with pytest.raises(ConfigError, match="data.count"):
        load_config(path, ["data.count=five"])
    with pytest.raises(ConfigError, match="data.on_bad_image='ignore' is not one of error, skip"):
        load_config(path, ["data.on_bad_image=ignore"])


def test_dataset_plugin_is_scored_by_evaluate(installed: Path, tmp_path: Path) -> None:
    """A full `evaluate` run (tiny random-weight CLIP) embeds the plugin's images and
    scores its ground truth: every file of the run folder, one row per colour."""
    data = tmp_path / "tiles"
    overrides = [
        f"data.annotations={data / 'labels.json'}",
        f"data.images={data / 'images'}",
        "data.count=5",
        f"run.output_dir={tmp_path / 'run'}",
        *FAST,
    ]
    result = evaluate(load_config(tiles_config(tmp_path), overrides))
    assert result.metrics["images"] == 5
    assert result.metrics["random_weights"] is True
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["name"] for row in metrics["per_category"]] == ["red", "green", "blue"]
    assert [row["positives"] for row in metrics["per_category"]] == [2, 2, 1]
    assert 0.0 <= metrics["map"] <= 1.0
    saved = np.load(tmp_path / "run" / "scores.npz")
    assert saved["scores"].shape == (3, 5)
    assert saved["image_ids"].tolist() == [0, 1, 2, 3, 4]
    assert "tiles" in (tmp_path / "run" / "config.yaml").read_text()
    assert sorted(p.name for p in (data / "images").iterdir())[-1] == "tile004.png"


def test_dataset_plugin_with_plainly_typed_required_options(
    installed: Path, tmp_path: Path
) -> None:
    """`annotations: str` (no `| Path`, no default) is as valid a signature as COCO's;
    the key is left to the command line like COCO's."""
    cfg = load_config(tiles_config(tmp_path, "plain-tiles"), [f"data.images={tmp_path}"])
    assert cfg.data.images == str(tmp_path)
    assert cfg.data.annotations is None


def test_dataset_plugin_with_its_own_options_only(installed: Path, tmp_path: Path) -> None:
    """A dataset whose options are only its own (`root`, `count`) still evaluates."""
    path = tmp_path / "root.yaml"
    path.write_text(
        "defaults:\n  - retriever: clip_tiny\ndata:\n  name: root-tiles\n  root: PLACEHOLDER\n"
    )
    overrides = [f"data.root={tmp_path / 'tiles'}", f"run.output_dir={tmp_path / 'run'}", *FAST]
    assert evaluate(load_config(path, overrides)).metrics["images"] == 4


# aggregators --------------------------------------------------------------------------
def test_aggregator_plugin_is_built_with_its_options(installed: Path) -> None:
    """create_aggregator builds the plugin with its options (a typo named with the closest
    option) and its output follows the shared representative contract."""
    assert {"first-cell", "kmeans"} <= set(list_aggregators())
    with pytest.raises(ConfigError, match="Did you mean 'cells'"):
        create_aggregator("first-cell", cell=2)
    aggregator = create_aggregator("first-cell", cells=2)
    emb = F.normalize(torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1], [0, 0, 0, 0, 1, 0]]).bool()
    reps = aggregator(emb, mask, (2, 3))
    assert reps.counts.tolist() == [2, 2, 1]
    torch.testing.assert_close(reps.embeddings[0], emb[0, :2])
    torch.testing.assert_close(reps.embeddings[1], emb[1, [2, 4]])
    torch.testing.assert_close(reps.boxes[2, 0], torch.tensor([1 / 3, 0.5, 2 / 3, 1.0]))


def test_aggregator_plugin_runs_behind_cluster_clip(installed: Path) -> None:
    """Put behind a tiny Cluster-CLIP (the aggregator it calls), the plugin gives one
    representative per image: the first Dense-CLIP cell, with its box."""
    retriever = create_retriever("cluster_clip", backbone="RN-tiny", pretrained=None).eval()
    retriever.aggregator = create_aggregator("first-cell")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reps = retriever.encode_images(pixels)
    dense = retriever.encode_dense(pixels)
    assert reps.embeddings.shape == (2, 1, retriever.embed_dim)
    assert reps.mask.all()
    torch.testing.assert_close(reps.embeddings[:, 0], dense.embeddings[:, 0])
    torch.testing.assert_close(reps.boxes[:, 0], dense.boxes[0].expand(2, 4))


def test_aggregator_plugin_is_a_cluster_clip_method(installed: Path) -> None:
    """retriever.aggregate.method=<plugin> selects the plugin, from Python and from a
    config, and retriever.aggregate.options carries the plugin's own options; the flat
    keys of the built-in methods are refused for it, and options for a built-in."""
    retriever = create_retriever(
        "cluster_clip",
        backbone="RN-tiny",
        pretrained=None,
        aggregate={"method": "first-cell", "options": {"cells": 2}},
    )
    assert type(retriever.aggregator).__name__ == "FirstCell"
    reps = retriever.encode_images(torch.rand(2, 3, 64, 64))
    assert reps.counts.tolist() == [2, 2]
    cfg = load_config(
        "demo",
        [
            "retriever.name=cluster_clip",
            "retriever.aggregate.method=first-cell",
            "retriever.aggregate.options={cells: 3}",
        ],
    )
    assert cfg.retriever.aggregate.method == "first-cell"
    assert cfg.retriever.aggregate.options == {"cells": 3}
    with pytest.raises(ConfigError, match="applies to method=kmeans only"):
        load_config(
            "demo",
            [
                "retriever.name=cluster_clip",
                "retriever.aggregate.method=first-cell",
                "retriever.aggregate.k=3",
            ],
        )
    with pytest.raises(ConfigError, match="plugin aggregators only"):
        load_config("demo", ["retriever.name=cluster_clip", "retriever.aggregate.options={k: 3}"])


# index backends -----------------------------------------------------------------------
def test_backend_plugin_indexes_a_run_like_exact(
    installed: Path, dense_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`retrieval index build RUN --backend brute` (options included) indexes a real run
    folder; reopened, the index answers the same top images, scores and representatives as
    the built-in exact backend, for random vectors and for a text query."""
    assert "brute" in list_backends()
    out = tmp_path / "brute"
    argv = ["index", "build", str(dense_run), "--backend", "brute", "--out", str(out)]
    assert main([*argv, "--option", "chunk=64", "--recall-k", "5", "--no-progress"]) == 0
    assert "brute index of 24 images" in capsys.readouterr().out
    exact = build_index(dense_run, "exact", tmp_path / "exact", "cpu", progress=False)
    with open_index(out, "cpu") as brute, open_index(exact, "cpu") as reference:
        manifest = brute.manifest
        assert manifest.backend == "brute"
        assert manifest.backend_state == {"chunk": 64}
        assert manifest.recall["value"] == 1.0
        assert "brute.json" in manifest.files
        q = F.normalize(torch.randn(4, brute.embed_dim, generator=torch.Generator().manual_seed(1)))
        for found, expected in zip(
            brute.search_vectors(q, 10), reference.search_vectors(q, 10), strict=True
        ):
            assert [h.image_id for h in found] == [h.image_id for h in expected]
            assert [h.rep_index for h in found] == [h.rep_index for h in expected]
            np.testing.assert_allclose(
                [h.score for h in found], [h.score for h in expected], atol=1e-6
            )
        by_text = [h.image_id for h in brute.search("circle", top=5)]
        assert by_text == [h.image_id for h in reference.search("circle", top=5)]
        # an engine that does not declare itself updatable: an update says to rebuild
        with pytest.raises(IndexFileError, match="'brute' cannot add or remove.*rebuild"):
            brute.backend.remove(np.array([h.image_id for h in found[:1]]))


def test_backend_plugin_refuses_an_unknown_option(installed: Path, dense_run: Path) -> None:
    """A typed option the engine does not declare is one ConfigError naming it and the
    accepted ones (before anything is written)."""
    with pytest.raises(ConfigError, match=r"'brute' has no option 'chunks' \(it accepts: chunk\)"):
        create_backend("brute", dense_run / "never", 8, "cpu", chunks=64)
    assert not (dense_run / "never").exists()
