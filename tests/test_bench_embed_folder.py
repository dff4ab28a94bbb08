"""bench/bench_embed_folder.py runs end to end at tiny sizes and reports the goals of
issue 16 it measures (embed over a folder vs a plain loop; listing memory; webdataset
streaming vs the folder)."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    """The bench script as a module (registered, so a second import reuses it)."""
    if "bench_embed_folder" in sys.modules:
        return sys.modules["bench_embed_folder"]
    spec = importlib.util.spec_from_file_location(
        "bench_embed_folder", ROOT / "bench/bench_embed_folder.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_embed_folder"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~20 s: torch + Lightning here, and two listing subprocesses
def test_all_parts_run_and_report_the_goals(tmp_path: Path) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = [
        "--parts",
        "embed",
        "webdataset",
        "listing",
        "--shards",
        "3",
        "--images",
        "4",
        "--width",
        "96",
        "--height",
        "64",
        "--batch",
        "2",
        "--workers",
        "0",
        "--compare-workers",
        "-1",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--files",
        "30",
        "--subfolders",
        "4",
        "--clock",
        "cpu",
        "--threads",
        "1",
    ] + ["--tmp", str(tmp_path), "--json", str(out), "--md", str(md)]
    report = _bench().main(argv)

    assert json.loads(out.read_text()) == report
    assert report["command"].endswith("--md " + str(md))
    embed = report["embed"]
    (row,) = embed["rows"]
    assert row["backbone"] == "RN-tiny"
    assert row["goal"] == 0.9
    assert row["ratio"] == row["cpu"]["framework"]["ratio"] > 0
    assert row["met"] == (row["ratio"] >= 0.9)
    for clock in ("wall", "cpu"):
        assert set(row[clock]) == {"framework", "plain"}
        framework = row[clock]["framework"]
        assert framework["img_s"] > 0
        assert row[clock]["plain"]["img_s"] > 0
        low, high = framework["ratio_min_round"], framework["ratio_max_round"]
        assert low - 1e-9 <= framework["ratio"] <= high + 1e-9  # one round: all three equal
    assert row["max_abs_diff_stored_vs_plain"] < 1e-2  # same model, same pixels

    wds = report["webdataset"]
    assert wds["images"] == 4
    assert wds["shards"] == 3
    assert wds["shard_bytes"] > 0
    (row,) = wds["rows"]
    assert row["goal"] == 1.0
    assert row["ratio"] == row["cpu"]["webdataset"]["ratio"] > 0
    assert row["met"] == (row["ratio"] >= 1.0)
    for clock in ("wall", "cpu"):
        folder, streamed = row[clock]["folder"], row[clock]["webdataset"]
        assert folder["img_s"] > 0
        assert streamed["img_s"] > 0
        assert streamed["ratio"] == pytest.approx(streamed["img_s"] / folder["img_s"])

    listing = report["listing"]
    assert listing["files"] == 30
    assert listing["goal_mb"] == 300
    assert listing["ratio_to_goal"] == pytest.approx(listing["peak_rss_increase_mb"] / 300)
    assert listing["met"] == (listing["peak_rss_increase_mb"] < 300)
    first, rerun = listing["runs"]["first"], listing["runs"]["rerun"]
    assert first["images"] == rerun["images"] == 30
    # zero-byte files have no header to read; the rerun keeps every id and reads none
    assert first["headers_read"] == 0
    assert rerun["headers_read"] == 0
    # 30 items stay under the 10,000 that turn the bar on: counted, never shown
    assert [(t["what"], t["bar_shown"]) for t in first["progress"]] == [
        ("listing", False),
        ("reading image sizes", False),
    ]
    assert first["progress"][0]["items"] == 34  # 30 files + 4 folders
    text = md.read_text()
    assert "| RN-tiny |" in text
    assert "zero-byte" in text
    assert "| webdataset |" in text


def test_shards_hold_every_image_under_numbered_keys(tmp_path: Path) -> None:
    bench = _bench()
    bench.make_photos(tmp_path / "photos", 5, 96, 64)
    pattern, written = bench.pack_shards(tmp_path / "photos", tmp_path / "shards", 2)
    assert pattern == f"{tmp_path}/shards/{{000000..000001}}.tar"
    assert written > 0
    names = []
    for k in range(2):
        with tarfile.open(tmp_path / "shards" / f"{k:06d}.tar") as tar:
            names.append(tar.getnames())
    assert names == [["000000.jpg", "000001.jpg", "000002.jpg"], ["000003.jpg", "000004.jpg"]]
