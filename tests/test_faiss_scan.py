"""The faiss engine's list-parallel scan (:func:`search_ivf`) against faiss's own search.

A single query's probed lists are split into parts scanned side by side and merged by
score; faiss's ``index.search`` (one thread) is the reference for every IVF kind the
engine builds.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.index.faiss_backend import omp_threads, search_ivf

DIM, ROWS, K, NPROBE = 64, 10_000, 100, 40
SPECS = ["IVF64,PQ32x4fs", "IVF64,PQ16x4", "IVF64,RaBitQ", "IVF64,Flat"]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 50, ROWS)] + 0.8 * rng.standard_normal((ROWS, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = (x[:30] + 0.5 * rng.standard_normal((30, DIM))).astype(np.float32)
    return x, q


@pytest.fixture(scope="module", params=SPECS)
def index(request: pytest.FixtureRequest, data: tuple[np.ndarray, np.ndarray]) -> faiss.IndexIVF:
    x, _ = data
    index = faiss.index_factory(DIM, request.param, faiss.METRIC_INNER_PRODUCT)
    with omp_threads(1):  # OpenMP's waiting slows a small training on a busy machine
        index.train(x)
        index.add(x)
    return index


def faiss_search(
    index: faiss.IndexIVF, q: np.ndarray, params: faiss.SearchParameters | None = None
) -> tuple[np.ndarray, np.ndarray]:
    index.nprobe = NPROBE
    with omp_threads(1):
        return index.search(q, K, params=params)


def assert_same_top(found: tuple, reference: tuple) -> None:
    """Same scores, and the same rows above each query's k-th score (rows tied at the
    k-th score may differ: faiss keeps whichever it met first)."""
    (scores, rows), (ref_scores, ref_rows) = found, reference
    np.testing.assert_array_equal(scores, ref_scores)
    for s, r, ref_r in zip(scores, rows, ref_rows, strict=True):
        above = s > s[-1]
        assert set(r[above]) == set(ref_r[above])
        assert len(set(r)) == len(r)  # no row twice across parts


@pytest.mark.parametrize("parts", [2, 3])
def test_split_scan_equals_faiss_search(
    index: faiss.IndexIVF, data: tuple[np.ndarray, np.ndarray], parts: int
) -> None:
    """Invariant: scanning a query's probes in parts and merging by score gives faiss's
    own single-threaded top k (the same scores; the same rows but for ties)."""
    _, q = data
    with omp_threads(parts):
        found = search_ivf(index, q, K, NPROBE)
    assert_same_top(found, faiss_search(index, q))


def test_split_scan_is_repeatable_and_batch_free(
    index: faiss.IndexIVF, data: tuple[np.ndarray, np.ndarray]
) -> None:
    """Invariant: a rerun returns the same rows in the same order, and a query's answer
    does not depend on the batch it is asked in (faiss's own list-parallel modes broke
    the first: they merge in thread timing order)."""
    _, q = data
    with omp_threads(2):
        first = search_ivf(index, q, K, NPROBE)
        again = search_ivf(index, q, K, NPROBE)
        alone = [search_ivf(index, q[i : i + 1], K, NPROBE) for i in range(len(q))]
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[1], np.concatenate([rows for _, rows in alone]))
    np.testing.assert_array_equal(first[0], np.concatenate([scores for scores, _ in alone]))


def test_split_scan_keeps_to_the_selector(
    index: faiss.IndexIVF, data: tuple[np.ndarray, np.ndarray]
) -> None:
    """Invariant: with an id selector every part returns allowed rows only, and the merge
    equals faiss's own filtered search."""
    _, q = data
    allowed = np.arange(0, ROWS, 7, dtype=np.int64)
    selector = faiss.IDSelectorBatch(allowed)
    with omp_threads(2):
        scores, rows = search_ivf(index, q, K, NPROBE, selector)
    params = faiss.SearchParametersIVF()
    params.nprobe, params.sel = NPROBE, selector
    assert set(rows[rows >= 0].tolist()) <= set(allowed.tolist())
    assert_same_top((scores, rows), faiss_search(index, q, params))


def test_more_parts_than_probes_and_short_lists(data: tuple[np.ndarray, np.ndarray]) -> None:
    """Invariant: fewer probed rows than k leave faiss's "no row" (-1, -inf) at the end of
    the merged answer, as in faiss's own search; parts are capped at the probes."""
    x, q = data
    index = faiss.index_factory(DIM, "IVF64,PQ32x4fs", faiss.METRIC_INNER_PRODUCT)
    with omp_threads(1):
        index.train(x)
        index.add(x[:500])
    with omp_threads(4):
        scores, rows = search_ivf(index, q, 400, 3)
    ref_scores, ref_rows = faiss_search_at(index, q, 400, 3)
    np.testing.assert_array_equal(rows < 0, ref_rows < 0)
    np.testing.assert_array_equal(scores, ref_scores)
    with omp_threads(4):
        one = search_ivf(index, q, 400, 1)  # one probe: one part
    np.testing.assert_array_equal(one[0], faiss_search_at(index, q, 400, 1)[0])


def faiss_search_at(
    index: faiss.IndexIVF, q: np.ndarray, k: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    index.nprobe = nprobe
    with omp_threads(1):
        return index.search(q, k)
