"""The retriever interface: images -> representatives, text -> query vectors, and a score."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from retrieval.representatives import Representatives

NEG_INF = float("-inf")


def similarities(text: Tensor, reps: Representatives) -> Tensor:
    """``[Q, B, R]`` cosine of every query with every representative; invalid ones -inf.

    One matrix product per image (``bmm``), so an image's similarities do not depend on
    which other images share its chunk: scores are bit-identical however the images are
    split across shards, chunks and processes.
    """
    emb = reps.embeddings.to(text.dtype)
    b, _, d = emb.shape
    sims = torch.bmm(emb, text.T.unsqueeze(0).expand(b, d, text.shape[0]))  # [B, R, Q]
    sims = sims.masked_fill(~reps.mask.unsqueeze(-1), NEG_INF)
    return sims.permute(2, 0, 1)


def max_cosine(text: Tensor, reps: Representatives) -> Tensor:
    """Score of each image for each query: the max cosine over its valid representatives.

    Args:
        text: ``[Q, D]`` L2-normalised query embeddings.
        reps: a batch of ``B`` images.

    Returns:
        ``[Q, B]`` scores; an image with no valid representative scores ``-inf``.
    """
    return similarities(text, reps).amax(dim=2)


def argmax_representative(text: Tensor, reps: Representatives) -> Tensor:
    """``[Q, B]`` index of the representative that gives each image its score."""
    return similarities(text, reps).argmax(dim=2)


class Retriever(nn.Module, ABC):
    """Base class of every retriever.

    A retriever owns its model, its image preprocessing and its scoring rule, so the
    engine never needs to know which family it runs. Subclasses implement
    :meth:`encode_images` and :meth:`encode_text`; :meth:`score` defaults to the max
    cosine over an image's representatives.

    Attributes:
        image_transform: PIL image -> ``[3, H, W]`` tensor, the retriever's own
            preprocessing (the data loader applies it).
        embed_dim: dimension ``D`` of representatives and queries.
        random_weights: True when the model was built without pretrained weights; the
            engine then warns that metrics are meaningless.
    """

    image_transform: Callable[[Image.Image], Tensor]
    embed_dim: int
    random_weights: bool = False

    @abstractmethod
    def encode_images(self, pixels: Tensor) -> Representatives:
        """Embeds a batch ``[B, 3, H, W]`` into its representatives."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> Tensor:
        """Embeds ``Q`` texts into ``[Q, D]`` L2-normalised vectors."""

    def score(self, text: Tensor, reps: Representatives) -> Tensor:
        """``[Q, B]`` score of each image for each query (higher is better, any sign)."""
        return max_cosine(text, reps)

    def describe(self) -> dict[str, Any]:
        """What determines this retriever's image embeddings (stored with the shards)."""
        return dict(getattr(self, "config", {}))
