"""Ground truth of a retrieval benchmark: which images are relevant to which query."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Category:
    """One query of the benchmark.

    Attributes:
        id: the dataset's category id.
        name: the dataset's raw name ("bow_(weapon)", "vehicle.car").
        query: the cleaned name put into the prompt templates ("bow", "car").
        split: a subset the report averages separately (LVIS frequency "rare",
            "common", "frequent"); None where the dataset has none.
    """

    id: int
    name: str
    query: str
    split: str | None = None


@dataclass
class GroundTruth:
    """Dense ``[Q, N]`` relevance of ``N`` images for ``Q`` categories.

    Attributes:
        image_ids: ``[N]`` int64 ids, in the column order of every matrix here.
        categories: ``Q`` categories, in the row order.
        relevant: ``[Q, N]`` bool, the image holds at least one instance of the category.
        ignore: ``[Q, N]`` bool, the image is left out of the category's ranking
            (LVIS federated protocol); never True where ``relevant`` is.
        max_area: ``[Q, N]`` float32, area (pixels, original resolution) of the largest
            instance of the category in the image, 0 where there is none. Drives the
            small-medium split (:func:`retrieval.metrics.functional.evaluate_rankings`).
        notes: protocol facts the report repeats (e.g. crowd annotations included).
    """

    image_ids: np.ndarray
    categories: list[Category]
    relevant: np.ndarray
    ignore: np.ndarray
    max_area: np.ndarray
    notes: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        q, n = len(self.categories), len(self.image_ids)
        for key in ("relevant", "ignore", "max_area"):
            shape = getattr(self, key).shape
            if shape != (q, n):
                raise ValueError(f"GroundTruth.{key} must be [Q, N] = {(q, n)}, got {shape}")

    @property
    def category_ids(self) -> np.ndarray:
        return np.array([c.id for c in self.categories], dtype=np.int64)

    def select_images(self, image_ids: np.ndarray) -> GroundTruth:
        """The same ground truth restricted to, and ordered as, ``image_ids``."""
        position = {int(i): k for k, i in enumerate(self.image_ids)}
        missing = [int(i) for i in image_ids if int(i) not in position]
        if missing:
            raise KeyError(f"image ids not in the dataset's ground truth: {missing[:10]}")
        cols = np.array([position[int(i)] for i in image_ids], dtype=np.int64)
        return GroundTruth(
            np.asarray(image_ids, dtype=np.int64),
            self.categories,
            self.relevant[:, cols],
            self.ignore[:, cols],
            self.max_area[:, cols],
            dict(self.notes),
        )
