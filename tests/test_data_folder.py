"""Unlabelled collections: the ``folder`` and ``list`` datasets, their stable ids in the
run's collection table, and the own-images path end to end (embed, grow, index, search)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyarrow import csv

from retrieval.cli import main
from retrieval.config import data_schema, load_config
from retrieval.data.collection import (
    COLLECTION_FILE,
    FIXED_COLUMNS,
    join_metadata,
    live_image_ids,
    read_listing,
)
from retrieval.data.folder import FolderDataset, list_images
from retrieval.data.images import BadImageError
from retrieval.data.listfile import ListDataset
from retrieval.errors import ConfigError, DataError, MissingFileError, StoreError
from retrieval.factory import build_dataset, create_dataset
from retrieval.store import ShardStore


def make_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A small noise image (distinct bytes per seed) in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
    Image.fromarray(pixels).save(path, format=fmt.get(path.suffix.lower(), path.suffix[1:]))
    return path


def folder(run: Path, images: Path, **options) -> FolderDataset:
    """The dataset, its table then recorded as the embed phase does (``sync``)."""
    return synced(FolderDataset(images, run_dir=run, progress=False, **options))


def synced(dataset: FolderDataset | ListDataset) -> FolderDataset | ListDataset:
    dataset.collection.sync()
    return dataset


def ids_by_path(dataset: FolderDataset | ListDataset) -> dict[str, int]:
    table = dataset.collection.table.filter(pa.array(~_removed(dataset.collection.table)))
    return dict(
        zip(table.column("path").to_pylist(), table.column("image_id").to_pylist(), strict=True)
    )


def _removed(table: pa.Table) -> np.ndarray:
    return table.column("removed").to_numpy(zero_copy_only=False)


def read_table(run: Path) -> pa.Table:
    return pq.read_table(run / COLLECTION_FILE)


# stable ids ---------------------------------------------------------------------------
def test_ids_stay_stable_as_the_folder_grows_and_changes(tmp_path: Path) -> None:
    """Unchanged files keep their ids; new files get new ids above every id ever given,
    in path order; a modified file gets a new id and its old one is removed, as is a
    deleted file's; removed ids still resolve to their path."""
    images, run = tmp_path / "images", tmp_path / "run"
    for k, name in enumerate(["b.jpg", "a.png", "sub/c.jpg", "d.jpg"]):
        make_image(images / name, seed=k, size=(40 + k, 30))
    first = folder(run, images)
    before = ids_by_path(first)
    assert before == {"a.png": 0, "b.jpg": 1, "d.jpg": 2, "sub/c.jpg": 3}  # path order
    table = read_table(run)
    assert tuple(table.column_names) == FIXED_COLUMNS
    assert table.column("width").to_pylist() == [41, 40, 43, 42]
    assert table.schema.metadata[b"root"] == str(images.absolute()).encode()

    make_image(images / "e.jpg", seed=10)
    make_image(images / "0.jpg", seed=11)
    modified = images / "b.jpg"
    stat = modified.stat()
    make_image(modified, seed=12)
    os.utime(modified, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (images / "d.jpg").unlink()
    second = folder(run, images)
    after = ids_by_path(second)
    assert after["a.png"] == 0
    assert after["sub/c.jpg"] == 3
    assert after["0.jpg"] == 4
    assert after["b.jpg"] == 5
    assert after["e.jpg"] == 6
    assert "d.jpg" not in after
    np.testing.assert_array_equal(second.image_ids, [0, 3, 4, 5, 6])
    np.testing.assert_array_equal(live_image_ids(run), second.image_ids)
    table = read_table(run)
    assert table.column("image_id").to_pylist() == list(range(7))
    assert table.column("removed").to_pylist() == [False, True, True, False, False, False, False]
    assert second.image_path(1) == images.absolute() / "b.jpg"  # removed, still resolves
    assert second.image_path(2) == images.absolute() / "d.jpg"
    with pytest.raises(KeyError, match="image id 99"):
        second.image_path(99)


def test_every_rank_computes_the_same_table(tmp_path: Path) -> None:
    """The table depends only on the previous table and the folder: two ranks from the
    same previous table agree, and a rank reading a table another just wrote changes
    nothing (not even the file)."""
    images = tmp_path / "images"
    for k in range(3):
        make_image(images / f"{k}.jpg", seed=k)
    folder(tmp_path / "rank0", images)
    shutil.copytree(tmp_path / "rank0", tmp_path / "rank1")
    make_image(images / "new.png", seed=9)
    folder(tmp_path / "rank0", images)
    written = (tmp_path / "rank0" / COLLECTION_FILE).stat().st_mtime_ns
    folder(tmp_path / "rank1", images)
    folder(tmp_path / "rank0", images)
    assert read_table(tmp_path / "rank0").equals(read_table(tmp_path / "rank1"), True)
    assert (tmp_path / "rank0" / COLLECTION_FILE).stat().st_mtime_ns == written


def test_a_zero_byte_file_gets_no_header_read(tmp_path: Path, monkeypatch) -> None:
    """An empty file has no header to read: its width and height stay null without PIL
    being asked (the embed phase reports it under data.on_bad_image)."""
    import retrieval.data.collection as collection

    images = tmp_path / "images"
    make_image(images / "a.jpg", seed=0)
    (images / "empty.jpg").write_bytes(b"")
    read = collection.image_size
    opened: list[str] = []

    def image_size(path):
        assert Path(path).name != "empty.jpg", "a zero-byte file's header was read"
        opened.append(Path(path).name)
        return read(path)

    monkeypatch.setattr(collection, "image_size", image_size)
    dataset = folder(tmp_path / "run", images)
    assert opened == ["a.jpg"]
    table = read_table(tmp_path / "run")
    assert table.column("path").to_pylist() == ["a.jpg", "empty.jpg"]
    assert table.column("width").to_pylist() == [40, None]
    assert table.column("height").to_pylist() == [30, None]
    np.testing.assert_array_equal(dataset.image_ids, [0, 1])  # still live: embed reports it


@pytest.mark.parametrize("with_metadata", [False, True])
def test_an_unchanged_rerun_keeps_the_table_as_it_is(
    tmp_path: Path, monkeypatch, with_metadata: bool
) -> None:
    """A rerun over the same files (removed ids and metadata columns included) reuses the
    previous table: no header read, no rewrite (the file's mtime stays), and the same
    table the full assignment computes; any change still goes the full way."""
    import retrieval.data.collection as collection

    images, run = tmp_path / "images", tmp_path / "run"
    for k, name in enumerate(["b.jpg", "a.png", "sub/c.jpg", "d.jpg"]):
        make_image(images / name, seed=k)
    options = {}
    if with_metadata:
        source = tmp_path / "meta.csv"
        csv.write_csv(pa.table({"path": ["a.png", "d.jpg"], "camera": ["x", "y"]}), source)
        options["metadata"] = str(source)
    folder(run, images, **options)
    (images / "d.jpg").unlink()
    make_image(images / "0.jpg", seed=9)
    folder(run, images, **options)  # d.jpg removed, 0.jpg new: out of path order
    written = (run / COLLECTION_FILE).stat().st_mtime_ns
    before = read_table(run)

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged rerun read a header or rewrote the table")

    monkeypatch.setattr(collection, "image_size", refuse)
    monkeypatch.setattr(collection, "write_collection", refuse)
    again = folder(run, images, **options)
    assert (run / COLLECTION_FILE).stat().st_mtime_ns == written
    assert again.collection.table.equals(before, check_metadata=True)
    assert ids_by_path(again) == {"0.jpg": 4, "a.png": 0, "b.jpg": 1, "sub/c.jpg": 3}
    np.testing.assert_array_equal(again.image_ids, [0, 1, 3, 4])

    monkeypatch.setattr(collection, "_unchanged", lambda *args: False)  # the full way
    files = list_images(images.absolute(), progress=False).table()
    if with_metadata:
        files = join_metadata(files, read_listing(source, "data.metadata"), source)
    previous = collection.read_collection(run)
    full_table = collection.assign_ids(previous, files, images.absolute(), False)
    assert full_table.equals(before, check_metadata=True)


def test_ids_follow_path_order_when_folders_interleave(tmp_path: Path) -> None:
    """The listing comes in sorted chunks, one per folder; when a folder's files fall
    between another's (``m/x.jpg`` between ``a.jpg`` and ``z.jpg``) ids still follow
    path order."""
    images = tmp_path / "images"
    for k, name in enumerate(["z.jpg", "m/x.jpg", "a.jpg", "m-n/y.jpg", "m/a/b.jpg"]):
        make_image(images / name, seed=k)
    dataset = folder(tmp_path / "run", images)
    paths = ["a.jpg", "m-n/y.jpg", "m/a/b.jpg", "m/x.jpg", "z.jpg"]
    assert ids_by_path(dataset) == {p: k for k, p in enumerate(paths)}
    assert read_table(tmp_path / "run").column("path").to_pylist() == paths


def test_shards_without_a_table_are_refused(tmp_path: Path) -> None:
    """A run holding embeddings but no collection table cannot map ids to files: one
    error naming the file, instead of reusing ids for other images."""
    make_image(tmp_path / "images" / "a.jpg", seed=0)
    (tmp_path / "run" / "embeddings").mkdir(parents=True)
    (tmp_path / "run" / "embeddings" / "rank0-00000.safetensors").write_bytes(b"x")
    with pytest.raises(StoreError, match=COLLECTION_FILE):
        folder(tmp_path / "run", tmp_path / "images")


def test_without_a_run_folder_ids_live_in_memory(tmp_path: Path) -> None:
    make_image(tmp_path / "a.jpg", seed=0)
    make_image(tmp_path / "b.jpg", seed=1)
    dataset = create_dataset("folder", images=str(tmp_path), max_images=1)
    np.testing.assert_array_equal(dataset.image_ids, [0])
    assert not (tmp_path / COLLECTION_FILE).exists()
    assert dataset[0]["pixels"].shape == (3, 30, 40)


# listing ------------------------------------------------------------------------------
def test_listing_is_recursive_and_skips_what_it_counts(tmp_path: Path, caplog) -> None:
    """Extensions in any case, nested folders, a symlinked folder followed once (a loop
    ends), hidden files and folders and non-image files skipped and counted."""
    images = tmp_path / "images"
    outside = tmp_path / "outside"
    for name in ["A.JPG", "x/b.Png", "x/y/c.tiff", "x/d.webp", "e.BMP", "f.gif", "g.jpeg"]:
        make_image(images / name, seed=len(name))
    make_image(outside / "h.jpg", seed=1)
    make_image(images / ".hidden.jpg", seed=2)
    make_image(images / ".cache" / "i.jpg", seed=3)
    (images / "notes.txt").write_text("not an image")
    (images / "x" / "raw.cr2").write_bytes(b"raw")
    (images / "x" / "y" / "loop").symlink_to(images, target_is_directory=True)
    (images / "linked").symlink_to(outside, target_is_directory=True)
    (images / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level(logging.INFO, logger="retrieval"):
        dataset = folder(tmp_path / "run", images)
    assert sorted(ids_by_path(dataset)) == [
        "A.JPG", "e.BMP", "f.gif", "g.jpeg", "linked/h.jpg", "x/b.Png", "x/d.webp",
        "x/y/c.tiff",
    ]  # fmt: skip
    assert (
        "8 images, 6 skipped (2 hidden, 2 not images, 1 broken links, 1 symlinked folders "
        "listed already)" in caplog.text
    )


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(DataError, match=r"no images under .*empty: 0 images, 2 skipped "):
        folder(tmp_path / "run", tmp_path / "empty")
    with pytest.raises(MissingFileError, match="image folder not found: .*nothere"):
        folder(tmp_path / "run", tmp_path / "nothere")


# metadata -----------------------------------------------------------------------------
@pytest.fixture
def three_images(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for k, name in enumerate(["a.jpg", "b.jpg", "sub/c.jpg"]):
        make_image(images / name, seed=k)
    return images


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_metadata_joins_by_relative_path(three_images: Path, tmp_path: Path, suffix) -> None:
    """Every other column of the metadata file joins the table by path (spelt freely:
    ``./sub/c.jpg``); images it does not name get nulls, its extra rows are ignored."""
    meta = pa.table(
        {"path": ["./sub/c.jpg", "a.jpg", "gone.jpg"], "camera": ["front", "back", "x"]}
    )
    source = tmp_path / f"meta{suffix}"
    if suffix == ".csv":
        csv.write_csv(meta, source)
    else:
        pq.write_table(meta, source)
    folder(tmp_path / "run", three_images, metadata=str(source))
    table = read_table(tmp_path / "run")
    assert table.column_names == [*FIXED_COLUMNS, "camera"]
    assert dict(zip(table["path"].to_pylist(), table["camera"].to_pylist(), strict=True)) == {
        "a.jpg": "back",
        "b.jpg": None,
        "sub/c.jpg": "front",
    }


def test_metadata_errors(three_images: Path, tmp_path: Path) -> None:
    """Paths that match nothing (the file and samples of both sides named), duplicate
    paths, no path column, a clashing column and a missing file each stop the run."""
    bad = tmp_path / "meta.csv"
    bad.write_text("path,camera\n/abs/a.jpg,front\nimages/b.jpg,back\n")
    with pytest.raises(DataError, match=r"meta.csv: none of its 2 paths.*/abs/a.jpg.*'a.jpg'"):
        folder(tmp_path / "run", three_images, metadata=str(bad))
    bad.write_text("path,camera\na.jpg,front\n./a.jpg,back\n")
    with pytest.raises(DataError, match=r"data.metadata=.*meta.csv: 1 path\(s\).*a.jpg"):
        folder(tmp_path / "run", three_images, metadata=str(bad))
    bad.write_text("file,camera\na.jpg,front\n")
    with pytest.raises(DataError, match="no 'path' column .*columns: file, camera"):
        folder(tmp_path / "run", three_images, metadata=str(bad))
    bad.write_text("path,width\na.jpg,3\n")
    with pytest.raises(DataError, match="width clash"):
        folder(tmp_path / "run", three_images, metadata=str(bad))
    with pytest.raises(MissingFileError, match="data.metadata=.*nope.csv not found"):
        folder(tmp_path / "run", three_images, metadata=str(tmp_path / "nope.csv"))


# list files ---------------------------------------------------------------------------
def test_list_csv_relative_to_its_folder(three_images: Path, tmp_path: Path) -> None:
    """Relative paths start from the list file's folder; extra columns are kept; a grown
    list keeps the old ids (the same rules as folder)."""
    listing = three_images / "list.csv"
    listing.write_text("path,label\nb.jpg,2\nsub/c.jpg,3\n")
    first = synced(ListDataset(str(listing), run_dir=tmp_path / "run", progress=False))
    assert ids_by_path(first) == {"b.jpg": 0, "sub/c.jpg": 1}
    listing.write_text("path,label\nb.jpg,2\nsub/c.jpg,3\na.jpg,1\n")
    second = synced(ListDataset(str(listing), run_dir=tmp_path / "run", progress=False))
    assert ids_by_path(second) == {"b.jpg": 0, "sub/c.jpg": 1, "a.jpg": 2}
    assert read_table(tmp_path / "run")["label"].to_pylist() == [2, 3, 1]
    assert second.image_path(2) == three_images / "a.jpg"


def test_list_parquet_with_images_root_and_absolute_paths(three_images: Path, tmp_path) -> None:
    listing = tmp_path / "elsewhere" / "list.parquet"
    listing.parent.mkdir()
    absolute = str(three_images / "sub" / "c.jpg")
    pq.write_table(pa.table({"path": ["a.jpg", absolute], "score": [0.5, 0.25]}), listing)
    dataset = synced(
        ListDataset(
            str(listing), images=str(three_images), run_dir=tmp_path / "run", progress=False
        )
    )
    # ids in path order: the absolute path sorts first
    assert [dataset.image_path(int(i)) for i in dataset.image_ids] == [
        Path(absolute),
        three_images / "a.jpg",
    ]
    assert dataset[0]["pixels"].shape == (3, 30, 40)
    assert read_table(tmp_path / "run")["score"].to_pylist() == [0.25, 0.5]


def test_list_errors(three_images: Path, tmp_path: Path) -> None:
    """Duplicate paths are named; a missing file stops the run under error and is left
    out under skip; a list naming no existing file is an error."""
    listing = three_images / "list.csv"
    listing.write_text("path\na.jpg\nb.jpg\n./a.jpg\nsub/../b.jpg\n")
    with pytest.raises(DataError, match=r"data.list=.*list.csv: 2 path\(s\).*\(a.jpg, b.jpg\)"):
        ListDataset(str(listing), on_bad_image="error", progress=False)
    listing.write_text("path\na.jpg\nmissing.jpg\n")
    with pytest.raises(
        MissingFileError, match=r"(?s)1 of 2 files listed in .*list.csv.*missing.jpg"
    ):
        ListDataset(str(listing), on_bad_image="error", progress=False)
    dataset = ListDataset(str(listing), on_bad_image="skip", progress=False)
    assert len(dataset) == 1
    assert dataset.failures_at_start[0]["path"].endswith("missing.jpg")
    listing.write_text("path\nmissing.jpg\n")
    with pytest.raises(DataError, match="names no image that exists"):
        ListDataset(str(listing), on_bad_image="skip", progress=False)
    with pytest.raises(DataError, match="unknown format '.txt'"):
        ListDataset(str(make_text(tmp_path / "list.txt")), progress=False)


def make_text(path: Path) -> Path:
    path.write_text("path\na.jpg\n")
    return path


# config and registry ------------------------------------------------------------------
@pytest.mark.parametrize(("group", "key"), [("folder", "images"), ("list", "list")])
def test_config_group_and_registry_listing(group: str, key: str, capsys) -> None:
    """``dataset=folder|list`` swaps the group; the required path left unset names its
    key; ``retrieval list`` shows each with its data.* keys (never the run folder)."""
    cfg = load_config("demo", [f"dataset={group}"])
    assert cfg.data.name == group
    assert cfg.data[key] is None
    assert "annotations" not in cfg.data
    with pytest.raises(ConfigError, match=f"data.{key} is not set"):
        build_dataset(cfg)
    schema = set(data_schema(group))
    assert key in schema
    assert "run_dir" not in schema
    assert "progress" not in schema
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    cells = [line.split("│") for line in out.splitlines()]
    row = next("│".join(c) for c in cells if len(c) > 2 and c[1].strip() == group)
    assert f"{key}," in row
    assert "on_bad_image" in row


# end to end ---------------------------------------------------------------------------
def embed_config(images: Path, run: Path, *extra: str):
    return load_config(
        "demo",
        [
            "dataset=folder",
            f"data.images={images}",
            f"run.output_dir={run}",
            "retriever.pretrained=null",
            "retriever.backbone=RN-tiny",
            "run.progress=false",
            "loader.num_workers=0",
            "loader.batch_size=4",
            *extra,
        ],
    )


@pytest.mark.slow
def test_own_images_embed_grow_index_search(tmp_path: Path, monkeypatch) -> None:
    """embed writes shards for every live id; adding 2 images embeds only those 2; eval
    refuses the unlabelled set; the index searches and the hits' JSON carries each file
    path from the collection table (the folder is not listed again)."""
    from retrieval.engine import embed, evaluate
    from retrieval.index import build_index, open_index

    images, run = tmp_path / "images", tmp_path / "run"
    for k in range(6):
        make_image(images / f"img{k}.jpg", seed=k, size=(48 + 8 * k, 40))
    first = embed(embed_config(images, run))
    assert first.embedded == 6
    np.testing.assert_array_equal(np.sort(ShardStore(run / "embeddings").accounted_ids()), range(6))

    make_image(images / "new" / "x.png", seed=20)
    make_image(images / "new" / "y.jpg", seed=21)
    second = embed(embed_config(images, run))
    assert (second.embedded, second.reused) == (2, 6)
    stored = np.sort(ShardStore(run / "embeddings").accounted_ids())
    np.testing.assert_array_equal(stored, live_image_ids(run))

    with pytest.raises(ConfigError, match="unlabelled collection"):
        evaluate(embed_config(images, tmp_path / "eval"))

    index_dir = build_index(run, "exact", device="cpu", progress=False)
    index = open_index(index_dir, "cpu")
    vector = index.embed(["a photo"])
    hits = index.search_vectors(vector, top=8)[0]
    assert sorted(h.image_id for h in hits) == list(range(8))

    import retrieval.data.folder

    def no_listing(*args, **kwargs):
        raise AssertionError("search listed the folder")

    monkeypatch.setattr(retrieval.data.folder, "list_images", no_listing)
    written = read_table(run)
    out = tmp_path / "hits.json"
    argv = ["search", str(index_dir), "a photo", "--top", "8", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    files = dict(zip(written["image_id"].to_pylist(), written["path"].to_pylist(), strict=True))
    for hit in json.loads(out.read_text())["hits"]:
        assert hit["path"] == str(images / files[hit["image_id"]])
    assert read_table(run).equals(written, True)


@pytest.mark.slow
def test_bad_files_are_counted_or_named(tmp_path: Path) -> None:
    """A zero-byte file, a truncated JPEG and text named .jpg: under skip each is listed
    in the run's shards (width/height null where the header is unreadable) and the rest
    embedded; under error the run stops naming one of them."""
    from retrieval.engine import embed

    images = tmp_path / "images"
    for k in range(3):
        make_image(images / f"good{k}.jpg", seed=k)
    (images / "empty.jpg").write_bytes(b"")
    whole = make_image(images / "cut.jpg", seed=7, size=(64, 64)).read_bytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "text.jpg").write_text("not a jpeg at all")

    run = tmp_path / "skip"
    result = embed(embed_config(images, run, "data.on_bad_image=skip"))
    assert (result.embedded, result.skipped) == (3, 3)  # counted apart
    store = ShardStore(run / "embeddings")
    failures = [f for shard in store.iter_shards() for f in shard.failures]
    assert sorted(Path(f["path"]).name for f in failures) == ["cut.jpg", "empty.jpg", "text.jpg"]
    assert sum(len(shard.image_ids) for shard in store.iter_shards()) == 3
    table = read_table(run).to_pydict()
    sizes = dict(zip(table["path"], table["width"], strict=True))
    assert sizes["empty.jpg"] is None
    assert sizes["text.jpg"] is None
    assert sizes["cut.jpg"] == 64
    assert embed(embed_config(images, run, "data.on_bad_image=skip")).embedded == 0

    with pytest.raises(BadImageError, match=r"(cut|empty|text)\.jpg.*data.on_bad_image=skip"):
        embed(embed_config(images, tmp_path / "error", "data.on_bad_image=error"))


@pytest.mark.slow
def test_a_file_renamed_between_embed_and_update(tmp_path: Path) -> None:
    """A file renamed after `embed`: `index update` alone changes nothing (the index
    follows the run, which has not seen the rename); once `embed` runs again the new
    path gets a new id (embedded, the 5 others reused), the old id is removed, and after
    `index update` a search never returns the old id and finds the renamed file with the
    score its pixels had before (same pixels, same embedding)."""
    from retrieval.engine import embed
    from retrieval.index import build_index, open_index
    from retrieval.index.update import update_index

    images, run = tmp_path / "images", tmp_path / "run"
    for k in range(6):
        make_image(images / f"img{k}.jpg", seed=k, size=(48 + 8 * k, 40))
    embed(embed_config(images, run))
    old_id = ids_by_path(folder(run, images))["img2.jpg"]
    index_dir = build_index(run, "faiss-flat", device="cpu", progress=False)
    with open_index(index_dir, "cpu") as index:
        vector = index.embed(["a photo"])
        before = {h.image_id: h.score for h in index.search_vectors(vector, top=6)[0]}

    (images / "moved").mkdir()
    os.rename(images / "img2.jpg", images / "moved" / "img2b.jpg")
    unchanged = update_index(index_dir, progress=False, device="cpu")
    assert (unchanged.added, unchanged.removed) == (0, 0)

    again = embed(embed_config(images, run))
    assert (again.embedded, again.reused) == (1, 5)
    paths = ids_by_path(folder(run, images))
    new_id = paths["moved/img2b.jpg"]
    assert new_id != old_id
    assert "img2.jpg" not in paths
    updated = update_index(index_dir, progress=False, device="cpu")
    assert (updated.added, updated.removed) == (1, 1)
    with open_index(index_dir, "cpu") as index:
        after = {h.image_id: h.score for h in index.search_vectors(vector, top=6)[0]}
    assert old_id not in after
    assert new_id in after
    assert after[new_id] == pytest.approx(before[old_id], abs=1e-6)
