"""Retrieval metrics as plain functions: rankings, AP@K, and the full per-category report.

Definitions follow ``docs/protocol.md``: AP@K divides by ``min(K, P)`` (the headline) or by the
hits inside the top K (``"hits"``, torchmetrics' reading); a query without relevant
images gives NaN and is skipped, never averaged in as 0. Rankings depend only on the
order of the raw scores (never on their sign) and break ties by image id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Normalize = Literal["min_k_p", "hits"]
ArrayLike = Tensor | np.ndarray


def rank_order(scores: Tensor, tie_break: Tensor | None = None) -> Tensor:
    """Indices that sort each row by score, highest first.

    Equal scores are ordered by ascending ``tie_break`` (the image ids), so a ranking is
    the same on every machine and in every column order. Only the order of the scores
    matters: negative and ``-inf`` scores are ranked like any other (``-inf`` last).

    Args:
        scores: ``[N]`` or ``[Q, N]`` scores.
        tie_break: ``[N]`` keys for equal scores; None keeps the column order.

    Returns:
        ``int64`` indices of the same shape as ``scores``.
    """
    _check_scores(scores)
    if tie_break is None:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices
    tie_break = torch.as_tensor(tie_break, device=scores.device)
    _check_shape("tie_break", tie_break, (scores.shape[-1],))
    by_key = torch.argsort(tie_break, stable=True)
    by_key_scores = scores.index_select(-1, by_key)
    return by_key.take(torch.sort(by_key_scores, dim=-1, descending=True, stable=True).indices)


def average_precision(
    scores: Tensor,
    target: Tensor,
    *,
    top_k: int | None = None,
    ignore: Tensor | None = None,
    tie_break: Tensor | None = None,
    normalize: Normalize = "min_k_p",
) -> Tensor:
    """Average precision of each query's ranking, at a cut-off or in full.

    ``AP@K = (1 / min(K, P)) * sum of precision@k over the relevant r_k with k <= K``;
    ``normalize="hits"`` divides by the relevant images found in the top K instead.
    Ignored entries are left out of the ranking, as if the image were not in the
    database for that query; P counts the relevant images that are not ignored.

    Args:
        scores: ``[N]`` or ``[Q, N]`` scores; any real value, ``-inf`` included.
        target: bool, same shape: the image is relevant to the query.
        top_k: the cut-off K (may exceed N); None gives the full AP.
        ignore: bool, same shape: left out of the query's ranking.
        tie_break: ``[N]`` keys ordering equal scores (image ids).
        normalize: ``"min_k_p"`` (the headline) or ``"hits"``.

    Returns:
        float64, a 0-d tensor for ``[N]`` input or ``[Q]``; NaN where P == 0.
    """
    _check_top_k(top_k)
    if normalize not in ("min_k_p", "hits"):
        raise ValueError(f"normalize must be 'min_k_p' or 'hits', got {normalize!r}")
    rows = scores.unsqueeze(0) if scores.ndim == 1 else scores
    _check_scores(rows)
    target = _as_mask("target", target, scores).reshape(rows.shape)
    if ignore is not None:
        ignore = _as_mask("ignore", ignore, scores).reshape(rows.shape)
    ranked = _RankedHits(rank_order(rows, tie_break), target, ignore)
    ap = ranked.average_precision(top_k, normalize)
    return ap[0] if scores.ndim == 1 else ap


def evaluate_rankings(
    scores: ArrayLike,
    relevant: ArrayLike,
    ignore: ArrayLike,
    max_area: ArrayLike,
    image_ids: ArrayLike,
    *,
    top_k: int = 50,
    large_area: float = 96.0**2,
    splits: Sequence[str | None] | None = None,
) -> dict[str, object]:
    """Every metric of the protocol for ``Q`` categories ranked over ``N`` images.

    The images are sorted once per category; the full, the top-K and the small-medium
    (s-m) metrics all read that one ranking. For s-m, an image relevant to category c
    whose largest instance of c has ``max_area >= large_area`` is left out of c's
    ranking; negatives are unchanged.

    Args:
        scores: ``[Q, N]`` scores of every image for every category.
        relevant: ``[Q, N]`` bool, the image holds the category.
        ignore: ``[Q, N]`` bool, the image is left out of the category's ranking.
        max_area: ``[Q, N]`` area of the largest instance of the category in the image.
        image_ids: ``[N]`` unique int ids; they order equal scores.
        top_k: the cut-off K of AP@K.
        large_area: smallest area counted as large for the s-m split.
        splits: one label per category (LVIS "rare" ...; None for none) to average
            separately.

    Returns:
        Per category (``[Q]`` float64 numpy, NaN where skipped): ``ap@K``, ``ap``,
        ``ap@K_hits``, ``ap@K_s-m``, ``ap_s-m``, and int64 ``positives``,
        ``positives_s-m``. Means over the categories that are not NaN (floats, NaN if
        none): ``map@K``, ``map``, ``map@K_hits``, ``map@K_s-m``, ``map_s-m``. Counts:
        ``categories``, ``categories_skipped``, ``categories_skipped_s-m``. With
        ``splits``, for each label: ``{label}.map@K``, ``{label}.map``,
        ``{label}.map@K_s-m``, ``{label}.categories``, ``{label}.categories_skipped``.
        Values are fractions in [0, 1].
    """
    _check_top_k(top_k)
    scores = torch.as_tensor(scores)
    _check_shape("scores", scores, (None, None))
    shape = tuple(scores.shape)
    relevant = _as_mask("relevant", relevant, scores)
    ignore = _as_mask("ignore", ignore, scores)
    max_area = torch.as_tensor(max_area, device=scores.device)
    _check_shape("max_area", max_area, shape)
    image_ids = _check_image_ids(torch.as_tensor(image_ids, device=scores.device), shape[1])
    if splits is not None and len(splits) != shape[0]:
        raise ValueError(f"splits must hold one label per category ({shape[0]}), got {len(splits)}")

    order = rank_order(scores, image_ids)
    whole = _RankedHits(order, relevant, ignore)
    small_medium = _RankedHits(order, relevant, ignore | (relevant & (max_area >= large_area)))
    k = top_k  # short, for the keys
    per_category = {
        f"ap@{k}": whole.average_precision(k, "min_k_p"),
        "ap": whole.average_precision(None, "min_k_p"),
        f"ap@{k}_hits": whole.average_precision(k, "hits"),
        f"ap@{k}_s-m": small_medium.average_precision(k, "min_k_p"),
        "ap_s-m": small_medium.average_precision(None, "min_k_p"),
    }
    arrays: dict[str, np.ndarray] = {key: v.cpu().numpy() for key, v in per_category.items()}
    arrays["positives"] = whole.positives.cpu().numpy()
    arrays["positives_s-m"] = small_medium.positives.cpu().numpy()
    out: dict[str, object] = dict(arrays)
    for key in per_category:
        out["m" + key] = _nanmean(arrays[key])
    out["categories"] = shape[0]
    out["categories_skipped"] = int((arrays["positives"] == 0).sum())
    out["categories_skipped_s-m"] = int((arrays["positives_s-m"] == 0).sum())
    if splits is not None:
        out.update(_split_means(arrays, splits, k))
    return out


class _RankedHits:
    """Where the relevant images of each query fall in its ranking, ignored ones removed.

    An ignored image keeps its slot in the sorted order but takes no rank: the rank of
    an entry counts the non-ignored entries up to it. That removes it from the ranking
    without a second sort. Only the hits are kept (as flat ``rows``, ``rank``,
    ``precision``): relevant images are few, so the reductions cost O(hits), not O(Q N).
    """

    def __init__(self, order: Tensor, target: Tensor, ignore: Tensor | None) -> None:
        hit = target.gather(-1, order)
        if ignore is None:
            self.rows, cols = hit.nonzero(as_tuple=True)
            self.rank = cols + 1
        else:
            keep = ~ignore.gather(-1, order)
            hit &= keep
            self.rows, cols = hit.nonzero(as_tuple=True)
            self.rank = keep.cumsum(-1, dtype=torch.int32)[self.rows, cols]
        self.positives = torch.bincount(self.rows, minlength=order.shape[0])
        first_hit = (self.positives.cumsum(0) - self.positives)[self.rows]
        found = torch.arange(1, len(self.rows) + 1, device=order.device) - first_hit
        self.precision = found.double() / self.rank

    def average_precision(self, top_k: int | None, normalize: Normalize) -> Tensor:
        """``[Q]`` AP@K (full AP when ``top_k`` is None); NaN where there is no positive."""
        rows, precision = self.rows, self.precision
        if top_k is not None:
            in_top = self.rank <= top_k
            rows, precision = rows[in_top], precision[in_top]
        total = torch.zeros_like(self.positives, dtype=torch.float64)
        total.index_add_(0, rows, precision)
        if normalize == "hits":
            denominator = torch.bincount(rows, minlength=len(total)).clamp(min=1)
        else:
            denominator = self.positives if top_k is None else self.positives.clamp(max=top_k)
        ap = total / denominator
        return torch.where(self.positives > 0, ap, torch.nan)


def _split_means(
    arrays: Mapping[str, np.ndarray], splits: Sequence[str | None], k: int
) -> dict[str, float | int]:
    """Means and skip counts over the categories of each split label."""
    labels = np.array(splits, dtype=object)
    result: dict[str, float | int] = {}
    for label in dict.fromkeys(s for s in splits if s is not None):
        rows = labels == label
        for key in (f"ap@{k}", "ap", f"ap@{k}_s-m"):
            result[f"{label}.m{key}"] = _nanmean(arrays[key][rows])
        result[f"{label}.categories"] = int(rows.sum())
        result[f"{label}.categories_skipped"] = int((arrays["positives"][rows] == 0).sum())
    return result


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without numpy's warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _check_shape(name: str, value: Tensor, shape: tuple[int | None, ...]) -> None:
    """Raise a ValueError naming ``name`` unless it has ``shape`` (None: any size)."""
    got = tuple(value.shape)
    fits = len(got) == len(shape) and all(s in (None, g) for s, g in zip(shape, got, strict=True))
    if not fits:
        want = tuple("?" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {got}")


def _as_mask(name: str, value: ArrayLike, like: Tensor) -> Tensor:
    """``value`` as a bool tensor shaped and placed like ``like``, or a ValueError naming it."""
    mask = torch.as_tensor(value, device=like.device)
    _check_shape(name, mask, tuple(like.shape))
    return mask.bool()


def _check_scores(scores: Tensor) -> None:
    """Reject NaN scores: they have no place in a ranking and would sort arbitrarily."""
    if scores.ndim not in (1, 2):
        raise ValueError(f"scores must be [N] or [Q, N], got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; fix the scorer (use -inf to rank an image last)")


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")


def _check_image_ids(image_ids: Tensor, n: int) -> Tensor:
    """Image ids must match the columns and be unique: each orders one image's ties."""
    _check_shape("image_ids", image_ids, (n,))
    unique, counts = torch.unique(image_ids, return_counts=True)
    if bool((counts > 1).any()):
        repeated = unique[counts > 1][:10].tolist()
        raise ValueError(f"image_ids must be unique; repeated: {repeated}")
    return image_ids
