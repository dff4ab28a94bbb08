"""The retrieval metrics as a torchmetrics ``Metric``: accumulate images, rank at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from retrieval.metrics.functional import evaluate_rankings

_STATES = ("scores", "relevant", "ignore", "max_area", "image_ids")


class RetrievalEvaluation(Metric):
    """Every protocol metric (:func:`evaluate_rankings`) over all the images seen.

    A ranking needs every image, so ``update`` only stores chunks of columns and
    ``compute`` ranks them all at once. Chunks are stored image-major (``[B, Q]``)
    because torchmetrics concatenates list states along dim 0 when it gathers them
    across processes; the column order does not matter (ties are broken by image id).

    Pass ``sync_on_compute=False`` when ``compute`` runs on one rank only, or the other
    ranks never join the gather.

    Args:
        top_k: the cut-off K of AP@K.
        large_area: smallest instance area counted as large for the s-m split.
        splits: one label per category (LVIS "rare" ...) to average separately.
        **kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``,
            ``compute_on_cpu``, ``process_group`` ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    # list states (add_state in __init__): chunks, image-major
    scores: list[Tensor]
    relevant: list[Tensor]
    ignore: list[Tensor]
    max_area: list[Tensor]
    image_ids: list[Tensor]

    def __init__(
        self,
        top_k: int = 50,
        large_area: float = 96.0**2,
        splits: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.top_k = top_k
        self.large_area = large_area
        self.splits = None if splits is None else list(splits)
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        scores: Tensor,
        relevant: Tensor,
        ignore: Tensor,
        max_area: Tensor,
        image_ids: Tensor,
    ) -> None:
        """Store a chunk of B images.

        Args:
            scores: ``[Q, B]`` scores of the chunk's images for every category.
            relevant: ``[Q, B]`` bool, the image holds the category.
            ignore: ``[Q, B]`` bool, the image is left out of the category's ranking.
            max_area: ``[Q, B]`` area of the category's largest instance in the image.
            image_ids: ``[B]`` int ids of the chunk's images.
        """
        scores = torch.as_tensor(scores)
        if scores.ndim != 2:
            raise ValueError(f"scores must have shape [Q, B], got {tuple(scores.shape)}")
        if self.scores and self.scores[0].shape[1] != scores.shape[0]:
            raise ValueError(
                f"scores has {scores.shape[0]} categories, earlier chunks had "
                f"{self.scores[0].shape[1]}"
            )
        image_ids = torch.as_tensor(image_ids).long()
        if image_ids.shape != (scores.shape[1],):
            raise ValueError(
                f"image_ids must have shape ({scores.shape[1]},), got {tuple(image_ids.shape)}"
            )
        chunk = {
            "scores": scores,
            "relevant": torch.as_tensor(relevant).bool(),
            "ignore": torch.as_tensor(ignore).bool(),
            "max_area": torch.as_tensor(max_area).float(),
        }
        for name, value in chunk.items():
            if value.shape != scores.shape:
                raise ValueError(
                    f"{name} must have shape {tuple(scores.shape)} like scores, "
                    f"got {tuple(value.shape)}"
                )
        for name, value in chunk.items():
            getattr(self, name).append(value.T.to(self.device))
        self.image_ids.append(image_ids.to(self.device))

    def compute(self) -> dict[str, object]:
        """Rank every image seen for every category; see :func:`evaluate_rankings`."""
        if len(self.image_ids) == 0:
            raise ValueError("RetrievalEvaluation.compute() called before any update()")
        scores, relevant, ignore, max_area = (
            dim_zero_cat(getattr(self, name)).T for name in _STATES[:-1]
        )
        return evaluate_rankings(
            scores,
            relevant,
            ignore,
            max_area,
            dim_zero_cat(self.image_ids),
            top_k=self.top_k,
            large_area=self.large_area,
            splits=self.splits,
        )
