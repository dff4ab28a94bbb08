"""The one data structure every retriever returns for a batch of images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Representatives:
    """A batch of images, each described by up to ``R`` embedding vectors.

    Images with fewer representatives than ``R`` are padded; ``mask`` marks the valid
    ones, so one tensor holds a batch of variable-size sets (Cluster-CLIP with a distance
    threshold gives a different count per image).

    Attributes:
        embeddings: ``[B, R, D]`` L2-normalised embeddings.
        mask: ``[B, R]`` bool, True where a representative is valid.
        boxes: optional ``[B, R, 4]`` normalised ``xyxy`` region of each representative,
            so a match can be shown on the image.
        extras: optional per-representative tensors a retriever needs for its own
            scoring (OWL-ViT's logit shift and scale), each ``[B, R, ...]``.
    """

    embeddings: Tensor
    mask: Tensor
    boxes: Tensor | None = None
    extras: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 3:
            raise ValueError(
                f"Representatives.embeddings must be [B, R, D], got {tuple(self.embeddings.shape)}"
            )
        if self.mask.shape != self.embeddings.shape[:2]:
            raise ValueError(
                f"Representatives.mask must be [B, R] = {tuple(self.embeddings.shape[:2])}, "
                f"got {tuple(self.mask.shape)}"
            )
        if self.boxes is not None and self.boxes.shape != (*self.embeddings.shape[:2], 4):
            raise ValueError(
                f"Representatives.boxes must be [B, R, 4], got {tuple(self.boxes.shape)}"
            )

    @classmethod
    def dense(cls, embeddings: Tensor, boxes: Tensor | None = None) -> Representatives:
        """Wraps ``[B, R, D]`` embeddings where every representative is valid."""
        mask = torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
        return cls(embeddings, mask, boxes)

    @classmethod
    def empty(cls) -> Representatives:
        """No images (a shard that only records unreadable files)."""
        return cls(torch.zeros(0, 0, 0), torch.zeros(0, 0, dtype=torch.bool))

    @property
    def batch_size(self) -> int:
        return self.embeddings.shape[0]

    @property
    def counts(self) -> Tensor:
        """``[B]`` number of valid representatives per image."""
        return self.mask.sum(dim=1)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Representatives:
        """Moves every tensor to ``device``; floating tensors are cast to ``dtype``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Representatives(
            move(self.embeddings),
            move(self.mask),
            None if self.boxes is None else move(self.boxes),
            None if self.extras is None else {k: move(v) for k, v in self.extras.items()},
        )

    def select(self, index: Tensor | slice) -> Representatives:
        """The representatives of a subset of the batch's images."""
        return Representatives(
            self.embeddings[index],
            self.mask[index],
            None if self.boxes is None else self.boxes[index],
            None if self.extras is None else {k: v[index] for k, v in self.extras.items()},
        )

    @staticmethod
    def concat(parts: list[Representatives]) -> Representatives:
        """Concatenates batches along images, padding to the largest ``R``."""
        r = max(p.embeddings.shape[1] for p in parts)

        def pad(t: Tensor, value: float | bool = 0) -> Tensor:
            extra = r - t.shape[1]
            if extra == 0:
                return t
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], 1)

        boxes = [p.boxes for p in parts if p.boxes is not None]
        has_boxes = len(boxes) == len(parts)
        extras = [p.extras or {} for p in parts]
        extras_keys = set.intersection(*(set(e) for e in extras))
        return Representatives(
            torch.cat([pad(p.embeddings) for p in parts]),
            torch.cat([pad(p.mask, False) for p in parts]),
            torch.cat([pad(b) for b in boxes]) if has_boxes else None,
            {k: torch.cat([pad(e[k]) for e in extras]) for k in extras_keys} or None,
        )
