"""Spherical k-means over a batch of images at once (the paper's Cluster-CLIP K.M.)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.aggregate.base import Aggregator, compute_dtype, register_aggregator
from retrieval.errors import ConfigError


def kmeans_plus_plus(x: Tensor, mask: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's variant).

    Each seed is the best of ``2 + log k`` candidates drawn with probability
    proportional to the squared euclidean distance ``2 - 2 cos`` to the nearest seed
    so far: the one leaving the smallest total distance. Greedy trials avoid two seeds
    in one cluster, the usual way plain k-means++ ends in a poor local minimum. The
    uniform numbers come from a CPU generator shared by every image, so a seed gives
    the same result on any device and for an image alone or in any batch.

    Args:
        x: ``[B, N, D]`` L2-normalised embeddings.
        mask: ``[B, N]`` valid cells.
        k: number of seeds to draw.
        seed: random seed.

    Returns:
        ``[B, k, D]`` seeds and ``[B, k]`` bool, False where an image ran out of distinct
        valid cells (fewer valid cells than ``k``).
    """
    b, n, d = x.shape
    trials = 2 + int(math.log(k))
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(k, trials, generator=generator, dtype=torch.float64)
    uniform = uniform.to(x.device, x.dtype)
    rows = torch.arange(b, device=x.device)
    seeds = x.new_zeros(b, k, d)
    seed_valid = torch.zeros(b, k, dtype=torch.bool, device=x.device)
    weights = mask.to(x.dtype)  # the first seed: uniform over valid cells
    for c in range(k):
        cdf = weights.cumsum(dim=1)
        total = cdf[:, -1]
        target = uniform[c].unsqueeze(0) * total.unsqueeze(1)
        candidates = torch.searchsorted(cdf, target, right=True).clamp(max=n - 1)  # [B, T]
        points = x.gather(1, candidates.unsqueeze(2).expand(-1, -1, d))
        distance = (2 - 2 * points @ x.transpose(1, 2)).clamp(min=0)  # [B, T, N]
        reduced = torch.where(mask.unsqueeze(1), distance, 0)
        if c > 0:
            reduced = torch.minimum(weights.unsqueeze(1), reduced)
        best = reduced.sum(dim=2).argmin(dim=1) if c > 0 else torch.zeros_like(rows)
        index = candidates[rows, best]
        seeds[:, c] = x[rows, index]
        seed_valid[:, c] = total > 0
        weights = reduced[rows, best]
        weights[rows, index] = 0  # rounding must not let a seed be drawn twice
    return seeds, seed_valid


def kmeans_labels(
    embeddings: Tensor,
    mask: Tensor,
    k: int,
    iterations: int = 30,
    seed: int = 0,
    init: Tensor | None = None,
) -> Tensor:
    """Spherical k-means: assign by largest cosine, centroid = normalised mean of members.

    Lloyd iterations run on the whole batch; an image stops moving once its assignment
    is stable, so batching never changes an image's result. An empty cluster is moved
    deterministically to the cell farthest from its own centroid (the farthest ones,
    in order, when several are empty), as scikit-learn does. Images with fewer valid
    cells than ``k`` get one cluster per distinct cell.

    With ``init`` the Lloyd iterations start from the given centres instead of the
    k-means++ seeds, and cluster ``j`` is the one grown from ``init[j]``, so a run can
    be compared with scikit-learn's euclidean ``KMeans(init=...)`` from the same point.
    The two need not agree: on unit vectors euclidean k-means assigns a point to the
    largest ``cos * |c| - |c|^2 / 2`` of its un-normalised centres ``c``, spherical
    k-means to the largest cosine; they agree where each point's own centre wins by
    more than the centres' norms differ (well-separated clusters).

    Args:
        embeddings: ``[B, N, D]`` L2-normalised embeddings.
        mask: ``[B, N]`` valid cells.
        k: clusters per image.
        iterations: maximum Lloyd iterations.
        seed: seed of the k-means++ initialisation (unused with ``init``).
        init: ``[B, k, D]`` initial centres, or ``[k, D]`` shared by every image; they
            are L2-normalised like every centroid. None: greedy k-means++ seeding.

    Returns:
        ``[B, N]`` cluster id in ``[0, k)`` per cell, ``-1`` for invalid cells.
    """
    x = F.normalize(embeddings.to(compute_dtype(embeddings)), dim=2)
    b, n, d = x.shape
    if init is None:
        centers, center_valid = kmeans_plus_plus(x, mask, min(k, n), seed)
    else:
        if init.ndim == 2:
            init = init.unsqueeze(0).expand(b, -1, -1)
        if init.shape != (b, k, d):
            raise ValueError(
                f"kmeans init must be [B, k, D] = {(b, k, d)} or [k, D], got {tuple(init.shape)}"
            )
        centers = F.normalize(init.to(device=x.device, dtype=x.dtype), dim=2)
        center_valid = torch.ones(b, k, dtype=torch.bool, device=x.device)
    labels = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    for _ in range(iterations):
        similarity = (x @ centers.transpose(1, 2)).masked_fill(
            ~center_valid.unsqueeze(1), -torch.inf
        )
        own, assigned = similarity.max(dim=2)
        assigned = torch.where(mask, assigned, -1)
        moving = (assigned != labels).any(dim=1)
        labels = assigned
        if not bool(moving.any()):
            break
        members = F.one_hot(labels.clamp(min=0), centers.shape[1]).to(x.dtype)
        members = members * mask.unsqueeze(2)
        updated = F.normalize(members.transpose(1, 2) @ x, dim=2)
        empty = center_valid & (members.sum(dim=1) == 0)
        farthest = own.masked_fill(~mask, torch.inf).argsort(dim=1, stable=True)
        rank = (empty.cumsum(dim=1) - 1).clamp(min=0)
        relocated = x.gather(1, farthest.gather(1, rank).unsqueeze(2).expand_as(updated))
        updated = torch.where(empty.unsqueeze(2), relocated, updated)
        centers = torch.where(moving.view(b, 1, 1), updated, centers)
    return labels


@register_aggregator("kmeans")
class KMeans(Aggregator):
    """Spherical k-means with greedy k-means++ seeding; ``k`` representatives per image.

    Args:
        k: clusters per image (the paper's K.M. row uses 10).
        iterations: maximum Lloyd iterations.
        seed: seed of the initialisation; the same seed gives the same clusters.
    """

    def __init__(self, k: int = 10, iterations: int = 30, seed: int = 0) -> None:
        if k < 1 or iterations < 1:
            raise ConfigError(f"kmeans needs k >= 1 and iterations >= 1, got {k=}, {iterations=}")
        self.k = k
        self.iterations = iterations
        self.seed = seed

    def labels(self, embeddings: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        return kmeans_labels(embeddings, mask, self.k, self.iterations, self.seed)
