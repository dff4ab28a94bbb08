"""Picture, region and "more like this" queries: multi-vector MaxSim (Chamfer) search.

The reference is a NumPy loop over the run's stored fp16 representatives: an image's
score is the mean over the query vectors of each one's max cosine over the image's
valid representatives. Exact backends equal it (ids, order, scores, representative);
approximate ones return exact scores of the images they find. On a generated collection
embedded by a real (tiny, random-weight) retriever, every image's own file finds it
first, and so does a recompressed, resized copy."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fake_runs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.errors import ConfigError, DataError, IndexFileError
from retrieval.index import build_index, open_index
from retrieval.store import ShardStore

DIM = 32
FINGERPRINT = {"retriever": {"name": "fake", "dim": DIM}, "dtype": "float16"}
EXACT = ("exact", "faiss-flat")
APPROXIMATE = ("faiss-ivfpq", "faiss-ivfpqfs", "faiss-rabitq", "lancedb")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 images in two shards (R = 6 and 4, ragged masks) around 12 shared centres."""
    root = tmp_path_factory.mktemp("run")
    store = ShardStore(root / "embeddings")
    for i, (ids, r) in enumerate([(np.arange(200), 6), (np.arange(1000, 1100), 4)]):
        reps = fake_runs.random_reps(len(ids), r, i + 1, DIM)
        store.write_shard(f"rank000-{i:05d}", torch.from_numpy(ids), reps)
    store.write_manifest(fingerprint=FINGERPRINT)
    return root


@pytest.fixture(scope="module")
def indexes(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("indexes")
    return {
        name: build_index(
            run, name, out / name, "cpu", recall_k=10, recall_target=0.9, progress=False
        )
        for name in EXACT + APPROXIMATE
    }


def stored(run: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each image's valid stored vectors (fp16 as float32) and their slots."""
    out = {}
    for shard in ShardStore(run / "embeddings").iter_shards():
        emb, mask = shard.reps.embeddings.float().numpy(), shard.reps.mask.numpy()
        for row, image_id in enumerate(shard.image_ids.tolist()):
            out[image_id] = (emb[row][mask[row]], np.flatnonzero(mask[row]))
    return out


def maxsim_loop(
    images: dict[int, tuple[np.ndarray, np.ndarray]], q: np.ndarray, k: int
) -> list[tuple[int, float, int]]:
    """The reference: ``(image id, MaxSim, slot of the best single match)``, top ``k``,
    ties by ascending id, by plain loops."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    scored = []
    for image_id, (vectors, slots) in images.items():
        total, best, best_slot = 0.0, -np.inf, -1
        for qv in q:
            top, top_slot = -np.inf, -1
            for v, slot in zip(vectors, slots, strict=True):
                s = float(np.dot(qv, v))
                if s > top:
                    top, top_slot = s, slot
            total += top
            if top > best:
                best, best_slot = top, top_slot
        scored.append((image_id, total / len(q), best_slot))
    scored.sort(key=lambda t: (-t[1], t[0]))
    return scored[:k]


def query_sets(images: dict[int, tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """One vector, five random ones, and two stored images' vectors plus noise."""
    g = np.random.default_rng(7)
    noisy = [
        images[i][0] + 0.3 * g.standard_normal(images[i][0].shape).astype(np.float32)
        for i in (5, 1042)
    ]
    return [g.standard_normal((1, DIM)), g.standard_normal((5, DIM)), *noisy]


@pytest.mark.parametrize("backend", EXACT)
def test_exact_maxsim_equals_numpy_loop(run: Path, indexes: dict[str, Path], backend: str):
    """Invariant: an exact backend's multi-vector answer is the NumPy loop's MaxSim top k:
    same images in the same order, the same scores (float32 noise), and each hit names
    the representative of the image's best single query match."""
    images = stored(run)
    with open_index(indexes[backend], "cpu") as index:
        for q in query_sets(images):
            got = index.search_multivector(torch.from_numpy(q).float(), 20)
            want = maxsim_loop(images, q, 20)
            assert [h.image_id for h in got] == [w[0] for w in want]
            np.testing.assert_allclose([h.score for h in got], [w[1] for w in want], atol=1e-5)
            assert [h.rep_index for h in got] == [w[2] for w in want]


@pytest.mark.parametrize("backend", EXACT)
def test_filtered_maxsim_equals_numpy_loop(run: Path, indexes: dict[str, Path], backend: str):
    """Invariant: with ``where``, the answer is the reference over the allowed images only
    (a few of them: the exact backend scores their rows alone; most: it masks the rest)."""
    images = stored(run)
    for where, keep in (
        ("image_id >= 1050", lambda i: i >= 1050),
        ("image_id != 5", lambda i: i != 5),
    ):
        allowed = {i: v for i, v in images.items() if keep(i)}
        with open_index(indexes[backend], "cpu") as index:
            for q in query_sets(images):
                got = index.search_multivector(torch.from_numpy(q).float(), 12, where=where)
                assert [h.image_id for h in got] == [w[0] for w in maxsim_loop(allowed, q, 12)]
            assert index.search_multivector(torch.ones(2, DIM), 5, "image_id = 99999") == []


@pytest.mark.parametrize("backend", APPROXIMATE)
def test_approximate_maxsim_scores_are_exact(run: Path, indexes: dict[str, Path], backend: str):
    """Invariant: an approximate backend's candidates are re-scored exactly (each hit's
    score is the image's true MaxSim, best first), most of the reference top 10 is found,
    and a stored image's own representatives ("more like this") find it first."""
    images = stored(run)
    recalls = []
    with open_index(indexes[backend], "cpu") as index:
        for q in query_sets(images):
            got = index.search_multivector(torch.from_numpy(q).float(), 10)
            truth = {i: s for i, s, _ in maxsim_loop(images, q, len(images))}
            np.testing.assert_allclose(
                [h.score for h in got], [truth[h.image_id] for h in got], atol=1e-5
            )
            assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
            top = [i for i, _, _ in maxsim_loop(images, q, 10)]
            recalls.append(len({h.image_id for h in got} & set(top)) / 10)
        for image_id in (0, 17, 123, 199, 1000, 1099):
            assert index.search_like(image_id, top=3)[0].image_id == image_id
    assert np.mean(recalls) >= 0.8, recalls


def test_more_like_this_and_a_region(run: Path, indexes: dict[str, Path]) -> None:
    """Invariant: "more like this" is MaxSim of the image's stored vectors (it ranks
    itself first, score 1); a region (one representative) is the one-vector case, the
    same answer as a plain vector search with that representative."""
    images = stored(run)
    with open_index(indexes["exact"], "cpu") as index:
        like = index.search_like(1042, top=5)
        assert like[0].image_id == 1042
        assert like[0].score == pytest.approx(1.0, abs=1e-3)
        want = maxsim_loop(images, images[1042][0], 5)
        assert [h.image_id for h in like] == [w[0] for w in want]
        slot = int(images[17][1][0])
        region = index.search_like(17, slot, top=8)
        vector = F.normalize(torch.from_numpy(images[17][0][:1]), dim=1)
        assert region == index.search_vectors(vector, 8)[0]


def test_bad_multivector_queries_are_refused(indexes: dict[str, Path], tmp_path: Path) -> None:
    """One clear message each: an id the index lacks, a representative the image lacks
    (its valid ones listed), a query of the wrong size, an empty set, an unreadable file."""
    with open_index(indexes["exact"], "cpu") as index:
        with pytest.raises(ConfigError, match="image 99999 is not in index"):
            index.search_like(99999)
        slots = index.stored_queries(5).shape[0]
        with pytest.raises(ConfigError, match="has no representative 77; its representatives"):
            index.search_like(5, 77)
        assert slots >= 1
        with pytest.raises(IndexFileError, match="do not match this index's size 32"):
            index.search_multivector(torch.ones(3, DIM + 1))
        with pytest.raises(ConfigError, match="no representative"):
            index.search_multivector(torch.ones(0, DIM))
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"not an image")
        with pytest.raises(DataError, match=f"cannot read the query picture {bad}"):
            index.picture_queries(bad)


# a generated collection embedded by a real retriever ------------------------------------
@pytest.fixture(scope="module")
def picture_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 generated scenes embedded by Dense-CLIP on a tiny random-weight ViT (6 x 6
    cells at 96 px: random ViT features tell images apart, a random ResNet's do not)
    as an unlabelled folder, indexed exactly."""
    from retrieval.config import load_config
    from retrieval.data.synthetic import make_synthetic_coco
    from retrieval.engine import embed

    root = tmp_path_factory.mktemp("pictures")
    _, images = make_synthetic_coco(root / "data", num_images=200, seed=5)
    overrides = [
        "dataset=folder",
        f"data.images={images}",
        f"run.output_dir={root / 'run'}",
        "retriever=dense_clip_rn50",
        "retriever.backbone=ViT-tiny",
        "retriever.pretrained=null",
        "retriever.resolution=96",
        "run.progress=false",
        "loader.num_workers=0",
        "loader.batch_size=16",
    ]
    embed(load_config("demo", overrides))
    return build_index(root / "run", "exact", root / "index", "cpu", progress=False)


def recompressed(path: Path) -> Image.Image:
    """The picture resized to 0.8x and saved as JPEG quality 60."""
    with Image.open(path) as image:
        small = image.convert("RGB").resize(
            (round(0.8 * image.width), round(0.8 * image.height)), Image.Resampling.BILINEAR
        )
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=60)
    buffer.seek(0)
    return Image.open(buffer)


@pytest.mark.slow
def test_each_picture_finds_itself_and_its_copy(picture_index: Path) -> None:
    """Invariant: every indexed image queried by its own file ranks itself first (all
    200), and its JPEG-60, 0.8x copy ranks the original first for at least 98%."""
    from retrieval.report.gallery import image_paths

    with open_index(picture_index, "cpu") as index:
        ids = index.backend.require_table().live_image_ids.tolist()
        paths = image_paths(index, ids)
        assert len(ids) == 200
        itself = [index.search_picture(paths[i], top=3)[0].image_id == i for i in ids]
        copies = [index.search_picture(recompressed(paths[i]), top=3)[0].image_id == i for i in ids]
    assert all(itself), [i for i, ok in zip(ids, itself, strict=True) if not ok]
    assert sum(copies) >= 0.98 * len(ids), sum(copies)


@pytest.mark.slow
def test_cli_searches_by_picture_and_by_example(picture_index: Path, tmp_path: Path) -> None:
    """``retrieval search INDEX --image FILE`` and ``--like ID[:REP]`` give the library's
    hits (search_picture, search_like) in their JSON."""
    from retrieval.cli import main
    from retrieval.report.gallery import image_paths

    with open_index(picture_index, "cpu") as index:
        path = image_paths(index, [42])[42]
        assert path is not None
        by_picture = index.search_picture(path, top=5)
        like = index.search_like(42, top=5)
        rep = like[0].rep_index
        region = index.search_like(42, rep, top=5)
    cases = {
        "image": (["--image", str(path)], by_picture),
        "like": (["--like", "42"], like),
        "region": (["--like", f"42:{rep}"], region),
    }
    for name, (argv, want) in cases.items():
        out = tmp_path / f"{name}.json"
        args = ["search", str(picture_index), *argv, "--top", "5", "--device", "cpu"]
        assert main([*args, "--json", str(out)]) == 0
        hits = json.loads(out.read_text())["hits"]
        assert [h["image_id"] for h in hits] == [h.image_id for h in want], name
        np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in want], atol=1e-5)


def test_unit_rows_are_what_is_scored(indexes: dict[str, Path]) -> None:
    """Invariant: query vectors are normalised first (cosine), so a scaled set gives the
    same answer as the unit one."""
    q = F.normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(3)), dim=1)
    with open_index(indexes["exact"], "cpu") as index:
        unit, scaled = index.search_multivector(q, 7), index.search_multivector(5 * q, 7)
    assert [h.image_id for h in unit] == [h.image_id for h in scaled]
    np.testing.assert_allclose([h.score for h in unit], [h.score for h in scaled], atol=1e-6)
