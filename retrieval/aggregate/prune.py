"""Greedy redundancy pruning: our reading of the paper's Cluster-CLIP "R.P.".

The paper names R.P. only by its abbreviation (about 91 representatives per image for
RN50x64 at 448 px, out of 196 cells). We read it as redundancy pruning: a cell that
says nothing new next to the representatives kept so far is pruned into the closest
of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.aggregate.base import Aggregator, compute_dtype, register_aggregator
from retrieval.errors import ConfigError


def prune_labels(embeddings: Tensor, mask: Tensor, tau: float = 0.9) -> Tensor:
    """Greedy redundancy pruning, one pass over the cells, vectorised over the batch.

    Cells are visited in raster order. A cell whose cosine similarity to the seed (the
    first cell) of some kept representative exceeds ``tau`` joins the most similar
    seed (the first one on ties); otherwise it is kept as the seed of a new
    representative. Comparing with seeds, not running means, keeps the pass a single
    sweep whose result does not depend on the order members join.

    Args:
        embeddings: ``[B, N, D]`` L2-normalised embeddings.
        mask: ``[B, N]`` valid cells.
        tau: cosine similarity above which a cell is redundant.

    Returns:
        ``[B, N]`` index of the seed cell of each cell's representative, ``-1`` for
        invalid cells.
    """
    x = F.normalize(embeddings.to(compute_dtype(embeddings)), dim=2)
    similarity = x @ x.transpose(1, 2)
    b, n, _ = x.shape
    seeds = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    labels = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    cells = torch.arange(n, device=x.device)
    for cell in range(n):
        best, seed = similarity[:, cell].masked_fill(~seeds, -torch.inf).max(dim=1)
        join = mask[:, cell] & (best > tau)
        new = mask[:, cell] & ~join
        labels[:, cell] = torch.where(join, seed, torch.where(new, cells[cell], -1))
        seeds[:, cell] = new
    return labels


@register_aggregator("prune")
class Prune(Aggregator):
    """Greedy redundancy pruning (our reading of the paper's R.P.).

    Args:
        tau: cosine similarity above which a cell joins a kept representative; higher
            keeps more representatives. The paper does not give its value: calibrate
            it to the representative count wanted (about 91 of 196 in the paper).
    """

    def __init__(self, tau: float = 0.9) -> None:
        if not -1.0 <= tau <= 1.0:
            raise ConfigError(f"prune tau is a cosine similarity in [-1, 1], got {tau}")
        self.tau = tau

    def labels(self, embeddings: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        return prune_labels(embeddings, mask, self.tau)
