"""Agglomerative clustering of a batch of images at once (the paper's AG-F and AG-T).

Lance-Williams updates on a ``[B, N, N]`` distance tensor: each step merges the
closest pair of clusters of every image of the batch, so a batch costs ``N`` steps of
tensor operations on its device instead of one scikit-learn call per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.aggregate.base import Aggregator, compute_dtype, register_aggregator
from retrieval.errors import ConfigError

LINKAGES = ("average", "complete", "single", "ward")


def grid_adjacency(grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """``[N, N]`` bool 4-neighbour adjacency of the cells of an ``h x w`` grid, raster order."""
    h, w = grid
    index = torch.arange(h * w, device=device).view(h, w)
    adjacency = torch.zeros(h * w, h * w, dtype=torch.bool, device=device)
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1], index[1:])):
        adjacency[a.reshape(-1), b.reshape(-1)] = True
        adjacency[b.reshape(-1), a.reshape(-1)] = True
    return adjacency


def _linkage_update(
    linkage: str, d_i: Tensor, d_j: Tensor, d_ij: Tensor, n_i: Tensor, n_j: Tensor, n_k: Tensor
) -> Tensor:
    """Distance from every cluster ``k`` to the union of clusters ``i`` and ``j``.

    ``inf`` marks a missing (non-adjacent) pair: as in scikit-learn's connectivity-
    constrained linkage, the union then takes the distance of the pair that exists.
    Ward distances are squared, which makes its update exact.
    """
    if linkage == "single":
        return torch.minimum(d_i, d_j)
    if linkage == "ward":
        return ((n_i + n_k) * d_i + (n_j + n_k) * d_j - n_k * d_ij) / (n_i + n_j + n_k)
    missing = d_i.isinf() | d_j.isinf()
    if linkage == "complete":
        both = torch.maximum(d_i, d_j)
    else:
        both = (n_i * d_i + n_j * d_j) / (n_i + n_j)
    return torch.where(missing, torch.minimum(d_i, d_j), both)


def merge_tree(
    distances: Tensor, alive: Tensor, linkage: str, adjacency: Tensor | None, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs ``steps`` merges of agglomerative clustering on every image of a batch.

    Clusters are kept in the rows of their smallest cell. Ward keeps every distance
    (its update needs them) and searches only adjacent pairs; the other linkages keep
    ``inf`` for non-adjacent pairs, so their search and update read one tensor.

    Args:
        distances: ``[B, N, N]`` symmetric cell distances (squared euclidean for ward).
        alive: ``[B, N]`` valid cells.
        linkage: one of ``LINKAGES``.
        adjacency: ``[B, N, N]`` bool allowed merges, or None for all pairs.
        steps: number of merge steps.

    Returns:
        ``keep``, ``drop`` (``[steps, B]`` rows merged at each step: ``drop`` into
        ``keep``) and ``height`` (``[steps, B]`` linkage distance of the merge, ``inf``
        once an image has nothing left to merge).
    """
    b, n, _ = distances.shape
    rows = torch.arange(b, device=distances.device)
    pairs = alive.unsqueeze(2) & alive.unsqueeze(1)
    pairs &= ~torch.eye(n, dtype=torch.bool, device=distances.device)
    # the adjacency that Ward's search reads (and updates); None for the other linkages
    ward_adjacency = adjacency if linkage == "ward" else None
    if adjacency is not None and ward_adjacency is None:
        pairs &= adjacency
    dist = torch.where(pairs, distances, torch.inf)
    search = dist if ward_adjacency is None else torch.where(ward_adjacency, dist, torch.inf)
    size = alive.to(dist.dtype)
    keep, drop, height = [], [], []
    for _ in range(steps):
        h, row = search.amin(dim=2).min(dim=1)  # row minima first: far cheaper on a CPU
        col = search[rows, row].argmin(dim=1)
        i, j = torch.minimum(row, col), torch.maximum(row, col)
        active = h.isfinite().unsqueeze(1)
        d_i, d_j = dist[rows, i], dist[rows, j]
        n_i, n_j = size[rows, i].unsqueeze(1), size[rows, j].unsqueeze(1)
        new = _linkage_update(linkage, d_i, d_j, dist[rows, i, j].unsqueeze(1), n_i, n_j, size)
        new[rows, i] = torch.inf
        new[rows, j] = torch.inf
        new = torch.where(active, new, d_i)
        gone = torch.where(active, torch.inf, d_j)
        dist[rows, i], dist[rows, :, i] = new, new
        dist[rows, j], dist[rows, :, j] = gone, gone
        size[rows, i] += torch.where(active.squeeze(1), n_j.squeeze(1), 0)
        size[rows, j] *= ~active.squeeze(1)
        if ward_adjacency is not None:
            a_i = (ward_adjacency[rows, i] | ward_adjacency[rows, j]) & (new < torch.inf)
            a_i = torch.where(active, a_i, ward_adjacency[rows, i])
            a_j = ward_adjacency[rows, j] & ~active
            ward_adjacency[rows, i], ward_adjacency[rows, :, i] = a_i, a_i
            ward_adjacency[rows, j], ward_adjacency[rows, :, j] = a_j, a_j
            s_i, s_j = torch.where(a_i, new, torch.inf), torch.where(a_j, gone, torch.inf)
            search[rows, i], search[rows, :, i] = s_i, s_i
            search[rows, j], search[rows, :, j] = s_j, s_j
        keep.append(i)
        drop.append(j)
        height.append(h)
    if not keep:
        empty = torch.empty(0, b, device=distances.device)
        return empty.long(), empty.long(), empty.to(dist.dtype)
    return torch.stack(keep), torch.stack(drop), torch.stack(height)


def agglomerative_labels(
    embeddings: Tensor,
    mask: Tensor,
    grid: tuple[int, int],
    n_clusters: int | None = None,
    distance_threshold: float | None = None,
    linkage: str = "average",
    connectivity: bool = False,
) -> Tensor:
    """Agglomerative clustering of every image of a batch, as scikit-learn defines it.

    ``average``, ``complete`` and ``single`` use the cosine distance ``1 - cos``; ``ward``
    uses the euclidean distance between the L2-normalised vectors (ward needs
    euclidean). With ``distance_threshold`` the tree is cut as scikit-learn does: an
    image keeps one cluster more than it has merges at a distance ``>= threshold``.
    With ``connectivity`` only clusters adjacent on the 4-neighbour cell grid merge; an
    image whose valid cells form several islands keeps at least one cluster per island
    (scikit-learn would instead join the islands).

    Args:
        embeddings: ``[B, N, D]`` L2-normalised embeddings.
        mask: ``[B, N]`` valid cells.
        grid: ``(h, w)`` of the cells, raster order.
        n_clusters: clusters per image (AG-F); images with fewer valid cells keep all.
        distance_threshold: linkage distance at which merging stops (AG-T).
        linkage: one of ``average``, ``complete``, ``single``, ``ward``.
        connectivity: restrict merges to spatially adjacent clusters.

    Returns:
        ``[B, N]`` cluster id in ``[0, N)`` per cell, ``-1`` for invalid cells.
    """
    x = F.normalize(embeddings.to(compute_dtype(embeddings)), dim=2)
    cosine = x @ x.transpose(1, 2)
    distances = (2 - 2 * cosine).clamp(min=0) if linkage == "ward" else 1 - cosine
    adjacency = None
    if connectivity:
        adjacency = grid_adjacency(grid, x.device).expand(x.shape[0], -1, -1).clone()
    n_valid = mask.sum(dim=1)
    if n_clusters is not None:
        budget = (n_valid - n_clusters).clamp(min=0)
    else:
        budget = (n_valid - 1).clamp(min=0)
    keep, drop, height = merge_tree(distances, mask, linkage, adjacency, int(budget.max()))
    if linkage == "ward":
        height = height.clamp(min=0).sqrt()
    if distance_threshold is not None:
        budget = (height < distance_threshold).sum(dim=0)

    cells = torch.arange(mask.shape[1], device=mask.device)
    labels = torch.where(mask, cells, -1)
    for step in range(keep.shape[0]):
        merged = (labels == drop[step].unsqueeze(1)) & (step < budget).unsqueeze(1)
        labels = torch.where(merged, keep[step].unsqueeze(1), labels)
    return labels


@register_aggregator("agglomerative")
class Agglomerative(Aggregator):
    """Agglomerative clustering; give exactly one of ``n_clusters`` or ``distance_threshold``.

    Args:
        n_clusters: clusters per image, the paper's AG-F (50).
        distance_threshold: stop merging at this linkage distance, the paper's AG-T
            (about 10 clusters per image).
        linkage: ``average`` (default), ``complete`` or ``single`` on the cosine
            distance, or ``ward`` on the euclidean distance of the normalised vectors.
        connectivity: merge only clusters adjacent on the 4-neighbour cell grid.
    """

    def __init__(
        self,
        n_clusters: int | None = None,
        distance_threshold: float | None = None,
        linkage: str = "average",
        connectivity: bool = False,
    ) -> None:
        if (n_clusters is None) == (distance_threshold is None):
            raise ConfigError(
                "agglomerative needs exactly one of n_clusters (AG-F, e.g. 50) or "
                f"distance_threshold (AG-T), got {n_clusters=}, {distance_threshold=}"
            )
        if n_clusters is not None and n_clusters < 1:
            raise ConfigError(f"agglomerative n_clusters must be >= 1, got {n_clusters}")
        if linkage not in LINKAGES:
            raise ConfigError(f"unknown linkage {linkage!r}; choose one of {', '.join(LINKAGES)}")
        self.n_clusters = n_clusters
        self.distance_threshold = distance_threshold
        self.linkage = linkage
        self.connectivity = connectivity

    def labels(self, embeddings: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        return agglomerative_labels(
            embeddings,
            mask,
            grid,
            self.n_clusters,
            self.distance_threshold,
            self.linkage,
            self.connectivity,
        )
