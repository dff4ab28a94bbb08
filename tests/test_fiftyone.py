"""The FiftyOne integration against the real ``fiftyone`` package and its bundled MongoDB
(loopback, temporary folder; tests/fiftyone_fixtures.py): the exported dataset, the
similarity backend's order against ``retrieval search``, re-export after an index update.

Skipped, saying why, where the fiftyone extra is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import fake_runs
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from fiftyone_fixtures import fiftyone_db, needs_fiftyone  # noqa: F401 - the fixture
from serve_server import GRID, write_vector_run

from retrieval.aggregate import grid_cell_boxes
from retrieval.cli import main
from retrieval.errors import ConfigError, DataError
from retrieval.index import build_index, open_index
from retrieval.index.update import update_index
from retrieval.representatives import Representatives
from retrieval.store import ShardStore
from retrieval.store.export import export_run

pytestmark = [needs_fiftyone, pytest.mark.slow]  # a database and a retriever per module
PROMPTS = ("a photo", "a red square", "a small dog", "a stroller")


@pytest.fixture(scope="module")
def fo(fiftyone_db: str) -> Any:  # noqa: F811 - the fixture imported above
    import fiftyone

    return fiftyone


@pytest.fixture(scope="module")
def labelled(fo: Any, dense_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``retrieval export`` of the labelled Dense-CLIP run with an exact index."""
    index = build_index(
        dense_run, "exact", tmp_path_factory.mktemp("idx") / "exact", "cpu", progress=False
    )
    argv = ["export", str(dense_run), "--format", "fiftyone", "--name", "dense"]
    assert main([*argv, "--index", str(index), "--no-progress"]) == 0
    return fo.load_dataset("dense"), index


def _rows(run: Path, tmp: Path) -> list[dict[str, Any]]:
    out = export_run(run, tmp / "reps.parquet", progress=False).out
    return pq.read_table(out, columns=["image_id", "rep_index", "box"]).to_pylist()


def test_export_holds_each_image_its_representatives_and_ground_truth(
    labelled: Any, dense_run: Path, synthetic_coco: tuple[Path, Path], tmp_path: Path
) -> None:
    """One sample per embedded image; its ``representatives`` are exactly the rows
    ``retrieval export --format parquet`` writes for it (rep_index, xyxy box as xywh,
    the retriever's name), and its ``ground_truth`` the COCO file's boxes (read here
    with json, divided by the image size)."""
    dataset, _ = labelled
    rows = _rows(dense_run, tmp_path)
    coco = json.loads(synthetic_coco[0].read_text())
    images = {i["id"]: i for i in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(dataset.values("image_id")) == sorted({r["image_id"] for r in rows})
    for sample in dataset:
        mine = sorted(
            (r for r in rows if r["image_id"] == sample.image_id), key=lambda r: r["rep_index"]
        )
        dets = sorted(sample.representatives.detections, key=lambda d: d.rep_index)
        assert [d.rep_index for d in dets] == [r["rep_index"] for r in mine]
        for det, row in zip(dets, mine, strict=True):
            x0, y0, x1, y1 = row["box"]
            assert det.bounding_box == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-6)
            assert det.label == "dense_clip"
        image = images[sample.image_id]
        assert Path(sample.filepath) == synthetic_coco[1] / image["file_name"]
        want = sorted(
            (
                names[a["category_id"]],
                a["bbox"][0] / image["width"],
                a["bbox"][1] / image["height"],
                a["bbox"][2] / image["width"],
                a["bbox"][3] / image["height"],
            )
            for a in coco["annotations"]
            if a["image_id"] == sample.image_id
        )
        got = sorted((d.label, *d.bounding_box) for d in sample.ground_truth.detections)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g[0] == w[0]
            assert g[1:] == pytest.approx(w[1:], abs=1e-9)
        assert (sample.metadata.width, sample.metadata.height) == (image["width"], image["height"])


def test_sort_by_similarity_equals_retrieval_search(labelled: Any, fo: Any) -> None:
    """For each prompt, the sorted view's images are ``retrieval search``'s top k in the
    same order, each showing only the representative that gave its score; the patches
    view lists those patches in that order; on a filtered view, the first k of the full
    exact ranking that the view holds; the App's stage (``SortBySimilarity``, which
    reloads the brain run from the database) gives the same order."""
    dataset, index = labelled
    searcher = open_index(index, "cpu")
    assert dataset.list_brain_runs() == ["retrieval"]
    info = dataset.get_brain_info("retrieval").config
    assert info.supports_prompts
    assert info.patches_field == "representatives"
    for prompt in PROMPTS:
        for k in (1, 5, 24):
            hits = searcher.search(prompt, top=k)
            view = dataset.sort_by_similarity(prompt, k=k, brain_key="retrieval")
            assert view.values("image_id") == [h.image_id for h in hits]
            shown = view.values("representatives.detections.rep_index")
            assert shown == [[h.rep_index] for h in hits]
            patches = dataset.to_patches(
                "representatives", other_fields=["image_id"]
            ).sort_by_similarity(prompt, k=k, brain_key="retrieval")
            assert list(
                zip(
                    patches.values("image_id"),
                    patches.values("representatives.rep_index"),
                    strict=True,
                )
            ) == [(h.image_id, h.rep_index) for h in hits]
        even = dataset.match(fo.ViewField("image_id") % 2 == 0)
        ranked = [h.image_id for h in searcher.search(prompt, top=len(dataset))]
        got = even.sort_by_similarity(prompt, k=5, brain_key="retrieval").values("image_id")
        assert got == [i for i in ranked if i % 2 == 0][:5]
        staged = dataset.add_stage(fo.SortBySimilarity(prompt, k=5, brain_key="retrieval"))
        assert staged.values("image_id") == [h.image_id for h in searcher.search(prompt, top=5)]


def test_a_region_query_and_refusals(labelled: Any) -> None:
    """A representative's label id queries by its vector (the index table's row: the same
    images as ``search_vectors`` of that vector); a sample id, raw vectors added or
    removed, and least-similarity sorting are refused with a message saying why."""
    dataset, index = labelled
    searcher = open_index(index, "cpu")
    results = dataset.load_brain_results("retrieval")
    label = dataset.first().representatives.detections[0]
    vectors, samples, labels = results.get_embeddings(label_ids=[label.id])
    assert list(labels) == [label.id]
    assert list(samples) == [dataset.first().id]
    view = dataset.sort_by_similarity(label.id, k=5, brain_key="retrieval")
    want = searcher.search_vectors(torch.from_numpy(vectors), 5)[0]
    assert view.values("image_id") == [h.image_id for h in want]
    with pytest.raises(ValueError, match="sample id"):
        dataset.sort_by_similarity(dataset.first().id, k=5, brain_key="retrieval")
    with pytest.raises(ConfigError, match="retrieval index update"):
        results.add_to_index(vectors, samples, label_ids=labels)
    with pytest.raises(ConfigError, match="retrieval index update"):
        results.remove_from_index(sample_ids=samples)
    with pytest.raises(ValueError, match="least-similarity"):
        dataset.sort_by_similarity("a photo", k=5, reverse=True, brain_key="retrieval")


def test_a_dataset_of_another_run_is_not_overwritten(
    labelled: Any, fo: Any, tmp_path: Path, dense_run: Path
) -> None:
    """Exporting a run under the name of another run's dataset, or with an index of
    another run, stops naming both, and leaves the dataset and its brain run as they were;
    a run whose images have no file path is refused before any dataset is made."""
    dataset, _ = labelled
    before = len(dataset)
    other = write_vector_run(dense_run, tmp_path / "other", np.arange(1, 5), 1)
    from retrieval.integrations.fiftyone import export_dataset

    with pytest.raises(ConfigError, match="was not exported from"):
        export_dataset(other, "dense")
    index = build_index(other, "exact", tmp_path / "other-index", "cpu", progress=False)
    with pytest.raises(ConfigError, match="was built from run"):
        export_dataset(dense_run, "dense", index=index)
    assert len(dataset) == before
    assert dataset.list_brain_runs() == ["retrieval"]
    unlisted = write_vector_run(dense_run, tmp_path / "unlisted", np.arange(100, 103), 2)
    with pytest.raises(DataError, match="3 images of .* have no file path"):
        export_dataset(unlisted, "unlisted")  # ids its COCO file does not list
    assert "unlisted" not in fo.list_datasets()


def test_reexport_after_embed_and_index_update(fo: Any, dense_run: Path, tmp_path: Path) -> None:
    """After 4 images are embedded and one removed, ``index update`` and the same export
    again: the dataset holds exactly the live images (each once, the new ones added, the
    removed one deleted, collection columns as fields), and the sorted view equals
    ``retrieval search`` on the updated index; an export with nothing changed adds and
    removes nothing."""
    from retrieval.integrations.fiftyone import export_dataset

    images = Path(
        ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]["data"]["images"]
    )
    run = write_vector_run(dense_run, tmp_path / "run", np.arange(1, 17), 3, images)
    index = build_index(run, "faiss", tmp_path / "grow", "cpu", progress=False)
    first = export_dataset(run, "grow", index=index)
    assert (first.samples, first.added, first.removed) == (16, 16, 0)
    dataset = fo.load_dataset("grow")
    assert dataset.values("camera") == [
        "front" if i % 2 else "back" for i in dataset.values("image_id")
    ]

    new = np.arange(17, 21)
    store = ShardStore(run / "embeddings")
    dim = next(store.iter_shards()).reps.embeddings.shape[-1]
    emb = F.normalize(
        torch.randn(len(new), GRID * GRID, dim, generator=torch.Generator().manual_seed(5)), dim=-1
    )
    boxes = grid_cell_boxes((GRID, GRID)).expand(len(new), -1, -1).contiguous()
    store.write_shard("rank000-00099", torch.from_numpy(new), Representatives.dense(emb, boxes))
    for i in new:
        shutil.copy(images / f"{i:012d}.jpg", run / "photos" / f"{i:05d}.jpg")
    ids = np.arange(1, 21)
    fake_runs.write_collection(run, ids, ids == 5, str(run / "photos"), {"camera": ["x"] * 20})
    assert update_index(index, progress=False, device="cpu").generation == 1

    second = export_dataset(run, "grow", index=index)
    assert (second.samples, second.added, second.removed, second.updated) == (19, 4, 1, 15)
    dataset.reload()
    got = dataset.values("image_id")
    assert sorted(got) == sorted(set(range(1, 21)) - {5})
    assert len(got) == len(set(got))
    assert set(dataset.values("camera")) == {"x"}
    searcher = open_index(index, "cpu")
    for prompt in PROMPTS:
        view = dataset.sort_by_similarity(prompt, k=19, brain_key="retrieval")
        assert view.values("image_id") == [h.image_id for h in searcher.search(prompt, top=19)]
    third = export_dataset(run, "grow")
    assert (third.samples, third.added, third.removed) == (19, 0, 0)
