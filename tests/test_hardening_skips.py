"""Unreadable files in a user's own collection (issue 28 item 1, issue 24 item 9): for
unlabelled collections (folder, list, webdataset) the default is to skip them; every
skipped file with its reason is listed in the run folder's ``skipped.csv``; the embed's
summary counts the skipped apart from the embedded and names that file. Labelled
benchmarks keep ``error`` (a skipped image changes the metric)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.cli import main
from retrieval.config import load_config
from retrieval.engine.embedding import SKIPPED
from retrieval.store import ShardStore

TINY = [
    "retriever.pretrained=null",
    "retriever.backbone=RN-tiny",
    "run.progress=false",
    "loader.num_workers=0",
    "loader.batch_size=2",
]


def photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def rows(run: Path) -> list[dict[str, str]]:
    with (run / SKIPPED).open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("overrides", "policy"),
    [
        (["dataset=folder", "data.images=x"], "skip"),
        (["dataset=list", "data.list=x.csv"], "skip"),
        (["dataset=webdataset", "data.shards=x.tar"], "skip"),
        ([], "error"),  # the demo's labelled COCO-format set
        (["dataset=scenes"], "error"),
    ],
)
def test_default_policy_by_kind_of_dataset(overrides: list[str], policy: str) -> None:
    """Unlabelled collections default to skip; labelled benchmarks keep error."""
    assert load_config("demo", overrides).data.on_bad_image == policy


def test_embed_skips_lists_and_counts_unreadable_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's reproduction: a folder of good pictures, a truncated JPEG and a text
    file named .jpg, embedded with no on_bad_image set. The embed finishes; skipped.csv
    lists exactly the two bad files with their reasons; the summary says 3 embedded and 2
    left out, naming skipped.csv (not metrics.json, which embed does not write). A rerun
    embeds nothing and still lists them; once one is repaired it is embedded and no
    longer listed."""
    images, run = tmp_path / "photos", tmp_path / "run"
    for k in range(3):
        photo(images / f"good{k}.jpg", k)
    whole = photo(images / "cut.jpg", 9).read_bytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (images / "notes.jpg").write_text("not a picture")
    argv = ["embed", "demo", "dataset=folder", f"data.images={images}", f"run.output_dir={run}"]

    with caplog.at_level("INFO", logger="retrieval"):
        assert main([*argv, *TINY]) == 0
    summary = caplog.records[-1].getMessage()
    assert "3 images embedded now" in summary
    assert "2 unreadable now" in summary
    assert f"2 left out in all, listed in {run / SKIPPED}" in summary
    assert "metrics.json" not in caplog.text
    assert "summary.md" not in caplog.text
    listed = rows(run)
    assert sorted(Path(r["path"]).name for r in listed) == ["cut.jpg", "notes.jpg"]
    assert all(r["reason"] and r["image_id"] for r in listed)
    embedded, _ = ShardStore(run / "embeddings").contents()
    assert len(embedded) == 3

    caplog.clear()
    with caplog.at_level("INFO", logger="retrieval"):
        assert main([*argv, *TINY]) == 0
    summary = caplog.records[-1].getMessage()
    assert "0 images embedded now, 3 reused" in summary
    assert "2 left out in all" in summary
    assert len(rows(run)) == 2

    photo(images / "cut.jpg", 9)  # repaired
    caplog.clear()
    with caplog.at_level("INFO", logger="retrieval"):
        assert main([*argv, *TINY]) == 0
    assert "1 images embedded now, 3 reused" in caplog.records[-1].getMessage()
    assert [Path(r["path"]).name for r in rows(run)] == ["notes.jpg"]
    (images / "notes.jpg").unlink()
    assert main([*argv, *TINY]) == 0
    assert not (run / SKIPPED).exists()  # nothing left out: no stale list


def test_missing_listed_files_are_in_the_same_list(tmp_path: Path) -> None:
    """A list file naming a file that does not exist: under the default it is left out
    at listing time and listed in skipped.csv (no image id: it never got one)."""
    images, run = tmp_path / "photos", tmp_path / "run"
    photo(images / "a.jpg", 1)
    listing = images / "frames.csv"
    listing.write_text("path\na.jpg\ngone.jpg\n")
    argv = ["embed", "demo", "dataset=list", f"data.list={listing}", f"run.output_dir={run}"]
    assert main([*argv, *TINY]) == 0
    assert [(Path(r["path"]).name, r["reason"], r["image_id"]) for r in rows(run)] == [
        ("gone.jpg", "file not found", "")
    ]
