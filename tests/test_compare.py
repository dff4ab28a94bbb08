"""Comparing runs: the side-by-side table, paper matching, size bins, plots and wandb."""

from __future__ import annotations

import csv
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import wandb
import yaml
from PIL import Image
from reference import reference_ap

from retrieval.cli import build_parser
from retrieval.config import CONFIG_DIR, load_config
from retrieval.engine import evaluate
from retrieval.factory import create_dataset
from retrieval.report.compare import (
    PAPER_TABLE,
    Run,
    build_comparison,
    canonical_backbone,
    load_paper_table,
    paper_method,
    reference_for,
    write_comparison,
)
from retrieval.report.plots import CostPoint, pareto_front, plot_run
from retrieval.report.sizes import ap_by_size, load_per_size
from retrieval.report.wandb_log import PER_CATEGORY_TABLE, log_to_wandb


def _overrides(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    ann, images = data
    return [
        f"data.annotations={ann}",
        f"data.images={images}",
        f"run.output_dir={out}",
        "run.progress=false",
        "loader.num_workers=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def two_runs(synthetic_coco, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two demo runs (tiny ResNet and tiny ViT CLIP, random weights) on the same data."""
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, backbone in (("rn_tiny", "RN-tiny"), ("vit_tiny", "ViT-tiny")):
        out = root / name
        evaluate(
            load_config(
                "demo",
                _overrides(
                    synthetic_coco,
                    out,
                    f"retriever.backbone={backbone}",
                    "logger.wandb.mode=disabled",
                ),
            )
        )
        runs.append(out)
    return runs


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_table_numbers_are_the_runs_metrics(two_runs, tmp_path: Path) -> None:
    """Every number of compare.csv is the run's metrics.json value (metrics x 100, costs
    as stored), and runs that match no paper row get no paper columns and say so."""
    comp = build_comparison(two_runs)
    write_comparison(comp, tmp_path, plots=False)
    with open(tmp_path / "compare.csv", newline="") as f:
        table = {row["metric"]: row for row in csv.DictReader(f)}
    for run_dir in two_runs:
        m, label = _metrics(run_dir), run_dir.name
        for key in ("map@50", "map", "map@50_s-m", "map@50_hits", "map_s-m"):
            assert float(table[key][label]) == pytest.approx(100 * m[key], abs=1e-9), key
        assert float(table["reps / image"][label]) == m["reps_per_image"]["mean"]
        assert float(table["bytes / image"][label]) == m["bytes_per_image"]
        assert float(table["images / s"][label]) == pytest.approx(
            m["timing"]["extract_images_per_second"]
        )
        assert f"{label} paper" not in table["map@50"]
        assert comp.references[label].note.startswith("no reference")
    md = (tmp_path / "compare.md").read_text()
    assert f"{100 * _metrics(two_runs[0])['map@50']:.2f}" in md
    assert "no reference" in md
    assert "RANDOM WEIGHTS" in md


def test_category_deltas_are_per_category_differences(two_runs) -> None:
    """Deltas are second-run minus first-run AP@50 per category id, over the categories
    both runs scored, sorted from the largest gain to the largest loss."""
    comp = build_comparison(two_runs, reference="none")
    deltas = comp.deltas[two_runs[1].name]
    base = {r["category_id"]: r["ap@50"] for r in _metrics(two_runs[0])["per_category"]}
    other = {r["category_id"]: r["ap@50"] for r in _metrics(two_runs[1])["per_category"]}
    scored = [c for c in base if base[c] is not None and other[c] is not None]
    assert sorted(d["category_id"] for d in deltas) == sorted(scored)
    for d in deltas:
        assert d["delta"] == pytest.approx(other[d["category_id"]] - base[d["category_id"]])
    assert [d["delta"] for d in deltas] == sorted((d["delta"] for d in deltas), reverse=True)


PAPER_METHODS = [
    ({"name": "clip", "backbone": "RN50x64-quickgelu"}, ("CLIP", "RN50x64")),
    (
        {
            "name": "cluster_clip",
            "backbone": "RN50x64",
            "aggregator": "agglomerative",
            "aggregator_options": {"n_clusters": 50, "distance_threshold": None},
        },
        ("Cluster-CLIP, AG-F", "RN50x64"),
    ),  # metrics.json's retriever block
    (
        {
            "name": "cluster_clip",
            "backbone": "RN50x64",
            "aggregator": "agglomerative",
            "aggregator_options": {"n_clusters": None, "distance_threshold": 0.3},
        },
        ("Cluster-CLIP, AG-T", "RN50x64"),
    ),
    (
        {"name": "cluster_clip", "backbone": "RN50x64", "aggregate": {"method": "none"}},
        ("Dense-CLIP", "RN50x64"),
    ),
    (
        {"name": "owlvit", "pretrained": "/cache/models--google--owlvit-large-patch14"},
        ("OwlViT", "ViT-L/14"),
    ),
    (
        {"name": "owlvit", "checkpoint": "google/owlv2-base-patch16"},
        ("OwlViT", "google/owlv2-base-patch16"),
    ),  # OWLv2: no paper row (backbone unmatched)
    ({"name": "cluster_clip", "backbone": "RN50x64", "aggregator": "spectral"}, None),
    ({"name": "my_plugin", "backbone": "RN50"}, None),
]
PAPER_ROW_CONFIGS = sorted(
    p for p in (CONFIG_DIR / "retriever").glob("*.yaml") if "Paper row" in p.read_text()
)


@pytest.mark.parametrize(("retriever", "expected"), PAPER_METHODS)
def test_paper_method_mapping(retriever: dict, expected) -> None:
    """Each retriever config maps to the (method, backbone) it reproduces, whether read
    from config.yaml or metrics.json; unknown methods map to None."""
    got = paper_method(retriever)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got[1] == expected[1]
        assert got[0].rstrip(".") == expected[0].rstrip(".")


@pytest.mark.parametrize("path", PAPER_ROW_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_row_config_maps_to_its_row(path: Path) -> None:
    """A retriever config whose header names a paper row ('Paper row "CLIP + Dense-CLIP,
    RN50"') maps to exactly that row of the packaged table, at the row's resolution."""
    method, backbone = re.search(r'Paper row "(.+), ([^,"]+)"', path.read_text()).groups()
    retriever = yaml.safe_load(path.read_text())["retriever"]
    got = paper_method(retriever)
    assert got is not None
    assert got[0].rstrip(".") == method.rstrip(".")
    assert got[1] == backbone
    run = _fake_run("coco", 5000, **retriever)
    assert reference_for(run, load_paper_table()).values, path.name


def _fake_run(dataset: str, images: int, **retriever) -> Run:
    metrics = {"images": images, "skipped_images": [], "retriever": retriever}
    return Run(Path("x"), "x", {"data": {"name": dataset}, "retriever": retriever}, metrics)


REFERENCES = [
    (
        _fake_run("coco", 5000, name="clip", backbone="RN50"),
        {"map@50": 0.5670, "map": 0.5080, "map@50_s-m": 0.2191, "reps / image": 1.0},
    ),
    (
        _fake_run(
            "lvis", 19809, name="dense_clip", backbone="RN50x64", resolution=448, with_global=True
        ),
        {
            "map@50": 0.7224,
            "map": 0.7336,
            "rare.map@50": 0.6168,
            "rare.map": 0.6233,
            "reps / image": 197.0,
        },
    ),
    (_fake_run("coco", 5000, name="dense_clip", backbone="RN50", resolution=224), None),
    (_fake_run("coco", 24, name="clip", backbone="RN50"), None),
    (_fake_run("nuimages", 16445, name="clip", backbone="RN50"), None),
    (_fake_run("coco", 5000, name="clip", backbone="RN-tiny"), None),
]


@pytest.mark.parametrize(("run", "expected"), REFERENCES)
def test_reference_numbers_need_row_resolution_and_full_split(run: Run, expected) -> None:
    """A run gets the paper's numbers (as fractions, per dataset column) only when
    method, backbone, resolution and the full evaluation split all match; otherwise the
    note starts with "no reference"."""
    ref = reference_for(run, load_paper_table())
    if expected is None:
        assert not ref.values
        assert ref.note.startswith("no reference")
    else:
        assert ref.values == pytest.approx(expected)


def test_paper_table_ships_with_the_package() -> None:
    """The paper's table is package data with 23 rows and numeric metric columns."""
    assert PAPER_TABLE.parent.name == "report"
    assert PAPER_TABLE.is_file()
    table = load_paper_table()
    assert len(table) == 23
    assert all(0 < float(r["coco_map@50"]) < 100 for r in table)
    assert canonical_backbone("ViT-B-16") == "ViT-B/16"


def test_ap_by_size_matches_a_numpy_loop() -> None:
    """Per bin, a category's AP keeps as positives only images whose largest instance is
    in the bin, drops the other positives and keeps every negative (checked against a
    direct loop over docs/protocol.md's formula, with ties and ignored images)."""
    rng = np.random.default_rng(0)
    q, n = 5, 40
    scores = rng.integers(0, 6, size=(q, n)).astype(np.float32)  # many ties
    relevant = rng.random((q, n)) < 0.4
    ignore = ~relevant & (rng.random((q, n)) < 0.2)
    area = np.where(relevant, rng.choice([100.0, 2000.0, 20000.0], size=(q, n)), 0.0)
    ids = rng.permutation(1000)[:n]
    got = ap_by_size(scores, relevant, ignore, area, ids, top_k=5)
    for name, (lo, hi) in {
        "small": (0, 1024),
        "medium": (1024, 9216),
        "large": (9216, math.inf),
    }.items():
        per_cat = got["bins"][name]["per_category"]
        for c in range(q):
            inside = relevant[c] & (area[c] >= lo) & (area[c] < hi)
            keep = ~ignore[c] & (inside | ~relevant[c])
            for key, k in (("ap@5", 5), ("ap", None)):
                want = reference_ap(scores[c], inside, ~keep, ids, k)
                assert per_cat[key][c] == pytest.approx(want, nan_ok=True), (name, c, key)
        assert got["bins"][name]["categories"] == int((np.array(per_cat["positives"]) > 0).sum())


def test_size_bins_agree_with_the_engine(two_runs, synthetic_coco) -> None:
    """One bin over all sizes gives the engine's AP@50 per category and the bin below
    96² gives its s-m AP@50, from scores.npz and the dataset's ground truth; the engine's
    per_size.json equals the bins recomputed for a run folder without it."""
    run_dir = two_runs[0]
    saved = np.load(run_dir / "scores.npz")
    ann, images = synthetic_coco
    gt = create_dataset("coco", annotations=ann, images=images).ground_truth()
    gt = gt.select_images(saved["image_ids"])
    got = ap_by_size(
        saved["scores"],
        gt.relevant,
        gt.ignore,
        gt.max_area,
        gt.image_ids,
        {"all": (0.0, math.inf), "s-m": (0.0, 96.0**2)},
    )
    rows = _metrics(run_dir)["per_category"]
    for key, bin_name in (("ap@50", "all"), ("ap@50_s-m", "s-m")):
        want = [math.nan if r[key] is None else r[key] for r in rows]
        assert got["bins"][bin_name]["per_category"]["ap@50"] == pytest.approx(want, nan_ok=True)
    written, source = load_per_size(run_dir)
    assert source == "per_size.json"
    assert set(written["bins"]) == {"small", "medium", "large"}
    (run_dir / "per_size.json").rename(run_dir / "per_size.json.bak")
    try:
        recomputed, source = load_per_size(run_dir)
    finally:
        (run_dir / "per_size.json.bak").rename(run_dir / "per_size.json")
    assert "recomputed" in source
    as_json = json.dumps(recomputed).replace("NaN", "null")  # run files store NaN as null
    assert json.loads(as_json) == written


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 2000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300, image.size
        assert image.height >= 200, image.size
        image.verify()


def test_plots_are_valid_pngs(two_runs, tmp_path: Path) -> None:
    """compare writes the per-category bars, AP-by-size and cost-accuracy plots, and a
    run's own plots land in its folder; each is a PNG PIL opens, of a readable size."""
    written = write_comparison(build_comparison(two_runs), tmp_path / "cmp")
    pngs = [p for p in written.values() if p.suffix == ".png"]
    assert {p.name for p in pngs} == {"per_category_ap.png", "ap_by_size.png", "cost_accuracy.png"}
    per_size, _ = load_per_size(two_runs[1])
    own = plot_run(tmp_path / "own", _metrics(two_runs[1])["per_category"], per_size)
    for path in [*pngs, *own.values()]:
        _assert_png(path)
    front = pareto_front(
        [CostPoint("a", 10, 0.5), CostPoint("b", 100, 0.4), CostPoint("c", 1000, 0.7)]
    )
    assert [p.label for p in front] == ["a", "c"]


def _wandb_records(path: Path):
    """The protobuf records of an offline ``.wandb`` file (wandb 0.31 ships no Python
    reader): a 7-byte header, then 32 KiB blocks of (crc32, length, type) chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_offline_wandb_run_holds_summary_table_and_plots(
    two_runs, synthetic_coco, tmp_path: Path
) -> None:
    """An offline wandb run is grouped by dataset, tagged with retriever, backbone and
    dataset, has the headline numbers in its summary, the per-category table under
    "per_category" and the plots as images."""
    run_dir = two_runs[0]
    metrics = _metrics(run_dir)
    rows = metrics.pop("per_category")
    cfg = load_config("demo", _overrides(synthetic_coco, tmp_path, "logger.wandb.mode=offline"))
    plots = plot_run(tmp_path, rows)
    sync_dir = log_to_wandb(cfg, tmp_path, metrics, rows, plots)
    wandb.teardown()  # finish() returns before wandb-core flushes the offline log; exit does
    assert sync_dir.name.startswith("offline-run-")
    summary, run = {}, None
    for record in _wandb_records(next(sync_dir.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            summary.update(
                {u.key: json.loads(u.value_json) for u in record.summary.update if u.key}
            )
    assert run.run_group == "coco"
    assert {"demo", "clip", "RN-tiny", "coco"} <= set(run.tags)
    for key in ("map@50", "map", "map@50_s-m", "bytes_per_image"):
        assert summary[key] == pytest.approx(metrics[key]), key
    assert summary["reps_per_image"] == metrics["reps_per_image"]["mean"]
    assert summary["random_weights"] is True
    tables = list((sync_dir / "files/media/table").glob(f"{PER_CATEGORY_TABLE}_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == len(rows)
    assert "ap@50" in table["columns"]
    images = list((sync_dir / "files/media/images").rglob("*.png"))
    assert len(images) == len(plots)


def test_cli_writes_tables_and_plots(two_runs, tmp_path: Path) -> None:
    """`retrieval compare A B --out DIR` exits 0 and writes compare.md/.csv, the deltas
    and the plots; a folder that is no run folder fails with a message naming it."""
    parser = build_parser()
    args = parser.parse_args(["compare", *map(str, two_runs), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    for name in ("compare.md", "compare.csv", "category_deltas.csv", "cost_accuracy.png"):
        assert (tmp_path / "o" / name).stat().st_size > 0, name
    bad = parser.parse_args(["compare", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        bad.func(bad)
