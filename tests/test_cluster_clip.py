"""Cluster-CLIP: Dense-CLIP cells aggregated into representatives, checked against encode_dense.

Random-weight tiny towers (RN-tiny, ViT-tiny) on a 6 x 6 grid (36 cells), so each
invariant is checked on every representative of every image in milliseconds.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from retrieval import create_retriever
from retrieval.config import ConfigError, as_dict, load_config
from retrieval.engine import evaluate
from retrieval.factory import build_retriever
from retrieval.registry import RETRIEVERS
from retrieval.report.compare import load_paper_table, load_run, paper_method
from retrieval.retrievers.base import Retriever
from retrieval.retrievers.cluster_clip import AggregateOptions, ClusterClipRetriever, calibrate

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.filterwarnings("ignore:retriever.pretrained=null")

SIZES = {"RN-tiny": 192, "ViT-tiny": 96}  # both a 6 x 6 grid
ROWS = [
    f"{kind}_{m}_rn50x64"
    for kind in ("cluster_clip", "clip_cluster_clip")
    for m in ("km", "agt", "agf", "rp")
]
ROW_METHOD = {"km": "kmeans", "agt": "agglomerative", "agf": "agglomerative", "rp": "prune"}
METHODS = [
    {"method": "kmeans", "k": 10},
    {"method": "agglomerative", "n_clusters": 7},
    {"method": "agglomerative", "distance_threshold": 0.05, "linkage": "ward"},
    {"method": "prune", "tau": 0.99},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on 2 shared cores, thread contention slows these tiny tensors'
    step-by-step clustering loops some 20x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _build(name: str, backbone: str, aggregate: tuple, options: tuple) -> Retriever:
    torch.manual_seed(0)  # every retriever of a backbone gets the same random weights
    kwargs = dict(options, aggregate=dict(aggregate)) if name == "cluster_clip" else dict(options)
    return create_retriever(
        name, backbone=backbone, pretrained=None, resolution=SIZES[backbone], **kwargs
    )


def build(name: str, backbone: str = "RN-tiny", aggregate: dict | None = None, **options):
    """A random-weight retriever on a 6 x 6 grid, built once per set of options (building
    dominates these tests' time), with weights shared across dense_clip and cluster_clip."""
    return _build(name, backbone, tuple((aggregate or {}).items()), tuple(sorted(options.items())))


def pixels_for(retriever, count: int = 3) -> Tensor:
    """A batch through the retriever's own transform (two views under global_pass=native)."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70, 3), dtype=np.uint8))
        for i in range(count)
    ]
    return torch.stack([retriever.image_transform(image) for image in images])


@pytest.mark.parametrize("with_global", [False, True])
def test_method_none_is_dense_clip_exactly(with_global):
    """Invariant: with ``aggregate.method=none`` cluster_clip returns dense_clip's
    representatives bit for bit (embeddings, mask, boxes; no extras), with and without the
    global one."""
    dense = build("dense_clip", with_global=with_global)
    cluster = build("cluster_clip", aggregate={"method": "none"}, with_global=with_global)
    pixels = pixels_for(dense)
    expected, actual = dense.encode_images(pixels), cluster.encode_images(pixels)
    assert actual.embeddings.shape == (3, 36 + with_global, 64)
    for name in ("embeddings", "mask", "boxes"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    assert actual.extras is None
    assert expected.extras is None


@pytest.mark.parametrize(
    ("backbone", "aggregate"),
    [("RN-tiny", a) for a in METHODS] + [("ViT-tiny", METHODS[0])],
    ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())),
)
def test_each_representative_is_its_members_mean_and_box(backbone, aggregate):
    """Invariant: the members of an image's valid representatives partition its cells; each
    representative is the L2-normalised mean of its member cells' ``encode_dense``
    embeddings and its box the bounding box of their cells; padding rows are invalid and
    memberless; ``keep_members`` stores the ``[B, R, N]`` bool mask."""
    cluster = build("cluster_clip", backbone, aggregate, keep_members=True)
    pixels = pixels_for(cluster)
    reps = cluster.encode_images(pixels)
    dense = cluster.encode_dense(pixels)
    members = reps.extras["members"]
    assert members.dtype == torch.bool
    assert members.shape == (*reps.mask.shape, 36)
    assert torch.equal(members.any(dim=2), reps.mask)
    assert torch.equal(members.sum(dim=1), torch.ones(3, 36, dtype=torch.long))
    for b in range(3):
        for r in reps.mask[b].nonzero().flatten().tolist():
            cells = members[b, r]
            mean = F.normalize(dense.embeddings[b, cells].double().mean(dim=0), dim=0)
            torch.testing.assert_close(reps.embeddings[b, r].double(), mean, atol=1e-6, rtol=0)
            box = dense.boxes[cells]
            expected_box = torch.cat([box[:, :2].amin(dim=0), box[:, 2:].amax(dim=0)])
            assert torch.equal(reps.boxes[b, r], expected_box)


@pytest.mark.parametrize("global_pass", ["same", "native"])
def test_with_global_appends_exactly_dense_clips_global(global_pass):
    """Invariant: ``with_global`` adds one valid column after the clusters holding exactly
    dense_clip's global embedding (same-pass and native second pass), box = whole image,
    no members; the clusters before it are those of ``with_global=false``."""
    options = {"with_global": True, "global_pass": global_pass}
    dense = build("dense_clip", **options)
    cluster = build("cluster_clip", aggregate=METHODS[0], keep_members=True, **options)
    plain = build("cluster_clip", aggregate=METHODS[0], keep_members=True)
    pixels = pixels_for(dense)
    reps = cluster.encode_images(pixels)
    expected = dense.encode_images(pixels)
    assert torch.equal(reps.embeddings[:, -1], expected.embeddings[:, -1])
    assert reps.mask[:, -1].all()
    assert reps.boxes[:, -1].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3
    assert not reps.extras["members"][:, -1].any()
    alone = plain.encode_images(pixels[:, 0] if global_pass == "native" else pixels)
    assert torch.equal(reps.embeddings[:, :-1], alone.embeddings)
    assert torch.equal(reps.mask[:, :-1], alone.mask)


def test_counts_follow_the_method():
    """Invariant: k-means with k=10 gives at most 10 valid representatives per image (and
    at least one), agglomerative with n_clusters=7 exactly 7."""
    kmeans = build("cluster_clip", aggregate=METHODS[0], keep_members=True)
    agf = build("cluster_clip", aggregate=METHODS[1], keep_members=True)
    pixels = pixels_for(kmeans)
    counts = kmeans.encode_images(pixels).counts
    assert ((counts >= 1) & (counts <= 10)).all(), counts
    assert agf.encode_images(pixels).counts.tolist() == [7, 7, 7]


@pytest.mark.parametrize("row", ROWS)
def test_paper_row_configs_validate_and_map_to_their_row(row):
    """Invariant: each row's experiment config validates; its ``retriever`` section holds
    only cluster_clip keyword arguments with RN50x64 at 448, the row's method and global
    flag; with the ``aggregator`` key the retriever reports (see the end-to-end test),
    report.compare maps it to the row, whose count matches the row's."""
    cfg = load_config(f"{row}_coco")
    options = as_dict(cfg.retriever)
    assert options.pop("name") == "cluster_clip"
    assert set(options) <= set(RETRIEVERS.parameters("cluster_clip"))
    assert (options["backbone"], options["resolution"]) == ("RN50x64", 448)
    assert options["with_global"] == row.startswith("clip_")
    short = row.split("_")[-2]
    assert options["aggregate"]["method"] == ROW_METHOD[short]
    AggregateOptions.coerce(options["aggregate"])
    assert cfg.run.output_dir == f"runs/{row}_coco"

    reported = {**as_dict(cfg.retriever), "aggregator": options["aggregate"]["method"]}
    method, backbone = paper_method(reported)
    table = {(r["method"].rstrip(".").lower(), r["backbone"]): r for r in load_paper_table()}
    reps = {"km": 10, "agt": 10, "agf": 50, "rp": 91}[short] + row.startswith("clip_")
    assert int(table[method.rstrip(".").lower(), backbone]["reps_per_image"]) == reps


def test_overrides_reach_the_aggregator():
    """Invariant: ``retriever.aggregate.*`` overrides and a retriever group swap reach the
    built aggregator, and the retriever reports its method and effective options."""
    tiny = ["retriever.backbone=RN-tiny", "retriever.pretrained=null"]
    cfg = load_config("cluster_clip_km_rn50x64_coco", [*tiny, "retriever.aggregate.k=5"])
    assert cfg.retriever.aggregate.k == 5
    retriever = build_retriever(cfg)
    assert retriever.aggregator.k == 5
    described = retriever.describe()
    assert described["aggregator"] == "kmeans"
    assert described["aggregator_options"] == {"k": 5, "iterations": 30, "seed": 0}
    cfg = load_config("cluster_clip_km_rn50x64_coco", ["retriever=cluster_clip_agf_rn50x64"])
    aggregator = AggregateOptions.coerce(as_dict(cfg.retriever.aggregate)).build()
    assert (aggregator.n_clusters, aggregator.distance_threshold) == (50, None)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["retriever.aggregate.n_clusters=50"], "retriever.aggregate.n_clusters"),
        (
            ["retriever.aggregate.method=agglomerative", "retriever.aggregate.k=null"],
            "retriever.aggregate.n_clusters",
        ),
        (["retriever.aggregate.method=prune"], "retriever.aggregate.k"),
        (["retriever.aggregate.method=spectral"], "retriever.aggregate.method"),
        (["retriever.aggregate.k=0"], "k >= 1"),
        (["retriever.aggregate.kk=5"], "retriever.aggregate.kk"),
        (["retriever.aggregate.k=ten"], "retriever.aggregate.k"),
    ],
)
def test_bad_aggregate_options_name_the_key(overrides, key, monkeypatch):
    """Invariant: a wrong aggregate key, type, value or combination fails before any model
    is loaded (at ``load_config`` or at construction), with the key in the message."""

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("retrieval.retrievers.clip.load_open_clip", no_load)
    tiny = ["retriever.backbone=RN-tiny", "retriever.pretrained=null"]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        build_retriever(load_config("cluster_clip_km_rn50x64_coco", [*tiny, *overrides]))
    assert isinstance(err.value, ConfigError) or "retriever.aggregate" in str(err.value)


def test_options_accept_a_mapping_and_refuse_strays():
    """Invariant: ``aggregate`` may be a plain mapping (what a config passes); an unknown key
    or one the method does not read is refused naming it, and both AG-F and AG-T at once
    are refused."""
    retriever = build("cluster_clip", aggregate={"method": "prune", "tau": 0.5})
    assert isinstance(retriever, ClusterClipRetriever)
    assert retriever.aggregator.tau == 0.5
    with pytest.raises(ValueError, match=r"retriever\.aggregate\.kay"):
        AggregateOptions.coerce({"method": "kmeans", "kay": 3})
    with pytest.raises(ValueError, match=r"retriever\.aggregate\.tau"):
        AggregateOptions(method="kmeans", tau=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        AggregateOptions(method="agglomerative", n_clusters=5, distance_threshold=0.3)


@pytest.mark.parametrize(
    ("options", "target", "bounds"),
    [
        (AggregateOptions(method="agglomerative", distance_threshold=0.0), 5.0, (0.0, 2.0)),
        (AggregateOptions(method="prune", tau=0.0), 12.0, (-1.0, 1.0)),
    ],
)
def test_calibrate_reaches_the_target_count(options, target, bounds):
    """Invariant: ``calibrate`` finds a distance threshold (count falling with it) or a tau
    (count rising with it) whose mean representative count is the target, within the
    granularity of a batch of 8 images."""
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(8, 10, 16, generator=generator), dim=2)
    pick = torch.randint(0, 10, (8, 36), generator=generator)
    noise = 0.3 * torch.randn(8, 36, 16, generator=generator)
    embeddings = F.normalize(centers.gather(1, pick.unsqueeze(2).expand(-1, -1, 16)) + noise, dim=2)
    tuned, count = calibrate(embeddings, None, (6, 6), options, target, bounds)
    assert abs(count - target) <= 0.5
    assert tuned.method == options.method


def test_end_to_end_run_has_few_representatives(synthetic_coco, tmp_path: Path):
    """Invariant: the CLIP + Cluster-CLIP K.M. row config, on RN-tiny with k=4, runs through
    ``evaluate`` (Lightning predict, shards, scoring) and writes metrics with at most
    4 + 1 representatives per image, far below Dense-CLIP's 6 x 6 + 1 = 37; shards hold no
    members; the run folder maps to the paper's K.M. row."""
    ann, images = synthetic_coco
    config = tmp_path / "run.yaml"
    config.write_text(
        "defaults:\n  - experiment: clip_cluster_clip_km_rn50x64_coco\n"
        "retriever:\n  backbone: RN-tiny\n  pretrained: null\n  resolution: 192\n"
        "loader:\n  batch_size: 8\n"
    )
    out = tmp_path / "run"
    cfg = load_config(
        config,
        [
            f"data.annotations={ann}",
            f"data.images={images}",
            f"run.output_dir={out}",
            "run.progress=false",
            "loader.num_workers=0",
            "logger.wandb.mode=disabled",
            "retriever.aggregate.k=4",
        ],
    )
    result = evaluate(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 24
    assert result.metrics["images"] == 24
    assert 2 <= metrics["reps_per_image"]["mean"] <= 5
    assert metrics["reps_per_image"]["max"] <= 5
    assert metrics["retriever"]["aggregator_options"] == {"k": 4, "iterations": 30, "seed": 0}
    for shard in (out / "embeddings").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert set(f.keys()) == {"image_ids", "embeddings", "mask", "boxes"}
    assert paper_method(load_run(out).retriever) == ("CLIP + Cluster-CLIP, K.M.", "RN-tiny")
