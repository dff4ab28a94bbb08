"""Every registered component against its contract, parametrised from the registries.

timm's ``test_models`` pattern: the names are read from ``RETRIEVERS``, ``AGGREGATORS``,
``DATASETS`` and ``INDEX_BACKENDS`` at collection time, so a newly registered retriever,
aggregator, dataset or index backend is tested here without editing this file (a
built-in retriever only needs its tiny configuration below; it fails until it has one).
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from retrieval.config import config_options, data_schema, load_config, retriever_schema
from retrieval.data.base import ImageDataset, is_labelled
from retrieval.errors import ConfigError
from retrieval.factory import build_dataset, create_aggregator, create_retriever
from retrieval.index import build_index, open_index
from retrieval.registry import (
    AGGREGATORS,
    DATASETS,
    INDEX_BACKENDS,
    REGISTRIES,
    RETRIEVERS,
    Registry,
)
from retrieval.representatives import Representatives
from retrieval.retrievers.base import Retriever, check_contract, max_cosine
from retrieval.store import ShardStore, score_store

TOL = 1e-4

# Tiny, download-free configurations; a built-in retriever missing here fails its test.
TINY_CLIP = [{"backbone": b, "pretrained": None} for b in ("RN-tiny", "ViT-tiny")]
TINY_RETRIEVERS: dict[str, list[dict[str, Any]]] = {
    "clip": TINY_CLIP,
    "dense_clip": TINY_CLIP,
    "cluster_clip": [{**o, "aggregate": {"method": "kmeans", "k": 3}} for o in TINY_CLIP],
    "owlvit": [{"pretrained": None, "config": "tiny"}],
}
BOXES_MAY_OVERHANG = {"owlvit"}  # the detector's boxes are unclipped (see owlvit.py)
AGGREGATOR_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "kmeans": [{"k": 3}],
    "agglomerative": [{"n_clusters": 4}, {"distance_threshold": 0.9, "connectivity": True}],
    "prune": [{"tau": 0.2}],
}
SLOW_BACKENDS = {"lancedb", "milvus"}  # an embedded database each: seconds to start


def is_builtin(registry: Registry, name: str) -> bool:
    return getattr(registry.get(name), "__module__", "").startswith("retrieval.")


def case_id(options: dict[str, Any]) -> str:
    return "-".join(str(v) for v in options.values() if isinstance(v, (str, int, float))) or "-"


def retriever_cases() -> list[Any]:
    cases = []
    for name in RETRIEVERS.names():
        for options in TINY_RETRIEVERS.get(name, [None]):
            case = f"{name}-{case_id(options)}" if options else name
            cases.append(pytest.param(name, options, id=case))
    return cases


def aggregator_cases() -> list[Any]:
    return [
        pytest.param(name, options, id=f"{name}-{case_id(options)}")
        for name in AGGREGATORS.names()
        for options in AGGREGATOR_OPTIONS.get(name, [{}])
    ]


def backend_cases() -> list[Any]:
    slow = [pytest.mark.slow]
    return [
        pytest.param(name, marks=slow if name in SLOW_BACKENDS else (), id=name)
        for name in INDEX_BACKENDS.names()
    ]


def near_miss(key: str) -> str:
    """A typo of ``key`` (its last letter dropped, or doubled for a one-letter key)."""
    return key[:-1] if len(key) > 2 else key + key[-1]


def assert_unit_where(embeddings: torch.Tensor, mask: torch.Tensor) -> None:
    norms = embeddings.float().norm(dim=-1)[mask]
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=TOL, rtol=0)


# the registries themselves ------------------------------------------------------------
def test_builtin_module_that_fails_to_import_is_named() -> None:
    """A built-in module that does not import is an ImportError naming it, every time
    (never a registry that silently lacks its names)."""
    broken = Registry("widget", "widget.name", builtin=("retrieval.no_such_module",))
    for _ in range(2):
        with pytest.raises(ImportError, match="built-in widget module retrieval.no_such_module"):
            broken.names()


def test_register_get_and_create() -> None:
    """Registered defaults apply unless given, an unknown option or name is a ConfigError
    naming the closest valid one, and a name cannot be taken twice."""
    widgets = Registry("widget", "widget.name")

    @widgets.register("square", side=2)
    @widgets.register("cube")
    def make(side: int = 1, colour: str = "red") -> tuple[int, str]:
        return side, colour

    assert widgets.names() == ["cube", "square"]
    assert widgets.create("square") == (2, "red")
    assert widgets.create("cube") == (1, "red")
    assert widgets.create("square", side=5, colour="blue") == (5, "blue")
    assert list(widgets.parameters("cube")) == ["side", "colour"]
    with pytest.raises(ConfigError, match="has no option 'color'. Did you mean 'colour'"):
        widgets.create("cube", color="blue")
    with pytest.raises(ConfigError, match=r"unknown widget 'cubes' \(widget.name\).*'cube'"):
        widgets.get("cubes")
    widgets.register("cube")(make)  # the same factory again is harmless
    with pytest.raises(ValueError, match="'cube' is already registered"):
        widgets.register("cube")(lambda: None)


@pytest.mark.parametrize("reg", REGISTRIES, ids=lambda r: r.kind.replace(" ", "_"))
def test_every_name_resolves_and_a_typo_is_named(reg: Registry) -> None:
    """Each registry lists sorted, unique names, each a callable with keyword options; a
    misspelt name fails naming the closest one and the config key that takes it."""
    names = reg.names()
    assert names
    assert names == sorted(set(names))
    for name in names:
        assert callable(reg.get(name))
        assert isinstance(reg.parameters(name), dict)
    with pytest.raises(ConfigError, match=rf"{reg.config_key}.*Did you mean '{names[0]}'"):
        reg.get(names[0] + "x")


# retrievers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Noise images of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    sizes = [(80, 60), (50, 120), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize(("name", "options"), retriever_cases())
def test_retriever_contract(name: str, options: dict | None, images: list[Image.Image]) -> None:
    """Built tiny, every retriever: preprocesses images of any size to one shape, encodes
    them into ``[B, R, D]`` representatives, unit-norm where valid, with at least one
    valid per image and boxes inside the image; encodes text to unit ``[Q, D]``; scores
    ``[Q, B]``; and encodes an image alone exactly as within a batch (shards and batch
    sizes must not change results); and passes ``check_contract`` (embed_dim, transform,
    dense hooks), on the CPU by its ``device``."""
    if options is None:
        if is_builtin(RETRIEVERS, name):
            pytest.fail(f"built-in retriever {name!r} has no tiny configuration in TINY_RETRIEVERS")
        pytest.skip(f"plugin retriever {name!r}: no download-free configuration known")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn, as they should
        retriever = create_retriever(name, **options).eval()
    assert isinstance(retriever, Retriever)
    assert retriever.embed_dim > 0
    assert check_contract(retriever) is retriever  # what create_retriever enforces
    assert retriever.device == torch.device("cpu")  # the base class's, from its tensors
    json.dumps(retriever.describe())  # the run fingerprint stores it

    pixels = torch.stack([retriever.image_transform(image) for image in images])
    with torch.no_grad():
        reps = retriever.encode_images(pixels)
        text = retriever.encode_text(["a photo of a cat.", "dog", "a red traffic light"])
        scores = retriever.score(text, reps)
        alone = retriever.encode_images(pixels[1:2])
        alone_scores = retriever.score(text, alone)
    b, r, d = reps.embeddings.shape
    assert (b, d) == (len(images), retriever.embed_dim)
    assert r >= 1
    assert reps.mask.dtype == torch.bool
    assert reps.mask.any(dim=1).all()
    assert_unit_where(reps.embeddings, reps.mask)
    if reps.boxes is not None:
        boxes = reps.boxes[reps.mask].float()
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        if name not in BOXES_MAY_OVERHANG:
            assert boxes.min() >= 0
            assert boxes.max() <= 1
    assert text.shape == (3, retriever.embed_dim)
    assert_unit_where(text, torch.ones(3, dtype=torch.bool))
    assert scores.shape == (3, b)
    assert torch.isfinite(scores).all()

    count = int(alone.mask.sum())
    assert count == int(reps.mask[1].sum())
    torch.testing.assert_close(
        alone.embeddings[0][alone.mask[0]], reps.embeddings[1][reps.mask[1]], atol=TOL, rtol=0
    )
    torch.testing.assert_close(alone_scores[:, 0], scores[:, 1], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", RETRIEVERS.names())
def test_retriever_options_are_config_keys(name: str, tmp_path: Path) -> None:
    """``retriever.*`` is exactly the factory's keyword arguments: a config naming the
    retriever loads with its defaults, and a misspelt option names the right key."""
    schema = retriever_schema(name)
    options = list(RETRIEVERS.parameters(name))
    assert list(schema) == ["name", *options]
    path = tmp_path / "config.yaml"
    path.write_text(f"defaults:\n  - dataset: synthetic\nretriever:\n  name: {name}\n")
    cfg = load_config(path)
    assert cfg.retriever.name == name
    assert set(cfg.retriever) == set(schema)
    if options:
        key = options[0]
        with pytest.raises(ConfigError, match=rf"Did you mean 'retriever.{key}'"):
            load_config(path, [f"retriever.{near_miss(key)}=1"])


# aggregators --------------------------------------------------------------------------
GRID = (3, 4)


@pytest.fixture(scope="module")
def dense_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``[5, 12, 16]`` unit embeddings drawn around 3 directions (so there is structure to
    find) and masks: all valid, a random half, one cell, none, two far-apart cells."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    pick = torch.randint(3, (5, 12), generator=g)
    emb = F.normalize(centres[pick] + 0.3 * torch.randn(5, 12, 16, generator=g), dim=-1)
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[0] = True
    mask[1] = torch.rand(12, generator=g) > 0.5
    mask[2, 5] = True
    mask[4, [0, 11]] = True
    return emb, mask


@pytest.mark.parametrize(("name", "options"), aggregator_cases())
def test_aggregator_contract(
    name: str, options: dict, dense_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """On random unit embeddings with a ragged mask (an image without valid cells
    included), every aggregator gives unit-norm representatives, between one and the
    number of valid cells per image (none for an image without any), boxes inside [0, 1];
    its members (when reported) are disjoint valid cells whose normalised mean and box
    are the representative's; and an image aggregated alone gives the same result."""
    emb, mask = dense_batch
    aggregator = create_aggregator(name, **options)
    reps = aggregator(emb, mask, GRID)
    assert isinstance(reps, Representatives)
    b, r, d = reps.embeddings.shape
    assert (b, d) == (emb.shape[0], emb.shape[2])
    valid = mask.sum(dim=1)
    counts = reps.mask.sum(dim=1)
    assert (counts <= valid).all(), (counts, valid)
    assert ((counts >= 1) | (valid == 0)).all(), (counts, valid)
    assert_unit_where(reps.embeddings, reps.mask)
    assert reps.boxes is not None
    boxes = reps.boxes[reps.mask]
    assert boxes.min() >= 0
    assert boxes.max() <= 1
    assert (boxes[:, 2:] > boxes[:, :2]).all()

    members = (reps.extras or {}).get("members")
    if members is not None:
        assert members.shape == (b, r, emb.shape[1])
        assert not (members & ~mask.unsqueeze(1)).any(), "a member cell is not valid"
        assert (members.sum(dim=1) <= 1).all(), "a cell belongs to two representatives"
        assert (members.any(dim=2) == reps.mask).all()
        means = F.normalize(members.float() @ emb, dim=-1)
        torch.testing.assert_close(means[reps.mask], reps.embeddings[reps.mask], atol=TOL, rtol=0)

    for i in range(b):
        one = aggregator(emb[i : i + 1], mask[i : i + 1], GRID)
        n = int(counts[i])
        assert int(one.mask.sum()) == n
        torch.testing.assert_close(
            one.embeddings[0][one.mask[0]], reps.embeddings[i][reps.mask[i]], atol=TOL, rtol=0
        )


# datasets -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_options_are_config_keys(name: str, tmp_path: Path) -> None:
    """``data.*`` of every dataset: its keyword arguments (a labelled one's include
    ``annotations`` and ``images``), its paths left to the command line, never
    ``transform`` (the retriever's) nor the options it takes from other sections; a
    misspelt key names the right one, and a dataset built without its paths says which
    key to set."""
    factory = DATASETS.get(name)
    if inspect.isclass(factory):
        assert issubclass(factory, ImageDataset)
    schema = data_schema(name)
    protocol = config_options(name)
    required = [
        key
        for key, param in DATASETS.parameters(name).items()
        if param.default is param.empty and key != "transform"
    ]
    assert schema.name == name
    assert required
    if is_labelled(factory):
        assert {"annotations", "images"} <= set(schema)
    assert "transform" not in schema
    assert not set(protocol) & set(schema)
    assert set(schema) == {"name", *DATASETS.parameters(name)} - {"transform", *protocol}

    path = tmp_path / "config.yaml"
    path.write_text(f"defaults:\n  - retriever: clip_tiny\ndata:\n  name: {name}\n")
    cfg = load_config(path)
    assert all(cfg.data[key] is None for key in required)
    for key in protocol.values():  # an option of another section is a key of its own
        assert not key.startswith("data.")
        assert OmegaConf.select(cfg, key) is not None
    with pytest.raises(ConfigError, match=f"Did you mean 'data.{required[0]}'"):
        load_config(path, [f"data.{near_miss(required[0])}=x"])
    with pytest.raises(ConfigError, match=f"data.{required[0]} is not set"):
        build_dataset(cfg)


# index backends -----------------------------------------------------------------------
DIM = 16
FINGERPRINT = {"retriever": {"name": "fake", "dim": DIM}, "dtype": "float16"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of 160 images in two fp16 shards (R = 4 and 6, ragged masks, about 640
    representatives) drawn around 12 shared centres, so images compete for queries."""
    root = tmp_path_factory.mktemp("run")
    store = ShardStore(root / "embeddings")
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(12, DIM, generator=g), dim=1)
    for i, (ids, r) in enumerate([(range(0, 100), 4), (range(300, 360), 6)]):
        n = len(ids)
        noise = F.normalize(torch.randn(n, r, DIM, generator=g), dim=-1)
        emb = F.normalize(centres[torch.randint(12, (n, r), generator=g)] + 0.5 * noise, dim=-1)
        mask = torch.rand(n, r, generator=g) > 0.3
        mask[:, 0] = True
        xy = torch.rand(n, r, 2, generator=g) * 0.5
        boxes = torch.cat([xy, xy + 0.5], dim=-1)
        reps = Representatives(emb, mask, boxes)
        store.write_shard(f"rank000-{i:05d}", torch.tensor(list(ids)), reps)
    store.write_manifest(fingerprint=FINGERPRINT)
    return root


def exact_top(run: Path, q: torch.Tensor, k: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Top image ids (and their scores) by the evaluation's own scorer; ties: ascending id."""
    scored = score_store(ShardStore(run / "embeddings"), q, max_cosine, "cpu")
    order = [np.lexsort((scored.image_ids, -s))[:k] for s in scored.scores]
    top = [scored.image_ids[o].tolist() for o in order]
    return top, [s[o] for s, o in zip(scored.scores, order, strict=True)]


@pytest.mark.parametrize("name", backend_cases())
def test_backend_finds_the_exact_top_images(name: str, run: Path, tmp_path: Path) -> None:
    """Every backend indexes the run (tuned to recall@10 >= 0.9 where approximate) and
    answers top-10 lists of distinct images, best first: an exact backend the exact top
    images and scores, an approximate one at least its recorded recall (minus sampling
    slack) on fresh queries of the kind it was measured with."""
    out = build_index(
        run, name, tmp_path / name, "cpu", recall_k=10, recall_target=0.9, num_queries=60,
        progress=False,
    )  # fmt: skip
    with open_index(out, "cpu") as index:
        recorded = index.recall
        table = index.backend.table
        g = torch.Generator().manual_seed(7)
        rows = torch.randint(table.num_rows, (30,), generator=g).numpy()
        near = torch.from_numpy(table.vectors[rows].astype(np.float32))
        q = F.normalize(near + 0.5 * F.normalize(torch.randn(near.shape, generator=g), dim=1))
        found = index.search_vectors(q, 10)
        approximate = index.manifest.approximate
    top, scores = exact_top(run, q, 10)
    for hits in found:
        ids = [h.image_id for h in hits]
        assert len(ids) == 10 == len(set(ids))
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    if not approximate:
        assert recorded["value"] == 1.0
        assert [[h.image_id for h in hits] for hits in found] == top
        for hits, expected in zip(found, scores, strict=True):
            np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)
        return
    assert recorded["k"] == 10
    assert recorded["queries"] > 0
    assert recorded["value"] >= 0.8
    pairs = zip(found, top, strict=True)
    recall = np.mean([len({h.image_id for h in hits} & set(t)) / 10 for hits, t in pairs])
    assert recall >= recorded["value"] - 0.1, (recall, recorded)
