"""Batched torch aggregators vs a per-image scikit-learn (or NumPy) loop, side by side.

Both sides cluster the same synthetic dense grids in one run, so the ratio is measured,
not assembled from separate runs. The torch side times the whole aggregator call
(labels and representatives) for the batch; the reference side times labels only, one
image at a time, which is how a scikit-learn pipeline would do it. ``agree`` is the mean
adjusted Rand index between the two partitions (1.0 = identical; k-means sides start
from different random seeds, so only close agreement is expected there).

    python bench/bench_aggregate.py --batch 32 --grid 14 14 --dim 1024
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.feature_extraction.image import grid_to_graph
from sklearn.metrics import adjusted_rand_score

from retrieval.aggregate import create_aggregator

Reference = Callable[[np.ndarray, np.ndarray], np.ndarray]


def synthetic_grids(batch: int, grid: tuple[int, int], dim: int, seed: int) -> torch.Tensor:
    """Dense grids of a few "objects" each: Voronoi regions of random cells plus noise."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    objects = 12
    centers = F.normalize(torch.randn(batch, objects, dim, generator=generator), dim=2)
    sites = torch.rand(batch, objects, 2, generator=generator) * torch.tensor([h, w])
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float() + 0.5
    owner = torch.cdist(cells.expand(batch, -1, -1), sites).argmin(dim=2)
    noise = torch.randn(batch, h * w, dim, generator=generator) / dim**0.5
    embeddings = centers.gather(1, owner.unsqueeze(2).expand(-1, -1, dim)) + 0.8 * noise
    return F.normalize(embeddings, dim=2)


def prune_loop(x: np.ndarray, tau: float) -> np.ndarray:
    """Greedy redundancy pruning of one image in plain NumPy (no scikit-learn equivalent)."""
    seeds: list[int] = []
    labels = np.empty(len(x), dtype=np.int64)
    for cell, vector in enumerate(x):
        similarity = x[seeds] @ vector if seeds else np.empty(0)
        if similarity.size and similarity.max() > tau:
            labels[cell] = seeds[int(similarity.argmax())]
        else:
            seeds.append(cell)
            labels[cell] = cell
    return labels


def methods(args: argparse.Namespace) -> list[tuple[str, dict, Reference]]:
    """(row name, aggregator options, per-image reference) for every benchmarked variant."""
    graph = grid_to_graph(*args.grid)

    def sklearn_agglomerative(linkage: str, connectivity: bool = False, **kw) -> Reference:
        metric = "euclidean" if linkage == "ward" else "cosine"

        def run(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
            conn = graph.tocsr()[valid][:, valid] if connectivity else None
            model = AgglomerativeClustering(metric=metric, linkage=linkage, connectivity=conn, **kw)
            return model.fit_predict(x)

        return run

    k, t, f = args.k, args.threshold, args.n_clusters
    return [
        (
            f"kmeans k={k}",
            {"name": "kmeans", "k": k},
            lambda x, _: KMeans(n_clusters=k, n_init=1, random_state=0).fit_predict(x),
        ),
        (
            f"agglomerative n_clusters={f} (AG-F)",
            {"name": "agglomerative", "n_clusters": f},
            sklearn_agglomerative("average", n_clusters=f),
        ),
        (
            f"agglomerative threshold={t} (AG-T)",
            {"name": "agglomerative", "distance_threshold": t},
            sklearn_agglomerative("average", n_clusters=None, distance_threshold=t),
        ),
        (
            f"agglomerative ward n_clusters={f} + grid",
            {"name": "agglomerative", "n_clusters": f, "linkage": "ward", "connectivity": True},
            sklearn_agglomerative("ward", connectivity=True, n_clusters=f),
        ),
        (
            f"prune tau={args.tau} (R.P.)",
            {"name": "prune", "tau": args.tau},
            lambda x, _: prune_loop(x, args.tau),
        ),
    ]


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time in ms over ``repeats`` runs after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=int, nargs=2, default=(14, 14), metavar=("H", "W"))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n-clusters", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument(
        "--padding", type=float, default=0.3, help="largest fraction of padded (invalid) cells"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.grid = tuple(args.grid)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = synthetic_grids(args.batch, args.grid, args.dim, args.seed)
    n = x.shape[1]
    generator = torch.Generator().manual_seed(args.seed)
    padded = (torch.rand(args.batch, 1, generator=generator) * args.padding * n).long()
    mask = torch.arange(n) < n - padded  # letterbox padding: the last cells, raster order
    x_dev, mask_dev = x.to(device), mask.to(device)
    x_np, mask_np = x.numpy(), mask.numpy()

    print(
        f"B={args.batch} grid={args.grid[0]}x{args.grid[1]} D={args.dim} "
        f"torch device={device} ({torch.get_num_threads()} CPU threads)"
    )
    header = f"{'method':<42}{'torch ms':>10}{'ref ms':>10}{'ref/torch':>10}{'agree':>7}{'reps':>7}"
    print(header)
    print("-" * len(header))
    for row, options, reference in methods(args):
        aggregator = create_aggregator(**options)
        torch_ms, reps = timed(
            lambda a=aggregator: a(x_dev, mask_dev, args.grid), args.repeats, device
        )
        members = reps.extras["members"].cpu().numpy()

        def loop(ref: Reference = reference) -> list[np.ndarray]:
            return [ref(x_np[i][mask_np[i]], mask_np[i]) for i in range(args.batch)]

        ref_ms, ref_labels = timed(loop, 1, torch.device("cpu"))
        agree = np.mean(
            [
                adjusted_rand_score(labels, members[i].argmax(axis=0)[mask_np[i]])
                for i, labels in enumerate(ref_labels)
            ]
        )
        reps_per_image = reps.counts.float().mean().item()
        print(
            f"{row:<42}{torch_ms:>10.1f}{ref_ms:>10.1f}{ref_ms / torch_ms:>10.1f}"
            f"{agree:>7.3f}{reps_per_image:>7.1f}"
        )


if __name__ == "__main__":
    main()
