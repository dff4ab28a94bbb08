"""Grouping representatives by image for engines that rank representatives, not images.

An image's score is the max cosine over its representatives, so an engine that returns
the top representatives (faiss, Milvus without server-side group-by) must fetch more
than ``k`` of them to see ``k`` distinct images: it over-fetches ``overfetch x k`` rows,
keeps each image's first (its best), and fetches twice as many for any query that came
back short of ``k`` images, until the engine has nothing more to give
(:func:`fetch_until_k_images`). When the engine's ranking is exact, the first ``k``
distinct images of its best-first rows are the exact top ``k``
(:func:`~retrieval.index.kernels.first_per_image`). Tuning picks the over-fetch most
queries need (:func:`needed_overfetch`); the rest fetch again. The backends share the
check of an option's value against its choices here too (:func:`check_choice`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TypeVar

import numpy as np

from retrieval.errors import ConfigError, did_you_mean

T = TypeVar("T")
OVERFETCH_QUANTILE = 0.9  # the share of tuning queries the chosen over-fetch serves at once


def first_images(rows: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Image positions of ``rows`` (best first; ``-1``, faiss's "no row", skipped), each
    image once, in the order of its best row."""
    images = owner[rows[rows >= 0]]
    _, first = np.unique(images, return_index=True)
    return images[np.sort(first)]


def doubled(start: int, most: int, round_: int) -> int:
    """The fetch size of round ``round_`` (0 first): ``start`` doubled each round, capped
    at ``most`` (what the engine can return at all)."""
    return min(start * 2**round_, most)


def fetch_until_k_images(
    queries: int,
    wanted: int,
    fetch: Callable[[np.ndarray, int], Sequence[T]],
    images: Callable[[T], int],
    exhausted: Callable[[int], bool],
) -> list[T]:
    """The over-fetch loop: each query's answer, fetched again in later rounds while it
    holds fewer than ``wanted`` images and the engine can give more.

    Args:
        queries: how many queries there are.
        wanted: images each query should find.
        fetch: ``(query indices, round)`` -> each of those queries' answer at that round
            (round 0 first; the caller grows its fetch size, probes... with the round).
        images: how many images an answer holds.
        exhausted: whether round ``r`` fetched everything the engine can return (no
            query is asked again after it).

    Returns:
        Each query's latest answer, in query order.
    """
    out: dict[int, T] = {}
    todo, round_ = np.arange(queries), 0
    while len(todo):
        again: list[int] = []
        for i, answer in zip(todo.tolist(), fetch(todo, round_), strict=True):
            out[i] = answer
            if images(answer) < wanted and not exhausted(round_):
                again.append(i)
        todo, round_ = np.array(again, dtype=np.int64), round_ + 1
    return [out[i] for i in range(queries)]


def needed_overfetch(fetched: Iterable[np.ndarray], owner: np.ndarray, k: int, cap: float) -> int:
    """The over-fetch (rows fetched per image wanted) that shows ``k`` distinct images to
    ``OVERFETCH_QUANTILE`` of the queries, from each query's best-first ``fetched`` rows
    (``-1`` skipped); a query whose rows hold fewer than ``k`` images counts as ``cap``."""
    needed: list[float] = []
    for rows in fetched:
        _, first = np.unique(owner[rows[rows >= 0]], return_index=True)
        first = np.sort(first)
        needed.append((first[k - 1] + 1) / k if len(first) >= k else cap)
    return max(1, math.ceil(float(np.quantile(needed, OVERFETCH_QUANTILE))))


def check_choice(
    backend: str, key: str, value: object, choices: Collection[str], fix: str | None = None
) -> None:
    """Raises a :class:`ConfigError` naming the option, its value and the accepted ones
    unless ``value`` is one of ``choices``; ``fix`` replaces the default suggestion."""
    if value in choices:
        return
    fix = fix or f"pass e.g. --option {key}={next(iter(choices))}"
    raise ConfigError(
        f"{backend} {key} {value!r} is not one of {', '.join(choices)}: {fix}."
        f"{did_you_mean(str(value), choices)}"
    )
