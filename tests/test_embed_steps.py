"""The embed phase's steps on a dataset it does not change from outside: building a
collection only reads, the table is written by one explicit step (global rank 0, under
the run lock), the loader applies the retriever's transform, and the bad-image policy
set aside while the loader runs comes back whatever happens."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_folder import embed_config

from retrieval.config import load_config
from retrieval.data.collection import COLLECTION_FILE
from retrieval.data.images import load_image
from retrieval.engine import embedding
from retrieval.engine.loading import bad_images_passed_on, embed_loader
from retrieval.engine.parts import build_parts
from retrieval.factory import build_dataset


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        pixels = np.random.default_rng(k).integers(0, 255, (30 + k, 40, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k}.png")
    return folder


def _config(images: Path, run: Path, *extra: str) -> Any:
    """test_data_folder's embed config (a folder run, tiny random RN), batches of 2."""
    return embed_config(images, run, "loader.batch_size=2", *extra)


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("dataset", ["folder", "list", "webdataset"])
def test_building_a_collection_writes_nothing(tmp_path: Path, dataset: str) -> None:
    """Invariant: a dataset's constructor only reads. Building a folder, list or
    webdataset collection for a run folder (new, or holding a table the collection has
    since outgrown) leaves that folder's files as they were; the embed phase's
    ``sync_collection`` step writes the table."""
    import tarfile

    images = _images(tmp_path / "images", 3)
    run = tmp_path / "run"
    if dataset == "folder":
        data = [f"data.images={images}"]
    elif dataset == "list":
        (tmp_path / "list.csv").write_text("path\n" + "".join(f"img{k}.png\n" for k in range(3)))
        data = [f"data.list={tmp_path / 'list.csv'}", f"data.images={images}"]
    else:
        with tarfile.open(tmp_path / "000000.tar", "w") as tar:
            for k in range(3):
                tar.add(images / f"img{k}.png", arcname=f"{k:06d}.png")
        data = [f"data.shards={tmp_path / '000000.tar'}"]
    cfg = load_config(
        "demo", [f"dataset={dataset}", *data, f"run.output_dir={run}", "run.progress=false"]
    )
    run.mkdir()
    (run / "keep.txt").write_text("untouched")
    before = _files(run)
    built = build_dataset(cfg)
    assert _files(run) == before
    assert embedding.sync_collection(built)  # the embed step writes it
    assert (run / COLLECTION_FILE).exists()
    assert not embedding.sync_collection(build_dataset(cfg))  # unchanged: no rewrite

    if dataset == "folder":  # a grown folder: the stored table is outgrown, still not written
        _images(tmp_path / "images" / "more", 1)
        before = _files(run)
        grown = build_dataset(cfg)
        assert len(grown.image_ids) == 4
        assert _files(run) == before


def test_only_global_rank_zero_writes_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: the collection table is written by global rank 0 alone, under the run
    lock; another rank's embed reads the table and writes none (here: rank 1 first,
    with nothing stored yet, then rank 0)."""
    images, run = _images(tmp_path / "images", 2), tmp_path / "run"
    cfg = _config(images, run)

    class Trainer:
        is_global_zero = False

        def predict(self, *args: Any, **kwargs: Any) -> None:
            pass

    monkeypatch.setattr(embedding, "make_trainer", lambda *args: Trainer())
    monkeypatch.setattr(embedding, "global_rank", lambda: 1)
    embedding.embed(cfg)
    assert not (run / COLLECTION_FILE).exists()

    monkeypatch.setattr(embedding, "global_rank", lambda: 0)
    monkeypatch.setattr(Trainer, "is_global_zero", True)
    embedding.embed(cfg)
    assert (run / COLLECTION_FILE).exists()


def test_the_loader_applies_the_transform_and_the_dataset_stays_as_built(
    tmp_path: Path,
) -> None:
    """Invariant: the retriever's transform is applied by the embed phase's loader; the
    dataset is built without one and not patched (``transform`` stays None through
    ``build_parts`` and a whole embed), and each batch holds exactly
    ``image_transform(load_image(file))`` of its images."""
    images, run = _images(tmp_path / "images", 3), tmp_path / "run"
    cfg = _config(images, run)
    parts = build_parts(cfg)
    dataset, transform = parts.dataset, parts.retriever.image_transform
    assert dataset.transform is None

    loader = embed_loader(dataset, transform, dataset.image_ids, batch_size=3, num_workers=0)
    (batch,) = list(loader)
    expected = torch.stack(
        [transform(load_image(dataset.image_path(int(i)))) for i in batch["image_ids"]]
    )
    assert torch.equal(batch["pixels"], expected)

    assert embedding.embed(cfg, parts).embedded == 3
    assert dataset.transform is None


def test_a_failure_while_bad_images_are_passed_on_restores_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: the dataset's ``on_bad_image``, set to ``skip`` while the loader runs
    (the module applies the policy), is restored when the section fails: directly, and
    when the predict loop of an embed raises."""
    images = _images(tmp_path / "images", 2)
    cfg = _config(images, tmp_path / "run", "data.on_bad_image=error")
    parts = build_parts(cfg)
    dataset = parts.dataset
    seen: list[tuple[str, str]] = []

    def fail_inside() -> None:
        with bad_images_passed_on(dataset) as policy:
            seen.append((policy, dataset.on_bad_image))
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert seen == [("error", "skip")]
    assert dataset.on_bad_image == "error"

    def predict(*args: Any, **kwargs: Any) -> None:
        assert dataset.on_bad_image == "skip"
        raise RuntimeError("predict failed")

    trainer = SimpleNamespace(is_global_zero=True, predict=predict)
    monkeypatch.setattr(embedding, "make_trainer", lambda *args: trainer)
    with pytest.raises(RuntimeError, match="predict failed"):
        embedding.embed(cfg, parts)
    assert dataset.on_bad_image == "error"
