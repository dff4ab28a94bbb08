"""index/grouping.py, the over-fetch loop faiss and Milvus share, against a NumPy loop.

Invariant: grouping an exact engine's best-first rows by image, fetching twice as many
for a query short of ``k`` images until the engine has no more, gives each query's exact
top ``k`` images (an image's score being the max over its representatives)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import ConfigError
from retrieval.index.grouping import (
    check_choice,
    doubled,
    fetch_until_k_images,
    first_images,
    needed_overfetch,
)
from retrieval.index.kernels import first_per_image


def reference_top_images(scores: np.ndarray, owner: np.ndarray, k: int) -> list[int]:
    """Top ``k`` images by the max score of their rows, a plain loop (ties: lower image)."""
    best: dict[int, float] = {}
    for row, score in enumerate(scores.tolist()):
        image = int(owner[row])
        best[image] = max(best.get(image, -np.inf), score)
    return [image for image, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


class PagedEngine:
    """An exact engine that ranks rows (not images): a fetch of ``n`` returns each query's
    ``n`` best rows, best first, and counts the fetches asked of it."""

    def __init__(self, scores: np.ndarray) -> None:
        self.order = np.argsort(-scores, axis=1, kind="stable")
        self.scores = scores
        self.fetches: list[int] = []

    def fetch(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        self.fetches.append(n)
        rows = self.order[queries, :n]
        return np.take_along_axis(self.scores[queries], rows, axis=1), rows


@pytest.mark.parametrize("reps_per_image", [1, 3, 17])
@pytest.mark.parametrize(("k", "start"), [(1, 1), (5, 1), (5, 4), (40, 2)])
def test_fetch_until_k_images_is_the_exact_top_k(reps_per_image: int, k: int, start: int) -> None:
    rng = np.random.default_rng(reps_per_image * 100 + k)
    images = 30
    counts = rng.integers(1, 2 * reps_per_image + 1, images)
    owner = np.repeat(np.arange(images), counts)
    scores = rng.standard_normal((6, len(owner))).astype(np.float32)
    # one query whose best rows all belong to one image: the loop must fetch again
    scores[0, owner == 7] += 10.0
    engine = PagedEngine(scores)
    total = len(owner)

    def fetch(todo: np.ndarray, round_: int) -> list[tuple[np.ndarray, np.ndarray]]:
        s, r = engine.fetch(todo, doubled(start * k, total, round_))
        return [first_per_image(rows, sc, owner, k) for sc, rows in zip(s, r, strict=True)]

    found = fetch_until_k_images(
        len(scores),
        k,
        fetch,
        lambda hits: len(hits[0]),
        lambda r: doubled(start * k, total, r) >= total,
    )
    for q, (rows, _) in enumerate(found):
        assert owner[rows].tolist() == reference_top_images(scores[q], owner, k)
    assert engine.fetches == sorted(engine.fetches)  # each round fetches more
    assert max(engine.fetches) <= total


def test_fetch_stops_when_the_engine_is_exhausted() -> None:
    """Fewer images than wanted: every query is asked until the engine has no more, once."""
    owner = np.array([0, 0, 1, 1, 1])
    scores = np.arange(5, dtype=np.float32)[None].repeat(2, axis=0)
    engine = PagedEngine(scores)

    def fetch(todo: np.ndarray, round_: int) -> list[np.ndarray]:
        _, rows = engine.fetch(todo, doubled(1, 5, round_))
        return [first_images(r, owner) for r in rows]

    found = fetch_until_k_images(2, 3, fetch, len, lambda r: doubled(1, 5, r) >= 5)
    assert [f.tolist() for f in found] == [[1, 0], [1, 0]]
    assert engine.fetches == [1, 2, 4, 5]


def test_first_images_skips_missing_rows_and_keeps_best_first_order() -> None:
    owner = np.array([3, 3, 1, 2, 2])
    assert first_images(np.array([4, -1, 0, 3, 2, 1]), owner).tolist() == [2, 3, 1]


def test_needed_overfetch_serves_most_queries() -> None:
    """One row per image: k rows always show k images (over-fetch 1); an image per two
    rows needs 2; a query showing too few images counts as the cap."""
    k = 2
    one = np.arange(10)
    assert needed_overfetch([np.arange(10)] * 5, one, k, cap=64) == 1
    two = np.arange(10) // 2
    assert needed_overfetch([np.arange(10)] * 5, two, k, cap=64) == 2
    assert needed_overfetch([np.zeros(4, np.int64)] * 5, one, k, cap=7) == 7


def test_check_choice_names_the_option_and_the_accepted_values() -> None:
    check_choice("faiss", "kind", "flat", ("auto", "flat"))
    with pytest.raises(ConfigError, match=r"faiss kind 'flta' is not one of auto, flat: .*'flat'"):
        check_choice("faiss", "kind", "flta", ("auto", "flat"))
