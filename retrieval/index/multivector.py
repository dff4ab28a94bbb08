"""Multi-vector queries (a picture, a stored image, "more like this"): Chamfer / MaxSim.

A query picture becomes what the index's own retriever makes of it, a set ``Q`` of
representatives (a stored image: its stored ones). An indexed image ``I`` scores

    MaxSim(Q, I) = mean over q in Q of max over r in I of cos(q, r)

(the Chamfer similarity of the two sets, as ColBERT scores a document), so a picture
finds itself (every ``q`` has its own copy in ``I``: score 1) and a near copy finds its
original, where the mean of ``Q`` as one vector did not (an exact copy ranked 27th of
160). With one vector (a region) it is the max cosine a text query gets.

Exact backends (exact, faiss-flat) score every image in one pass over the table
(:func:`~retrieval.index.kernels.maxsim_search`), as many products as ``|Q|`` text
queries. Approximate ones gather candidates: each ``q``'s own top ``fetch`` images by
the backend's search, re-scored exactly over all their representatives from the fp16
table. An image outside every ``q``'s list scores at most the mean over ``q`` of the
last score in ``q``'s list, so once the ``k``-th candidate reaches that bound the top
``k`` are certain (as far as the backend's lists are right); until then ``fetch`` grows
``FETCH_GROWTH``-fold, up to ``MAX_FETCH`` x ``k`` images per vector, after which the
best candidates are the answer (approximate, like the backend's own answers).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.errors import ConfigError, IndexFileError
from retrieval.index.base import Backend
from retrieval.index.kernels import RowHits, maxsim_search

FETCH_GROWTH = 4
MAX_FETCH = 4  # images fetched per query vector, at most, in multiples of k


def check_queries(queries: Tensor | np.ndarray, dim: int) -> Tensor:
    """``queries`` as unit float rows ``[m, D]`` (one ``[D]`` vector is ``m = 1``), or a
    clear error for a wrong size or an empty set."""
    q = torch.as_tensor(queries).float()
    q = q.unsqueeze(0) if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise IndexFileError(
            f"query embeddings of shape {tuple(q.shape)} do not match this index's size "
            f"{dim}: queries must come from the retriever that made the index"
        )
    if not len(q):
        raise ConfigError(
            "the query picture has no representative (its retriever kept none): "
            "try another picture or region"
        )
    return F.normalize(q, dim=1)


@torch.no_grad()
def multivector_rows(
    backend: Backend, queries: Tensor, k: int, images: np.ndarray | None = None
) -> RowHits:
    """Top ``k`` images of the multi-vector query ``queries [m, D]`` (unit rows) by MaxSim,
    among the image positions ``images`` when given: each image's best-matching row and
    its MaxSim score, best first (ties by ascending image id)."""
    table = backend.require_table()
    native = backend.engine.maxsim(queries, k, images)
    if native is not None:
        return native
    if not backend.approximate:
        return maxsim_search(table, queries, k, backend.device, images=images)
    total = table.searchable_images if images is None else len(images)
    fetch = min(k, total)
    while True:
        if images is None:
            found = backend.search_rows(queries, fetch)
        else:
            found = backend.search_rows_in(queries, fetch, images)
        seen = np.unique(np.concatenate([table.owner[rows] for rows, _ in found]))
        rows, scores = maxsim_search(table, queries, k, "cpu", images=seen)
        complete = any(len(r) < fetch for r, _ in found) or fetch >= total
        bound = float(np.mean([s[-1] for _, s in found])) if not complete else -np.inf
        certain = len(rows) >= min(k, total) and float(scores[-1]) >= bound
        if certain or complete or fetch >= MAX_FETCH * k:
            return rows, scores
        fetch = min(fetch * FETCH_GROWTH, total)
