"""Recall tuning shared by the approximate backends, and the recall measures it uses.

An approximate backend is tuned at build to reach a recall target against exact search
(:meth:`Engine.tune`). Every engine's tuning has one shape: try candidate settings in
order of cost, measure recall with each, keep the first reaching the target (or the
cheapest, under a cost model), else a fallback. :func:`tune_settings` walks that loop;
a backend's ``tune`` only says which settings to try and how to measure recall with
them (:func:`recall_at_k` of its answers against the exact ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from retrieval.index.kernels import RowHits

Settings = Mapping[str, Any]
MARGIN_Z = 1.645  # one-sided 95%: the tuning half's mean recall, less its sampling error


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune_settings` chose (and left applied to the options).

    Attributes:
        settings: the chosen candidate (empty when there was none to try).
        recall: its measured recall (nan when nothing was measured).
        met: whether it reaches the target.
        measured: how many candidates were measured.
    """

    settings: dict[str, Any] = field(default_factory=dict)
    recall: float = math.nan
    met: bool = False
    measured: int = 0


def tune_settings(
    options: object,
    candidates: Iterable[Settings],
    measure: Callable[[], float | np.ndarray],
    target: float,
    *,
    cost: Callable[[Settings], float] | None = None,
    fallback: Literal["best", "last"] = "best",
) -> TuneResult:
    """Applies each candidate to ``options`` in turn, measures recall, keeps a winner.

    Args:
        options: the engine's typed options (:class:`~retrieval.index.engine.EngineOptions`);
            each candidate's keys are set as its attributes, and it is left holding the
            chosen candidate.
        candidates: settings to try (``{"nprobe": 8, "overfetch": 4}``), cheapest first;
            only their keys change.
        measure: recall with the settings now in ``options``: one number, or each
            query's (:func:`query_recalls`), whose mean must then reach ``target`` by
            its sampling error (:func:`lower_bound`).
        target: the recall to reach.
        cost: without it, the first candidate reaching ``target`` wins and the walk
            stops there. With it, the cheapest candidate reaching ``target`` wins (the
            earliest among equal costs); a candidate costing at least as much as one
            already found is skipped unmeasured, since it cannot win.
        fallback: when none reaches ``target``: ``best``, the highest recall (the later
            candidate on a tie: the costlier, for candidates in order of cost); ``last``,
            the last one measured (the most tried).

    Returns:
        The chosen candidate, its (mean) recall, whether it met ``target``, and how many
        candidates were measured. Without candidates ``options`` is left as it was.
    """
    if fallback not in ("best", "last"):
        raise ValueError(f"fallback {fallback!r} is not 'best' or 'last'")
    winner: tuple[float, dict[str, Any], float] | None = None  # (cost, settings, recall)
    best: tuple[dict[str, Any], float] | None = None  # (settings, recall)
    last: tuple[dict[str, Any], float] | None = None
    measured = 0
    for candidate in candidates:
        settings = dict(candidate)
        price = cost(settings) if cost is not None else 0.0
        if winner is not None and price >= winner[0]:
            continue
        _apply(options, settings)
        values = np.atleast_1d(np.asarray(measure(), dtype=np.float64))
        recall = float(values.mean())
        measured += 1
        last = (settings, recall)
        if best is None or recall >= best[1]:
            best = last
        if lower_bound(values) >= target:
            winner = (price, settings, recall)
            if cost is None:
                break
    if winner is not None:
        (_, settings, recall), met = winner, True
    elif best is not None and last is not None:  # both set by the first measurement
        (settings, recall), met = (best if fallback == "best" else last), False
    else:
        return TuneResult()
    _apply(options, settings)
    return TuneResult(settings, recall, met, measured)


def _apply(options: object, settings: Settings) -> None:
    for key, value in settings.items():
        setattr(options, key, value)


def image_recalls(found: list[np.ndarray], truth: list[np.ndarray]) -> np.ndarray:
    """Each query's fraction of its exact top-k image list found (both as table image
    positions)."""
    return np.array(
        [len(np.intersect1d(f, t)) / max(len(t), 1) for f, t in zip(found, truth, strict=True)],
        dtype=np.float64,
    )


def image_recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Mean of :func:`image_recalls` (1.0 for no queries)."""
    fractions = image_recalls(found, truth)
    return float(fractions.mean()) if len(fractions) else 1.0


def query_recalls(found: list[RowHits], truth: list[np.ndarray], owner: np.ndarray) -> np.ndarray:
    """:func:`image_recalls` of backend answers (rows, mapped to images by ``owner``): what
    a tuning ``measure`` returns, so :func:`tune_settings` can bound the mean."""
    return image_recalls([owner[rows] for rows, _ in found], truth)


def recall_at_k(found: list[RowHits], truth: list[np.ndarray], owner: np.ndarray) -> float:
    """:func:`image_recall` of backend answers (rows, mapped to images by ``owner``)."""
    return image_recall([owner[rows] for rows, _ in found], truth)


def lower_bound(values: np.ndarray) -> float:
    """The mean of per-query recalls less :data:`MARGIN_Z` standard errors (the mean
    itself for one value): a setting tuned on one half of the queries must clear the
    target by its sampling error, or the other half falls short about half the time."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean
    return mean - MARGIN_Z * float(values.std(ddof=1)) / math.sqrt(len(values))
