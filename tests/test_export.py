"""`retrieval export`: every valid representative of a run's live images, row by row as
the shards store it, to parquet or to clip-retrieval's npy + metadata folder; streamed
shard by shard, written atomically, never over an existing output unless forced."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retrieval.cli import main
from retrieval.config import load_stored_config
from retrieval.errors import ConfigError, StoreError
from retrieval.factory import build_dataset
from retrieval.representatives import Representatives
from retrieval.store import ShardStore
from retrieval.store import export as export_module
from retrieval.store.export import export_run

DIM = 8
R = 3
IMAGES_ROOT = "/data/photos"
FINGERPRINT = {"retriever": {"name": "fake", "dim": DIM}, "dtype": "float16"}


def _reps(images: int, seed: int) -> Representatives:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(images, R, DIM, generator=g), dim=-1)
    mask = torch.rand(images, R, generator=g) > 0.4
    mask[:, 1] = True  # every image has a valid slot; slot 0 often padding (rep_index != row)
    xx, yy = torch.rand(2, images, R, 2, generator=g).sort(dim=-1).values
    boxes = torch.stack([xx[..., 0], yy[..., 0], xx[..., 1], yy[..., 1]], dim=-1)
    return Representatives(emb, mask, boxes)


@pytest.fixture(scope="module")
def collection_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unlabelled-style run: 12 shards of 3 images (ids 100..135; more shards than
    one digit, so file keys are zero-padded) and an images.parquet that marks every
    fifth id removed, and all of shard 4 (an npy pair with no rows is never written)."""
    root = tmp_path_factory.mktemp("collection_run")
    store = ShardStore(root / "embeddings")
    ids = np.arange(100, 136)
    for i in range(12):
        chunk = ids[3 * i : 3 * i + 3]
        store.write_shard(f"rank000-{i:05d}", torch.from_numpy(chunk), _reps(3, seed=i))
    store.write_manifest(fingerprint=FINGERPRINT)
    removed = (ids % 5 == 0) | np.isin(ids, ids[12:15])
    paths = [f"/elsewhere/{i}.jpg" if i == 101 else f"sub/img_{i}.jpg" for i in ids]
    table = pa.table(
        {
            "image_id": pa.array(ids[::-1]),  # not in id order
            "path": paths[::-1],
            "size_bytes": np.full(len(ids), 1000),
            "removed": removed[::-1],
            "caption": [f"caption {i}" for i in ids[::-1]],
        }
    )
    pq.write_table(
        table.replace_schema_metadata({b"root": IMAGES_ROOT.encode()}), root / "images.parquet"
    )
    return root


def stored_rows(run: Path, live: set[int] | None = None) -> list[dict]:
    """Every valid representative of the run's shards, as the export should list them."""
    rows = []
    for shard in ShardStore(run / "embeddings").iter_shards():
        boxes = shard.reps.boxes
        for i, image_id in enumerate(shard.image_ids.tolist()):
            if live is not None and image_id not in live:
                continue
            for slot in torch.nonzero(shard.reps.mask[i]).flatten().tolist():
                rows.append(
                    {
                        "image_id": image_id,
                        "rep_index": slot,
                        "box": None if boxes is None else boxes[i, slot].numpy(),
                        "embedding": shard.reps.embeddings[i, slot].numpy(),
                    }
                )
    return rows


def live_ids(run: Path) -> set[int]:
    table = pq.read_table(run / "images.parquet").to_pandas()
    return set(table.image_id[~table.removed].tolist())


def paths_by_id(run: Path) -> dict[int, str]:
    """Each id's file: its path under the table's images root (absolute ones as they are)."""
    table = pq.read_table(run / "images.parquet")
    root = Path(table.schema.metadata[b"root"].decode())
    frame = table.to_pandas()
    return {i: str(root / p) for i, p in zip(frame.image_id, frame.path, strict=True)}


def read_npy_export(out: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Reads an npy export the way embedding-reader pairs it: both folders sorted by file
    name, zipped; the header's first line is what its numpy reader parses."""
    npys = sorted((out / "img_emb").glob("*.npy"))
    metas = sorted((out / "metadata").glob("*.parquet"))
    assert [p.stem.removeprefix("img_emb_") for p in npys] == [
        p.stem.removeprefix("metadata_") for p in metas
    ]
    embeddings, frames = [], []
    for npy, meta in zip(npys, metas, strict=True):
        first_line = npy.read_bytes()[:300].split(b"\n")[0]
        shape = re.search(r"'shape': \(([0-9]+), ([0-9]+)\)", str(first_line))
        assert shape is not None
        assert re.search(r"'descr': '([<f0-9]+)'", str(first_line))
        array = np.load(npy)
        assert array.ndim == 2
        assert (int(shape.group(1)), int(shape.group(2))) == array.shape
        frame = pq.read_table(meta).to_pandas()
        assert len(frame) == len(array) > 0
        embeddings.append(array)
        frames.append(frame)
    return np.concatenate(embeddings), pd.concat(frames, ignore_index=True)


def assert_rows(
    frame: pd.DataFrame, embeddings: np.ndarray, expected: list[dict], dtype: str
) -> None:
    assert len(frame) == len(embeddings) == len(expected)
    assert embeddings.dtype == np.dtype(dtype)
    for i, want in enumerate(expected):
        row = frame.iloc[i]
        assert row.image_id == want["image_id"]
        assert row.rep_index == want["rep_index"]
        if want["box"] is None:
            assert row.box is None
        else:
            np.testing.assert_array_equal(np.asarray(row.box, np.float32), want["box"])
        if dtype == "float16":
            np.testing.assert_array_equal(embeddings[i], want["embedding"].astype(np.float16))
        else:
            np.testing.assert_allclose(embeddings[i], want["embedding"].astype(np.float32))


def test_parquet_collection_run(collection_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "reps.parquet"
    result = export_run(collection_run, out, "parquet", "float16", progress=False)
    live = live_ids(collection_run)
    expected = stored_rows(collection_run, live)
    table = pq.read_table(out)
    frame = table.to_pandas()
    embeddings = np.stack(frame.embedding.to_numpy())
    assert_rows(frame, embeddings, expected, "float16")
    assert set(frame.image_id) == live & set(range(100, 136))
    assert not set(frame.image_id) & (set(range(100, 136)) - live)  # removed ids absent
    paths = paths_by_id(collection_run)
    assert frame.path.tolist() == [paths[i] for i in frame.image_id]
    assert "/elsewhere/101.jpg" in set(frame.path)
    assert f"{IMAGES_ROOT}/sub/img_102.jpg" in set(frame.path)
    assert (result.rows, result.images, result.shards) == (len(expected), len(live), 12)
    assert result.removed == 36 - len(live)
    assert result.missing_paths == 0
    assert result.files == [out]
    # streamed: one row group (at least) per non-empty shard, never one for the run
    assert pq.ParquetFile(out).metadata.num_row_groups >= 11
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), DIM)
    assert b"fake" in table.schema.metadata[b"retrieval.fingerprint"]
    assert [p.name for p in tmp_path.iterdir()] == ["reps.parquet"]  # no temporary left


def test_npy_collection_run(collection_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    result = export_run(collection_run, out, "npy", "float32", progress=False)
    expected = stored_rows(collection_run, live_ids(collection_run))
    embeddings, frame = read_npy_export(out)
    assert_rows(frame, embeddings, expected, "float32")
    assert list(frame.columns) == [
        "image_id", "path", "file_name", "rep_index", "box", "size_bytes", "caption"
    ]  # fmt: skip
    paths = paths_by_id(collection_run)
    assert frame.path.tolist() == [paths[i] for i in frame.image_id]
    # the hit shape's file_name, and the collection's metadata columns, row by row
    assert frame.file_name.tolist() == [Path(paths[i]).name for i in frame.image_id]
    assert frame.caption.tolist() == [f"caption {i}" for i in frame.image_id]
    assert (frame.size_bytes == 1000).all()
    # shard 4 has no live image: 11 pairs, keys 00..10 (zero-padded: sorted = numeric)
    names = sorted(p.name for p in (out / "img_emb").iterdir())
    assert names == [f"img_emb_{k:02d}.npy" for k in range(11)]
    assert sorted(p.name for p in out.iterdir()) == ["img_emb", "metadata"]
    assert len(result.files) == 22
    assert all(f.exists() for f in result.files)
    assert result.rows == len(expected)


def test_dense_run_parquet(dense_run: Path, tmp_path: Path, monkeypatch) -> None:
    """A real run (labelled: no images.parquet): paths from its dataset, boxes of its
    cells, fp16 embeddings exactly as stored; reads of a few images at a time make
    several row groups even from one shard."""
    monkeypatch.setattr(export_module, "READ_SLOTS", 5 * 16)
    out = tmp_path / "dense.parquet"
    result = export_run(dense_run, out, "parquet", progress=False)
    expected = stored_rows(dense_run)
    frame = pq.read_table(out).to_pandas()
    assert_rows(frame, np.stack(frame.embedding.to_numpy()), expected, "float16")
    assert expected[0]["box"] is not None  # Dense-CLIP cells have boxes
    dataset = build_dataset(load_stored_config(dense_run / "config.yaml"))
    assert frame.path.tolist() == [str(dataset.image_path(int(i))) for i in frame.image_id]
    assert all(Path(p).exists() for p in frame.path)
    assert result.images == 24
    assert result.missing_paths == 0
    assert pq.ParquetFile(out).metadata.num_row_groups >= 24 // 5


def test_dense_run_npy_cli(dense_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    args = ["export", str(dense_run), "--format", "npy", str(out), "--dtype", "float32"]
    assert main([*args, "--no-progress"]) == 0
    embeddings, frame = read_npy_export(out)
    assert_rows(frame, embeddings, stored_rows(dense_run), "float32")
    assert frame.path.notna().all()


def test_refuses_to_overwrite(collection_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reps.parquet"
    export_run(collection_run, out, "parquet", progress=False)
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="already exists.*--force"):
        export_run(collection_run, out, "parquet", progress=False)
    assert out.read_bytes() == before
    args = ["export", str(collection_run), "--format", "parquet", str(out), "--no-progress"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--dtype", "float32", "--force"]) == 0
    assert pq.read_table(out).schema.field("embedding").type == pa.list_(pa.float32(), DIM)

    folder = tmp_path / "emb"
    export_run(collection_run, folder, "npy", progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        export_run(collection_run, folder, "npy", progress=False)
    export_run(collection_run, folder, "npy", progress=False, force=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an npy export"):  # never deleted, even forced
        export_run(collection_run, other, "npy", progress=False, force=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "notes", "reps.parquet"]


def test_failed_export_leaves_nothing(collection_run: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    original = export_module._Writer._rows
    monkeypatch.setattr(export_module._Writer, "_rows", fail_on_third)
    for fmt, name in (("parquet", "reps.parquet"), ("npy", "emb")):
        calls.clear()
        with pytest.raises(RuntimeError, match="killed"):
            export_run(collection_run, tmp_path / name, fmt, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_paths_null_when_dataset_cannot_open(collection_run: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    shutil.copytree(collection_run / "embeddings", run / "embeddings")
    (run / "config.yaml").write_text("data:\n  name: coco\n  annotations: /nowhere/a.json\n")
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        result = export_run(run, tmp_path / "reps.parquet", "parquet", progress=False)
    frame = pq.read_table(tmp_path / "reps.parquet").to_pandas()
    assert frame.path.isna().all()
    assert len(frame) == len(stored_rows(run))
    assert result.missing_paths == result.rows
    assert result.removed == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "image paths left empty" in warnings[0].getMessage()


def test_not_a_run(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(StoreError, match="not a run folder"):
        export_run(folder, tmp_path / "x.parquet", "parquet", progress=False)
    assert main(["export", str(folder), "--format", "npy", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error:")
    assert str(folder) in err[0]
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_an_argparse_choice(collection_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(collection_run), "--format", "csv", str(tmp_path / "x")])
    assert exit_info.value.code == 2
