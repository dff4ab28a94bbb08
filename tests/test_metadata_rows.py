"""Metadata rows that name no image are counted and the first few named (issue 28 item 9):
a typo'd, absolute or folder-relative path in the metadata CSV is not silently dropped."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from retrieval.data.folder import FolderDataset


def test_unmatched_metadata_rows_are_counted_and_named(tmp_path: Path, caplog) -> None:
    """Two of five rows match files under data.images; the other three (a typo, an
    absolute path, a path that repeats the folder's own name) are counted and named,
    and the matched rows' columns still join."""
    images = tmp_path / "photos"
    (images / "2023").mkdir(parents=True)
    for name in ("2023/a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(images / name)
    rows = ["2023/a.jpg", "b.jpg", "2023/aa.jpg", str(images / "b.jpg"), "photos/b.jpg"]
    csv = tmp_path / "meta.csv"
    csv.write_text("path,place\n" + "".join(f"{p},p{i}\n" for i, p in enumerate(rows)))
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        dataset = FolderDataset(images, metadata=str(csv), run_dir=tmp_path / "run", progress=False)
    table = dataset.collection.table
    assert dict(zip(table["path"].to_pylist(), table["place"].to_pylist(), strict=True)) == {
        "2023/a.jpg": "p0",
        "b.jpg": "p1",
    }
    (message,) = [r.getMessage() for r in caplog.records if "name no image found" in r.getMessage()]
    assert "3 of its 5 rows name no image found (2023/aa.jpg, " in message
    assert "relative to data.images" in message
