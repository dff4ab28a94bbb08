"""AP by object size: how a retriever does on small, medium and large objects.

A category's AP in a size bin keeps, as positives, only the images whose *largest*
instance of the category falls in the bin; the other relevant images are left out of
the ranking (as the s-m split does), negatives are unchanged. So a bin's AP answers
"can the retriever find images where the object is only this big", and the
(0, 96²) bin is exactly the s-m split of docs/protocol.md.

The engine computes this from ``GroundTruth.max_area`` and writes ``per_size.json``;
for run folders made before that, :func:`load_per_size` recomputes it from
``scores.npz`` and the dataset named in ``config.yaml``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from retrieval.errors import StoreError
from retrieval.metrics.functional import average_precision

PER_SIZE_FILE = "per_size.json"


def size_bins(
    small_area: float = 32.0**2, large_area: float = 96.0**2
) -> dict[str, tuple[float, float]]:
    """COCO's buckets on the largest instance's area (pixels): small < 32², large >= 96².

    Pass ``protocol.large_area`` as ``large_area`` so "large" agrees with the s-m split.
    """
    return {
        "small": (0.0, small_area),
        "medium": (small_area, large_area),
        "large": (large_area, math.inf),
    }


SIZE_BINS = size_bins()


def _tensor(array: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array)).to(dtype)


def _mean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def ap_by_size(
    scores: Any,
    relevant: Any,
    ignore: Any,
    max_area: Any,
    image_ids: Any,
    bins: Mapping[str, tuple[float, float]] = SIZE_BINS,
    *,
    top_k: int = 50,
) -> dict[str, Any]:
    """Per-category and mean AP@K and AP within each object-size bin.

    Args:
        scores: ``[Q, N]`` scores (numpy or torch).
        relevant: ``[Q, N]`` bool, the image holds the category.
        ignore: ``[Q, N]`` bool, left out of the category's ranking (LVIS federated).
        max_area: ``[Q, N]`` area of the category's largest instance in the image.
        image_ids: ``[N]`` image ids; they order equal scores.
        bins: name -> ``(min_area, max_area)``, half-open ``[min, max)``; ``inf`` allowed.
        top_k: the K of AP@K.

    Returns:
        JSON-ready ``{"top_k": K, "bins": {name: {...}}}``; each bin holds ``min_area``,
        ``max_area`` (None for no upper bound), ``map@K``, ``map`` (means over the
        categories with a positive in the bin, NaN if none), ``categories`` (that
        count), ``positives`` (total) and ``per_category`` lists ``positives``,
        ``ap@K``, ``ap`` in the row order of ``scores`` (NaN where no positive).
    """
    s = _tensor(scores, torch.float64)
    rel = _tensor(relevant, torch.bool)
    ign = _tensor(ignore, torch.bool)
    area = _tensor(max_area, torch.float64)
    ids = _tensor(image_ids, torch.int64)
    out: dict[str, Any] = {"top_k": top_k, "bins": {}}
    for name, (lo, hi) in bins.items():
        inside = rel & (area >= lo) & (area < hi)
        left_out = ign | (rel & ~inside)
        kept = inside & ~ign
        ap_k = average_precision(s, kept, top_k=top_k, ignore=left_out, tie_break=ids).numpy()
        ap = average_precision(s, kept, ignore=left_out, tie_break=ids).numpy()
        positives = kept.sum(dim=1).numpy()
        out["bins"][name] = {
            "min_area": float(lo),
            "max_area": None if math.isinf(hi) else float(hi),
            f"map@{top_k}": _mean(ap_k),
            "map": _mean(ap),
            "categories": int((positives > 0).sum()),
            "positives": int(positives.sum()),
            "per_category": {
                "positives": positives.astype(int).tolist(),
                f"ap@{top_k}": ap_k.tolist(),
                "ap": ap.tolist(),
            },
        }
    return out


def _recompute(run_dir: Path, top_k: int) -> dict[str, Any]:
    """Size bins from ``scores.npz`` and the ground truth of the run's own dataset, built
    as the engine built it (same data and protocol options)."""
    from retrieval.config import load_stored_config
    from retrieval.data.base import RetrievalDataset
    from retrieval.factory import build_dataset

    cfg = load_stored_config(run_dir / "config.yaml")
    cfg.data.on_bad_image = "skip"  # only the annotations matter here
    saved = np.load(run_dir / "scores.npz")  # a scored run: its dataset is labelled
    dataset = cast(RetrievalDataset, build_dataset(cfg, None))
    gt = dataset.ground_truth().select_images(saved["image_ids"])
    if not np.array_equal(gt.category_ids, saved["category_ids"]):
        raise StoreError(f"{run_dir}/scores.npz and the dataset disagree on the categories")
    bins = size_bins(large_area=cfg.protocol.large_area)
    return ap_by_size(
        saved["scores"], gt.relevant, gt.ignore, gt.max_area, gt.image_ids, bins, top_k=top_k
    )


def load_per_size(run_dir: str | Path, top_k: int = 50) -> tuple[dict[str, Any] | None, str]:
    """A run's size bins: its ``per_size.json``, else recomputed; None and why if neither.

    Returns:
        ``(per_size, source)``: source is ``per_size.json``, ``recomputed from scores.npz
        and <annotations>``, or the reason nothing could be had.
    """
    run_dir = Path(run_dir)
    path = run_dir / PER_SIZE_FILE
    if path.exists():
        return json.loads(path.read_text()), PER_SIZE_FILE
    if not (run_dir / "scores.npz").exists():
        return None, f"no {PER_SIZE_FILE} and no scores.npz in {run_dir}"
    try:
        per_size = _recompute(run_dir, top_k)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"no {PER_SIZE_FILE}, and recomputing it failed: {err}"
    return per_size, "recomputed from scores.npz and the dataset's annotations"
