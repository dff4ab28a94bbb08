"""Batched torch aggregators vs a per-image scikit-learn (or NumPy) loop, and vs the backbone.

Both sides cluster the same synthetic dense grids in one run, so the ratio is measured,
not assembled from separate runs. The torch side times the whole aggregator call
(labels and representatives) for the batch; the reference side times labels only, one
image at a time, which is how a scikit-learn pipeline would do it. ``agree`` is the mean
adjusted Rand index between the two partitions (1.0 = identical; k-means sides start
from different random seeds, so only close agreement is expected there).

The same run first times the real backbone, Dense-CLIP's ``encode_dense`` (random
weights, same compute), at the same resolution and reports each aggregator's time per
image as a share of the backbone's time per image (``% backbone``); the grids are shaped
like the backbone's dense output (RN50x64 at 448: 196 cells x 1024 dims). Goal: under 5%
for kmeans and AG-F on a GPU. The grids themselves are synthetic: a randomly initialised
backbone's cells are nearly parallel (cosine ~0.9999), which would make the
data-dependent methods (AG-T, k-means iterations, R.P.) unrepresentative.

    python bench/bench_aggregate.py --batch 32 --backbone RN50x64 --resolution 448
    python bench/bench_aggregate.py --no-backbone --grid 14 14 --dim 1024
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

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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


def time_backbone(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple:
    """Median ms per image of Dense-CLIP's ``encode_dense`` on random images, and its output.

    The backbone runs in ``dtype`` (weights and pixels) with random weights: the same
    compute as the pretrained model, nothing downloaded.
    """
    from retrieval.retrievers.dense_clip import DenseClipRetriever

    retriever = DenseClipRetriever(args.backbone, pretrained=None, resolution=args.resolution)
    retriever = retriever.to(device=device, dtype=dtype).eval()
    side = retriever.resolution
    generator = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(args.backbone_batch, 3, side, side, generator=generator).to(device, dtype)

    def forward():
        with torch.inference_mode():
            return retriever.encode_dense(pixels)

    ms, out = timed(forward, args.backbone_repeats, device)
    return ms / args.backbone_batch, side, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per aggregator call")
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="default: the backbone's dense grid (14 14 with --no-backbone)",
    )
    parser.add_argument(
        "--dim", type=int, default=None, help="default: the backbone's (1024 with --no-backbone)"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n-clusters", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument(
        "--padding", type=float, default=0.3, help="largest fraction of padded (invalid) cells"
    )
    parser.add_argument("--backbone", default="RN50x64", help="open_clip model (random weights)")
    parser.add_argument("--resolution", type=int, default=448, help="square input side")
    parser.add_argument(
        "--backbone-batch", type=int, default=None, help="images per backbone call (CPU: 2)"
    )
    parser.add_argument("--backbone-repeats", type=int, default=None, help="(CPU: 1)")
    parser.add_argument(
        "--no-backbone", action="store_true", help="skip the backbone (no %% backbone column)"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="backbone weights and aggregator input (aggregators cluster in float32 at least)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    args.backbone_batch = args.backbone_batch or (16 if on_gpu else 2)
    args.backbone_repeats = args.backbone_repeats or (args.repeats if on_gpu else 1)

    print(f"torch device={device} dtype={args.dtype} ({torch.get_num_threads()} CPU threads)")
    backbone_ms = None
    if not args.no_backbone:
        backbone_ms, side, out = time_backbone(args, device, dtype)
        shape = (tuple(out.grid), out.embeddings.shape[2])
        if (args.grid and tuple(args.grid) != shape[0]) or (args.dim and args.dim != shape[1]):
            parser.error(f"--grid / --dim must match the backbone's dense output {shape}")
        args.grid, args.dim = shape
        print(
            f"backbone {args.backbone} @ {side}px (random weights), Dense-CLIP encode_dense: "
            f"{backbone_ms:.1f} ms/image (batch {args.backbone_batch}, median of "
            f"{args.backbone_repeats} after a warm-up) -> {args.grid[0]}x{args.grid[1]} cells "
            f"x {args.dim} dims"
        )
    args.grid = tuple(args.grid or (14, 14))
    args.dim = args.dim or 1024

    x = synthetic_grids(args.batch, args.grid, args.dim, args.seed)
    n = x.shape[1]
    generator = torch.Generator().manual_seed(args.seed)
    padded = (torch.rand(args.batch, 1, generator=generator) * args.padding * n).long()
    mask = torch.arange(n) < n - padded  # letterbox padding: the last cells, raster order
    x_dev, mask_dev = x.to(device, dtype), mask.to(device)
    x_np, mask_np = x.numpy(), mask.numpy()

    print(
        f"aggregators: B={args.batch} grid={args.grid[0]}x{args.grid[1]} D={args.dim} "
        f"(synthetic grids), reference: scikit-learn / NumPy per image on CPU"
    )
    header = (
        f"{'method':<42}{'ms/img':>9}{'% backbone':>12}{'torch ms':>10}{'ref ms':>10}"
        f"{'ref/torch':>10}{'agree':>7}{'reps':>7}"
    )
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
        per_image = torch_ms / args.batch
        share = f"{100 * per_image / backbone_ms:.2f}%" if backbone_ms else "-"
        print(
            f"{row:<42}{per_image:>9.2f}{share:>12}{torch_ms:>10.1f}{ref_ms:>10.1f}"
            f"{ref_ms / torch_ms:>10.1f}{agree:>7.3f}{reps_per_image:>7.1f}"
        )
    if backbone_ms:
        print(
            "ms/img: aggregator time per image (torch ms / B); % backbone: that over the "
            "backbone's time per image. Goal: kmeans and AG-F under 5% on a GPU."
        )


if __name__ == "__main__":
    main()
