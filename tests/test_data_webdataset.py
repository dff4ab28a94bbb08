"""The ``webdataset`` dataset: tar shards listed from their headers, stable ids in the run's
collection table, streaming split over ranks and loader workers with no image lost or
duplicated, cut-short shards, and the embed phase over it (1 process and real DDP)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from retrieval.config import load_config
from retrieval.data.collection import COLLECTION_FILE
from retrieval.data.images import BadImageError
from retrieval.data.webdataset import WebDataset, expand_shards
from retrieval.errors import ConfigError, DataError, MissingFileError
from retrieval.factory import build_dataset, data_fingerprint
from retrieval.store import ShardStore

MTIME = 1_700_000_000


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int = MTIME) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, first: int, count: int, seed: int = 0, mtime: int = MTIME) -> Path:
    """``count`` samples keyed ``first``, ``first + 1``, ... (6 digits): .jpg, or .PNG for
    every third (extensions in any case), each with a .json member; plus a hidden image,
    a macOS ``._`` file and a folder entry, none of them samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("extra")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for k in range(first, first + count):
            key = f"{k:06d}"
            if k % 3 == 0:
                add(tar, f"{key}.PNG", image_bytes(k + seed, "PNG", (40 + k % 5, 30)), mtime)
            else:
                add(tar, f"{key}.jpg", image_bytes(k + seed, size=(40 + k % 5, 30)), mtime)
            add(tar, f"{key}.json", b'{"k": %d}' % k)
        add(tar, ".hidden.jpg", image_bytes(999))
        add(tar, "._000000.jpg", b"AppleDouble")
    return path


def make_shards(folder: Path, shards: int = 3, per_shard: int = 4) -> str:
    for s in range(shards):
        make_shard(folder / f"{s:06d}.tar", s * per_shard, per_shard)
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def small(image: Image.Image) -> torch.Tensor:
    """A transform to one size, so items of any size batch together."""
    return torch.from_numpy(np.array(image.resize((8, 8)))).permute(2, 0, 1).float()


def webdataset(pattern: str, run: Path | None = None, **options) -> WebDataset:
    """The dataset, its table then recorded as the embed phase does (``sync``)."""
    dataset = WebDataset(pattern, run_dir=run, progress=False, **options)
    dataset.collection.sync()
    return dataset


def table_paths(run: Path) -> dict[str, int]:
    table = pq.read_table(run / COLLECTION_FILE).to_pydict()
    return {
        p: i for p, i, r in zip(table["path"], table["image_id"], table["removed"], strict=True)
        if not r
    }  # fmt: skip


def read_ids(dataset: WebDataset, workers: int, batch_size: int = 3) -> list[int]:
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=dataset.collate
    )
    ids: list[int] = []
    for batch in loader:
        ids += batch["image_ids"].tolist() + [f["image_id"] for f in batch["failures"]]
    return ids


# listing and ids ----------------------------------------------------------------------
def test_shards_list_their_samples_from_headers(tmp_path: Path, caplog) -> None:
    """A brace pattern and a glob name the same shards; each sample's identity is its
    shard and key (``<shard>/<member>``), with the member's size and header mtime; hidden
    members, non-images and folders are left out and counted; ids follow path order."""
    pattern = make_shards(tmp_path / "shards", shards=2, per_shard=3)
    with caplog.at_level(logging.INFO, logger="retrieval"):
        dataset = webdataset(pattern, tmp_path / "run")
    assert "6 images in 2 shards, 10 members skipped (4 hidden, 6 not images)" in caplog.text
    table = pq.read_table(tmp_path / "run" / COLLECTION_FILE).to_pydict()
    assert table["path"] == [
        "000000.tar/000000.PNG", "000000.tar/000001.jpg", "000000.tar/000002.jpg",
        "000001.tar/000003.PNG", "000001.tar/000004.jpg", "000001.tar/000005.jpg",
    ]  # fmt: skip
    assert table["image_id"] == list(range(6))
    assert table["mtime_ns"] == [MTIME * 10**9] * 6
    with tarfile.open(tmp_path / "shards" / "000001.tar") as tar:
        assert table["size_bytes"][4] == tar.getmember("000004.jpg").size
    assert table["width"] == [40, 41, 42, 43, 44, 40]
    assert table["height"] == [30] * 6
    root = (tmp_path / "shards").absolute()
    assert pq.read_schema(tmp_path / "run" / COLLECTION_FILE).metadata[b"root"] == bytes(
        str(root), "utf8"
    )
    assert dataset.image_path(4) == root / "000001.tar" / "000004.jpg"
    np.testing.assert_array_equal(dataset.image_ids, range(6))

    globbed = webdataset(str(tmp_path / "shards" / "*.tar"), tmp_path / "run")
    np.testing.assert_array_equal(globbed.image_ids, range(6))
    item = globbed[3]  # random access by seeking to the member
    assert item["image_id"] == 3
    assert item["pixels"].shape == (3, 30, 43)
    assert item["path"] == str(root / "000001.tar" / "000003.PNG")
    with pytest.raises(TypeError, match="items_for_rank"):
        len(globbed)


def test_expansion_root_and_errors(tmp_path: Path) -> None:
    """webdataset's brace expansion (ranges, lists, ``::``), then globbing; the root is
    the folder before the first wildcard; no match, missing or non-tar shards are named."""
    root, shards = expand_shards(f"{tmp_path}/a/{{0..2}}.tar::{tmp_path}/b/x{{1,2}}.tar")
    assert root == tmp_path
    assert [p.relative_to(tmp_path).as_posix() for p in shards] == [
        "a/0.tar",
        "a/1.tar",
        "a/2.tar",
        "b/x1.tar",
        "b/x2.tar",
    ]
    with pytest.raises(MissingFileError, match=r"data.shards=.*nothing\*.tar matches no file"):
        webdataset(str(tmp_path / "nothing*.tar"))
    make_shard(tmp_path / "s" / "000000.tar", 0, 2)
    with pytest.raises(MissingFileError, match=r"(?s)1 of 2 shards .*000001.tar: shard not found"):
        webdataset(str(tmp_path / "s" / "{000000..000001}.tar"), on_bad_image="error")
    (tmp_path / "s" / "000001.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"000001.tar: not an uncompressed tar file"):
        webdataset(str(tmp_path / "s" / "{000000..000001}.tar"), on_bad_image="error")
    skipped = webdataset(str(tmp_path / "s" / "*.tar"), on_bad_image="skip")
    assert len(skipped.image_ids) == 2
    assert skipped.failures_at_start[0]["path"].endswith("000001.tar")
    (tmp_path / "t").mkdir()
    with tarfile.open(tmp_path / "t" / "0.tar", "w") as tar:
        add(tar, "readme.txt", b"hi")
    with pytest.raises(DataError, match=r"no images in data.shards=.*0 images in 1 shards"):
        webdataset(str(tmp_path / "t" / "*.tar"))


def test_ids_stay_stable_as_shards_are_added_and_removed(tmp_path: Path) -> None:
    """A grown range keeps every old id and numbers the new shard's samples after them;
    a shard left out of the glob marks its ids removed; a rewritten sample (another
    mtime) gets a new id; removed ids still resolve to their member."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    make_shards(shards, shards=2, per_shard=3)
    before = webdataset(str(shards / "{000000..000001}.tar"), run)
    first = table_paths(run)
    make_shard(shards / "000002.tar", 100, 2)
    grown = webdataset(str(shards / "{000000..000002}.tar"), run)
    after = table_paths(run)
    assert {p: after[p] for p in first} == first
    assert after["000002.tar/000100.jpg"] == 6
    assert after["000002.tar/000101.jpg"] == 7
    np.testing.assert_array_equal(grown.image_ids, [*before.image_ids, 6, 7])

    (shards / "000001.tar").rename(shards / "000001.old")
    make_shard(shards / "000000.tar", 0, 3, mtime=MTIME + 60)
    shrunk = webdataset(str(shards / "*.tar"), run)
    assert table_paths(run) == {
        "000000.tar/000000.PNG": 8, "000000.tar/000001.jpg": 9, "000000.tar/000002.jpg": 10,
        "000002.tar/000100.jpg": 6, "000002.tar/000101.jpg": 7,
    }  # fmt: skip
    np.testing.assert_array_equal(shrunk.image_ids, [6, 7, 8, 9, 10])
    assert shrunk.image_path(4) == shards.absolute() / "000001.tar" / "000004.jpg"


def test_a_key_has_one_image(tmp_path: Path, caplog) -> None:
    """The first image member of a key is the sample's; later ones (another extension,
    or the same name appended again) are skipped and counted, and the stream decodes
    the first one."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a/000000.jpg", image_bytes(1))
        add(tar, "a/000000.seg.png", image_bytes(2, "PNG"))  # another field, not the image
        add(tar, "a/000000.webp", image_bytes(3, "WEBP"))
        add(tar, "a/000001.JPEG", image_bytes(4))
        add(tar, "a/000000.jpg", image_bytes(5))
    with caplog.at_level(logging.INFO, logger="retrieval"):
        dataset = webdataset(str(path))
    assert "2 images in 1 shards, 3 members skipped (0 hidden, 1 not images, 2 second" in (
        caplog.text
    )
    items = list(dataset)
    assert [Path(i["path"]).name for i in items] == ["000000.jpg", "000001.JPEG"]
    expected = np.asarray(Image.open(io.BytesIO(image_bytes(1))).convert("RGB"))
    np.testing.assert_array_equal(items[0]["pixels"].permute(1, 2, 0).numpy(), expected)


# splitting over ranks and workers -----------------------------------------------------
def test_plan_gives_every_sample_to_exactly_one_reader(tmp_path: Path) -> None:
    """For any number of readers and any ids to yield, the readers' plans partition them;
    with at least as many shards as readers, whole shards (no shard read twice)."""
    dataset = webdataset(make_shards(tmp_path / "shards", shards=3, per_shard=4))
    for todo in (np.arange(12), np.array([0, 5, 6, 11]), np.array([5, 6]), np.array([7])):
        dataset.restrict(todo)
        for readers in range(1, 8):
            plans = [dataset.plan(c, readers) for c in range(readers)]
            ids = dataset._row_ids[np.concatenate(plans)]
            assert sorted(ids.tolist()) == todo.tolist()
            shards = [set(dataset._shard[p].tolist()) for p in plans]
            if readers <= len(set().union(*shards)):
                assert sum(len(s) for s in shards) == len(set().union(*shards))
    with pytest.raises(ValueError, match=r"image ids \[99\]"):
        dataset.restrict(np.array([1, 99]))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_ranks_and_workers_read_every_id_once(
    tmp_path: Path, monkeypatch, world: int, workers: int
) -> None:
    """Simulated DDP ranks (RANK / WORLD_SIZE) x DataLoader workers: every id exactly
    once over the ranks, each rank's count as ``items_for_rank`` says (its progress
    total); then only the restricted ids (one shard: split by sample)."""
    from retrieval.engine.progress import _items

    dataset = webdataset(make_shards(tmp_path / "shards", shards=3, per_shard=5), transform=small)
    for todo in (np.arange(15), np.array([5, 7, 8, 9])):
        dataset.restrict(todo)
        seen: list[int] = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            ids = read_ids(dataset, workers)
            assert len(ids) == dataset.items_for_rank(workers)
            assert _items(DataLoader(dataset, num_workers=workers)) == len(ids)
            seen += ids
        assert sorted(seen) == todo.tolist()


def test_streamed_items_equal_random_access(tmp_path: Path) -> None:
    """Iterating yields ``ImageDataset.__getitem__``'s items (a transform applied) for
    the same ids: pixels, paths, ``error=None``; ``collate`` batches them unchanged."""
    dataset = webdataset(make_shards(tmp_path / "shards", shards=2, per_shard=3), transform=small)
    streamed = {item["image_id"]: item for item in dataset}
    assert sorted(streamed) == list(range(6))
    for k, image_id in enumerate(dataset.image_ids):
        item = dataset[k]
        assert item.keys() == streamed[image_id].keys()
        assert item["error"] is None
        assert item["path"] == streamed[image_id]["path"]
        torch.testing.assert_close(item["pixels"], streamed[image_id]["pixels"])
    batch = dataset.collate(list(streamed.values()))
    assert batch["pixels"].shape == (6, 3, 8, 8)
    assert batch["failures"] == []


# cut-short shards ---------------------------------------------------------------------
def member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def test_shard_cut_short_before_listing(tmp_path: Path, caplog) -> None:
    """A shard cut through a sample: the samples before the cut stream as usual, the one
    cut through is a failure naming the shard (skip) or a BadImageError naming it (error);
    samples after the cut are unknown. Repaired, the cut sample and those after it get new
    ids and every other id stays."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    pattern = make_shards(shards, shards=2, per_shard=4)  # shard 1: keys 4..7
    whole = (shards / "000001.tar").read_bytes()
    info = member(shards / "000001.tar", "000006.PNG")
    cut(shards / "000001.tar", info.offset_data + info.size // 2)
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        dataset = webdataset(pattern, run, on_bad_image="skip")
    assert "000001.tar is cut short (unexpected end of data)" in caplog.text
    np.testing.assert_array_equal(dataset.image_ids, range(7))
    sizes = pq.read_table(run / COLLECTION_FILE).column("size_bytes").to_pylist()
    assert sizes[6] == info.size - info.size // 2  # the bytes it has
    items = list(dataset)
    bad = [item for item in items if item["pixels"] is None]
    assert [item["image_id"] for item in items] == list(range(7))
    assert len(bad) == 1
    assert bad[0]["path"].endswith("000001.tar/000006.PNG")
    assert bad[0]["error"].startswith("tar shard 000001.tar is cut short")

    strict = webdataset(pattern, run, on_bad_image="error")
    with pytest.raises(BadImageError, match=r"000001.tar/000006.PNG: tar shard 000001.tar is cut"):
        list(strict)

    (shards / "000001.tar").write_bytes(whole)
    kept = {p: i for p, i in table_paths(run).items() if not p.endswith("000006.PNG")}
    webdataset(pattern, run)
    after = table_paths(run)
    assert {p: after[p] for p in kept} == kept
    assert after["000001.tar/000006.PNG"] == 7
    assert after["000001.tar/000007.jpg"] == 8


def test_shard_cut_short_while_streaming(tmp_path: Path, caplog) -> None:
    """A shard cut after it was listed: the samples the stream does not reach are
    failures naming the shard, one per id, so none is lost or repeated; a shard cut
    between samples is flagged when listed (no end-of-archive blocks)."""
    pattern = make_shards(tmp_path / "shards", shards=2, per_shard=4)  # shard 0: keys 0..3
    dataset = webdataset(pattern, on_bad_image="skip", transform=small)
    shard = tmp_path / "shards" / "000000.tar"
    info = member(shard, "000002.jpg")
    cut(shard, info.offset_data + 10)
    ids = read_ids(dataset, workers=2, batch_size=2)
    assert sorted(ids) == list(range(8))
    failures = dataset.collate(list(dataset))["failures"]
    assert [Path(f["path"]).name for f in failures] == ["000002.jpg", "000003.PNG"]
    assert all("tar shard 000000.tar is cut short" in f["reason"] for f in failures)

    cut(shard, info.offset)  # at the header of 000002.jpg
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        listed = webdataset(pattern, on_bad_image="skip")
    assert "000000.tar is cut short (no end-of-archive blocks)" in caplog.text
    assert len(listed.image_ids) == 6


# config -------------------------------------------------------------------------------
def test_config_group_builds_it(tmp_path: Path) -> None:
    """``dataset=webdataset data.shards=PATTERN`` (braces kept as text) builds it, the
    run folder filled from run.output_dir; the pattern is not part of the embedding
    fingerprint (the collection table maps ids to samples), so a grown range re-uses
    stored shards; unset, the key is named."""
    pattern = make_shards(tmp_path / "shards", shards=2, per_shard=2)
    cfg = load_config(
        "demo",
        [
            "dataset=webdataset",
            f"data.shards={pattern}",
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
        ],
    )
    assert cfg.data.shards == pattern
    assert "images" not in cfg.data
    dataset = build_dataset(cfg)
    assert isinstance(dataset, WebDataset)
    assert len(dataset.image_ids) == 4
    assert not (tmp_path / "run" / COLLECTION_FILE).exists()  # building only reads
    assert dataset.collection.sync()
    assert (tmp_path / "run" / COLLECTION_FILE).exists()
    assert "shards" not in data_fingerprint(cfg)
    with pytest.raises(ConfigError, match="data.shards is not set"):
        build_dataset(load_config("demo", ["dataset=webdataset"]))


# the embed phase ----------------------------------------------------------------------
def embed_config(pattern: str, run: Path, *extra: str):
    return load_config(
        "demo",
        [
            "dataset=webdataset",
            f"data.shards={pattern}",
            f"run.output_dir={run}",
            "retriever.pretrained=null",
            "retriever.backbone=RN-tiny",
            "run.progress=false",
            "loader.num_workers=0",
            "loader.batch_size=4",
            *extra,
        ],
    )


def stored(run: Path) -> dict[int, torch.Tensor]:
    """Each stored id's representatives (failures left out); an id stored twice fails."""
    out: dict[int, torch.Tensor] = {}
    for shard in ShardStore(run / "embeddings").iter_shards():
        for k, image_id in enumerate(shard.image_ids.tolist()):
            assert image_id not in out
            out[image_id] = shard.reps.embeddings[k][shard.reps.mask[k]]
    return out


def test_embed_streams_every_id_then_only_new_ones(tmp_path: Path) -> None:
    """embed writes shards for every id (2 loader workers, progress bar on); a rerun
    embeds nothing; a new shard in a grown range embeds only its samples."""
    from retrieval.engine import embed

    shards, run = tmp_path / "shards", tmp_path / "run"
    pattern = make_shards(shards, shards=3, per_shard=3)
    first = embed(embed_config(pattern, run, "run.progress=true", "loader.num_workers=2"))
    assert first.embedded == 9
    assert sorted(stored(run)) == list(range(9))
    assert embed(embed_config(pattern, run)).embedded == 0

    make_shard(shards / "000003.tar", 100, 2)
    grown = embed(embed_config(str(shards / "{000000..000003}.tar"), run))
    assert (grown.embedded, grown.reused) == (2, 9)
    assert sorted(stored(run)) == list(range(11))


def test_embed_a_cut_shard(tmp_path: Path) -> None:
    """Under error the run stops naming the shard, keeping what it embedded before; the
    same run under skip then embeds only the rest, listing the cut sample as a failure."""
    from retrieval.engine import embed

    shards = tmp_path / "shards"
    pattern = make_shards(shards, shards=2, per_shard=4)
    info = member(shards / "000001.tar", "000006.PNG")
    cut(shards / "000001.tar", info.offset_data + info.size // 2)
    run = tmp_path / "run"
    with pytest.raises(BadImageError, match=r"000001.tar/000006.PNG: tar shard 000001.tar"):
        embed(embed_config(pattern, run, "loader.batch_size=2", "data.on_bad_image=error"))
    assert sorted(stored(run)) == list(range(6))  # the batches before the cut

    resumed = embed(embed_config(pattern, run, "data.on_bad_image=skip"))
    assert (resumed.embedded, resumed.skipped, resumed.reused) == (0, 1, 6)
    store = ShardStore(run / "embeddings")
    failures = [f for shard in store.iter_shards() for f in shard.failures]
    assert [(f["image_id"], Path(f["path"]).name) for f in failures] == [(6, "000006.PNG")]
    assert "000001.tar is cut short" in failures[0]["reason"]


# DDP ----------------------------------------------------------------------------------
def _embed_cli(pattern: str, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "retrieval.cli",
        "embed",
        "demo",
        "dataset=webdataset",
        f"data.shards={pattern}",
        f"run.output_dir={run}",
        "run.progress=false",
        "loader.batch_size=1",
        "store.dtype=float32",
        "logger.wandb.mode=disabled",
        "trainer.accelerator=cpu",
        *extra,
    ]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    """A real 2-process DDP run (gloo, 2 loader workers each: 4 readers over 3 shards,
    so split by sample) stores every id exactly once, in both ranks' shards, with
    embeddings bit-identical in fp32 to a 1-process run's."""
    pattern = make_shards(tmp_path / "shards", shards=3, per_shard=5)
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: same reduction order
    for cmd in (
        _embed_cli(pattern, one, "loader.num_workers=0"),
        _embed_cli(
            pattern, two, "loader.num_workers=2", "trainer.devices=2", "trainer.strategy=ddp"
        ),
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-4000:]

    ranks = {p.name.split("-")[0] for p in ShardStore(two / "embeddings").shard_paths()}
    assert ranks == {"rank000", "rank001"}
    a, b = stored(one), stored(two)
    assert sorted(a) == sorted(b) == list(range(15))
    for image_id in a:
        assert torch.equal(a[image_id], b[image_id]), image_id
    assert table_paths(one) == table_paths(two)


def test_images_inside_shards_open_for_the_gallery(tmp_path: Path) -> None:
    """Search hits of a webdataset run name ``<root>/<shard>/<member>``; that path opens
    as the member's image (what the gallery draws), and a missing member is a named
    BadImageError, not a crash."""
    from retrieval.data.images import load_image
    from retrieval.report.drawing import load_fitted

    shards, run = tmp_path / "shards", tmp_path / "run"
    pattern = make_shards(shards, shards=1, per_shard=2)
    dataset = webdataset(pattern, run)
    path = dataset.image_path(int(dataset.image_ids[0]))
    assert not path.exists()
    assert path.parent.suffix == ".tar"
    with tarfile.open(path.parent) as tar:
        member = tar.extractfile(path.name)
        assert member is not None
        expected = Image.open(io.BytesIO(member.read())).convert("RGB")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(expected))
    assert load_fitted(path, 64).size[0] == 64
    with pytest.raises(BadImageError, match="file not found"):
        load_image(path.parent / "missing.jpg")
