"""What every aggregator shares: the call contract, cell boxes and labels -> representatives.

An aggregator turns the dense grid of CLIP embeddings of a batch of images (Dense-CLIP)
into a few representatives per image (Cluster-CLIP). Each one only decides a partition
of the valid cells (a cluster label per cell); turning labels into ``Representatives``
is shared, so every aggregator defines a representative the same way: the L2-normalised
mean of its members, boxed by the bounding box of their cells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.registry import AGGREGATORS
from retrieval.representatives import Representatives

A = TypeVar("A", bound="type[Aggregator]")


def grid_cell_boxes(
    grid: tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[h * w, 4]`` normalised ``xyxy`` box of every cell of an ``h x w`` grid, raster order."""
    h, w = grid
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    return torch.stack([cols / w, rows / h, (cols + 1) / w, (rows + 1) / h], dim=1)


def compute_dtype(embeddings: Tensor) -> torch.dtype:
    """Clustering runs in float32 at least: fp16 shards would tie and round distances."""
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def representatives_from_labels(
    embeddings: Tensor, labels: Tensor, cell_boxes: Tensor
) -> Representatives:
    """Builds representatives from a cluster label per cell.

    Clusters are ordered by their first member cell (raster order), so the result does
    not depend on how an aggregator numbers its clusters, and the batch is padded to
    its largest cluster count, at least one slot: a batch whose images are all padding
    keeps one masked representative per image, so scoring it gives ``-inf`` instead of
    reducing over an empty dimension.

    Args:
        embeddings: ``[B, N, D]`` dense embeddings.
        labels: ``[B, N]`` int64 cluster id in ``[0, N)`` per cell, ``-1`` for invalid cells.
        cell_boxes: ``[N, 4]`` normalised ``xyxy`` box of each cell.

    Returns:
        ``Representatives`` with ``extras["members"]``, the ``[B, R, N]`` bool member mask.
    """
    b, n, _ = embeddings.shape
    valid = labels >= 0
    onehot = torch.zeros(b, n, n, dtype=torch.bool, device=labels.device)
    onehot.scatter_(1, labels.clamp(min=0).unsqueeze(1), valid.unsqueeze(1))  # [B, label, cell]
    cells = torch.arange(n, device=labels.device)
    first = torch.where(onehot, cells, n).amin(dim=2)  # n where the label is unused
    order = first.argsort(dim=1, stable=True)
    r = max(int((first < n).sum(dim=1).max()), 1) if b else 0
    order = order[:, :r]
    members = onehot.gather(1, order.unsqueeze(2).expand(-1, -1, n))
    mask = first.gather(1, order) < n

    dtype = compute_dtype(embeddings)
    sums = members.to(dtype) @ embeddings.to(dtype)
    reps = F.normalize(sums, dim=2).to(embeddings.dtype)

    boxes = cell_boxes.to(device=labels.device)
    low = torch.where(members.unsqueeze(3), boxes[:, :2], torch.inf).amin(dim=2)
    high = torch.where(members.unsqueeze(3), boxes[:, 2:], -torch.inf).amax(dim=2)
    rep_boxes = torch.where(mask.unsqueeze(2), torch.cat([low, high], dim=2), 0.0)
    return Representatives(reps, mask, rep_boxes.to(boxes.dtype), {"members": members})


class Aggregator(ABC):
    """Callable turning a batch of dense grid embeddings into ``Representatives``.

    Subclasses implement :meth:`labels`, a batched partition of the valid cells; the
    whole batch is clustered at once on the device of the input tensors.
    """

    def __call__(
        self,
        embeddings: Tensor,
        mask: Tensor | None,
        grid: tuple[int, int],
        cell_boxes: Tensor | None = None,
    ) -> Representatives:
        """Aggregates a batch.

        Args:
            embeddings: ``[B, N, D]`` L2-normalised embeddings of the ``N = h * w`` cells.
            mask: ``[B, N]`` bool, True for valid cells; ``None`` means all valid.
            grid: ``(h, w)``, the cells being in raster order.
            cell_boxes: ``[N, 4]`` normalised ``xyxy`` cell boxes; default: the grid's.
        """
        mask, cell_boxes = check_inputs(embeddings, mask, grid, cell_boxes)
        labels = self.labels(embeddings, mask, grid)
        return representatives_from_labels(embeddings, labels, cell_boxes)

    @abstractmethod
    def labels(self, embeddings: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, N]`` int64 cluster id in ``[0, N)`` per cell, ``-1`` for invalid cells."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


def check_inputs(
    embeddings: Tensor, mask: Tensor | None, grid: tuple[int, int], cell_boxes: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validates shapes and fills the defaults: all cells valid, the grid's cell boxes."""
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [B, N, D], got {tuple(embeddings.shape)}")
    b, n, _ = embeddings.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {h}x{w} has {h * w} cells but embeddings have N={n}")
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=embeddings.device)
    elif mask.shape != (b, n):
        raise ValueError(f"mask must be [B, N] = {(b, n)}, got {tuple(mask.shape)}")
    if cell_boxes is None:
        cell_boxes = grid_cell_boxes(grid, embeddings.device)
    elif cell_boxes.shape != (n, 4):
        raise ValueError(f"cell_boxes must be [N, 4] = {(n, 4)}, got {tuple(cell_boxes.shape)}")
    return mask.to(device=embeddings.device, dtype=torch.bool), cell_boxes


def register_aggregator(name: str) -> Callable[[A], A]:
    """Class decorator registering an aggregator under ``name`` for :func:`create_aggregator`."""
    return AGGREGATORS.register(name)


def list_aggregators() -> list[str]:
    """Names accepted by :func:`create_aggregator`."""
    return AGGREGATORS.names()


def create_aggregator(name: str, **options: Any) -> Aggregator:
    """Builds a registered aggregator, e.g. ``create_aggregator("kmeans", k=10)``."""
    return AGGREGATORS.create(name, **options)


@register_aggregator("none")
class NoAggregation(Aggregator):
    """Dense-CLIP: every valid cell is its own representative, the input left unchanged."""

    def __call__(
        self,
        embeddings: Tensor,
        mask: Tensor | None,
        grid: tuple[int, int],
        cell_boxes: Tensor | None = None,
    ) -> Representatives:
        mask, cell_boxes = check_inputs(embeddings, mask, grid, cell_boxes)
        b, n, _ = embeddings.shape
        eye = torch.eye(n, dtype=torch.bool, device=mask.device)
        members = eye & mask.unsqueeze(2)
        boxes = cell_boxes.to(mask.device).expand(b, n, 4)
        return Representatives(embeddings, mask, boxes, {"members": members})

    def labels(self, embeddings: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        cells = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return torch.where(mask, cells, -1)
