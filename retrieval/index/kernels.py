"""The exact-search kernels every backend builds on: no backend, no engine, only torch.

An image's score is the max cosine over its representatives. These functions compute it
exactly from the fp16 table (:class:`~retrieval.index.table.RepTable`): over the whole
table (:func:`exact_search`), over a subset of images (a filter's allow-list, or an
approximate backend's candidates: :func:`rerank`), for a multi-vector query by Chamfer /
MaxSim (:func:`maxsim_search`), and group representatives fetched best first by image
(:func:`first_per_image`). The engines (``exact``, faiss, LanceDB, Milvus) and the
front end's filtered-search fallback call them; they import no engine, so nothing here
points back up at one (an import-linter ``layers`` contract in pyproject.toml keeps it
so).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from retrieval.index.table import RepTable
from retrieval.store.scoring import resolve_device

RowHits = tuple[np.ndarray, np.ndarray]  # (table rows, scores), best first
CHUNK_BYTES = 64 << 20  # fp32 rows converted and multiplied at once
SUBSET_SHARE = 0.5  # a filter allowing at most this share of the rows scores them alone


def segment_best(sims: Tensor, local: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per group, the max of ``sims [n, Q]`` over its rows and the first row reaching it.

    Args:
        sims: scores of ``n`` rows for ``Q`` queries.
        local: ``[n]`` group of each row, in ``[0, groups)``.
        groups: number of groups.

    Returns:
        ``best [groups, Q]`` (``-inf`` for a group without rows) and ``arg [groups, Q]``,
        the row index (into ``sims``) of the first maximal row.
    """
    n, q = sims.shape
    index = local.unsqueeze(1).expand(n, q)
    best = sims.new_full((groups, q), float("-inf")).scatter_reduce(0, index, sims, "amax")
    rows = torch.arange(n, device=sims.device).unsqueeze(1).expand(n, q)
    at_max = torch.where(sims == best.gather(0, index), rows, n)
    arg = torch.full((groups, q), n, dtype=torch.long, device=sims.device)
    return best, arg.scatter_reduce(0, index, at_max, "amin")


def top_images(best: Tensor, arg: Tensor, image_ids: np.ndarray, k: int) -> list[RowHits]:
    """Top ``k`` groups per query from ``best [G, Q]``, ties by ascending image id."""
    out = []
    kk = min(k, best.shape[0])
    scores, groups = best.T.topk(kk, dim=1)
    rows = arg.T.gather(1, groups)
    for s, g, r in zip(scores.cpu().numpy(), groups.cpu().numpy(), rows.cpu().numpy(), strict=True):
        keep = np.isfinite(s)
        s, g, r = s[keep], g[keep], r[keep]
        order = np.lexsort((image_ids[g], -s))
        out.append((r[order].astype(np.int64), s[order]))
    return out


def chunk_rows(dim: int) -> int:
    return max(CHUNK_BYTES // (4 * dim), 1)


@torch.no_grad()
def exact_search(
    table: RepTable,
    queries: Tensor,
    k: int,
    device: str = "auto",
    resident: Tensor | None = None,
    images: np.ndarray | None = None,
) -> list[RowHits]:
    """Exact top ``k`` images of each query over the whole table.

    Args:
        table: the representatives.
        queries: ``[Q, D]`` float.
        k: images per query.
        device: where the products run.
        resident: the table's vectors already on ``device`` (fp16 or fp32), else read
            from the table by chunk.
        images: search only these image positions (a filter's allow-list): their rows
            alone are scored when they are at most ``SUBSET_SHARE`` of the table, else
            the whole table is and the other images are masked before the top-k.
    """
    best, arg, positions = image_best(table, queries, device, resident, images)
    return top_images(best, arg, table.image_ids[positions], k)


@torch.no_grad()
def maxsim_search(
    table: RepTable,
    queries: Tensor,
    k: int,
    device: str = "auto",
    resident: Tensor | None = None,
    images: np.ndarray | None = None,
) -> RowHits:
    """Exact top ``k`` images of one multi-vector query ``Q = queries [m, D]`` by
    Chamfer / MaxSim: an image's score is the mean over ``q`` in ``Q`` of the max cosine
    of ``q`` over the image's representatives (with one vector, the max cosine itself).

    Every image is scored in one pass over the table (or over the rows of ``images``,
    as :func:`exact_search` does). Each hit's row is the image's representative of the
    single best match (the query vector and representative of the highest cosine).
    """
    best, arg, positions = image_best(table, queries, device, resident, images)
    score = best.mean(dim=1, keepdim=True)  # -inf for images not searched
    which = best.argmax(dim=1, keepdim=True)
    ((rows, scores),) = top_images(score, arg.gather(1, which), table.image_ids[positions], k)
    return rows, scores


def image_best(
    table: RepTable,
    queries: Tensor,
    device: str,
    resident: Tensor | None,
    images: np.ndarray | None,
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Per image, the max cosine of each query over its rows and the first row reaching
    it: ``best [G, Q]`` (``-inf`` for an image not searched: removed, empty, or outside
    ``images``), ``arg [G, Q]`` table rows, and the images' table positions ``[G]``."""
    if images is not None:
        images = np.unique(np.asarray(images, dtype=np.int64))
        images = images[~table.removed[images]]
        rows = table.rows_of(images)
        if len(rows) <= SUBSET_SHARE * table.num_rows:
            best, arg = subset_best(table, queries, device, resident, images, rows)
            if len(rows):  # row numbers of the table (no rows: every image is -inf)
                arg = torch.from_numpy(rows).to(arg.device)[arg]
            return best, arg, images
    dev = resolve_device(device)
    q = queries.to(dev, torch.float32)
    owner = torch.from_numpy(table.owner).to(dev)
    n = table.num_images
    best = torch.full((n, len(q)), float("-inf"), device=dev)
    arg = torch.zeros((n, len(q)), dtype=torch.long, device=dev)
    step = chunk_rows(table.dim)
    for start in range(0, table.num_rows, step):
        stop = min(start + step, table.num_rows)
        if resident is not None:
            vectors = resident[start:stop].float()
        else:
            vectors = torch.from_numpy(np.array(table.vectors[start:stop])).to(dev).float()
        keep_best(best, arg, vectors @ q.T, owner[start:stop], start)
    if table.has_removed:  # tombstoned images: their rows are scored, never returned
        best[torch.from_numpy(table.removed).to(dev)] = float("-inf")
    if images is not None:  # a filter: images outside the allow-list are never returned
        masked = np.ones(table.num_images, bool)
        masked[images] = False
        best[torch.from_numpy(masked).to(dev)] = float("-inf")
    return best, arg, np.arange(n)


def keep_best(best: Tensor, arg: Tensor, sims: Tensor, groups: Tensor, start: int) -> None:
    """Folds one chunk of row scores ``sims [rows, Q]`` into the running per-image best
    (in place): ``groups`` gives each row's image index (ascending, contiguous), ``start``
    the chunk's first row, so ``arg`` keeps row numbers."""
    first = int(groups[0])
    count = int(groups[-1]) - first + 1
    chunk_best, chunk_arg = segment_best(sims, groups - first, count)
    view = slice(first, first + count)
    better = chunk_best > best[view]
    best[view] = torch.where(better, chunk_best, best[view])
    arg[view] = torch.where(better, chunk_arg + start, arg[view])


def subset_best(
    table: RepTable,
    queries: Tensor,
    device: str,
    resident: Tensor | None,
    images: np.ndarray,
    rows: np.ndarray,
) -> tuple[Tensor, Tensor]:
    """:func:`image_best` among the image positions ``images`` (ascending, live), scoring
    only their ``rows`` (``table.rows_of(images)``), by chunk; ``arg`` indexes ``rows``."""
    dev = resolve_device(device)
    q = queries.to(dev, torch.float32)
    local = torch.from_numpy(np.searchsorted(images, table.owner[rows])).to(dev)
    best = torch.full((len(images), len(q)), float("-inf"), device=dev)
    arg = torch.zeros((len(images), len(q)), dtype=torch.long, device=dev)
    step = chunk_rows(table.dim)
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        part = rows[start:stop]
        if resident is not None:
            vectors = resident[torch.from_numpy(part).to(dev)].float()
        else:
            vectors = table.float_rows(part).to(dev)
        keep_best(best, arg, vectors @ q.T, local[start:stop], start)
    return best, arg


@torch.no_grad()
def rerank(table: RepTable, query: Tensor, images: np.ndarray, k: int) -> RowHits:
    """Exact top ``k`` of the candidate images (table positions) for one query ``[D]``;
    removed images among the candidates are dropped."""
    images = np.unique(images)
    images = images[~table.removed[images]]
    rows = table.rows_of(images)
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    vectors = table.float_rows(rows)
    sims = vectors @ query.float().cpu().unsqueeze(1)
    local = torch.from_numpy(np.searchsorted(images, table.owner[rows]))
    best, arg = segment_best(sims, local, len(images))
    ((r, s),) = top_images(best, arg, table.image_ids[images], k)
    return rows[r], s


def first_per_image(rows: np.ndarray, scores: np.ndarray, owner: np.ndarray, k: int) -> RowHits:
    """Groups representatives (best first) by image: each image's first row, top ``k``.

    With exact scores and rows sorted best first, an image's first row is its max, so the
    first ``k`` distinct images are the exact top ``k`` whenever ``k`` distinct images occur.
    """
    valid = rows >= 0
    rows, scores = rows[valid], scores[valid]
    if not len(rows):
        return rows, scores
    _, first = np.unique(owner[rows], return_index=True)
    first = np.sort(first)[:k]
    return rows[first], scores[first]
