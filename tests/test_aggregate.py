"""Aggregators against independent references (scikit-learn, a NumPy loop) and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.feature_extraction.image import grid_to_graph
from sklearn.metrics import adjusted_rand_score

from retrieval.aggregate import (
    create_aggregator,
    grid_cell_boxes,
    kmeans_labels,
    list_aggregators,
    prune_labels,
)
from retrieval.aggregate.agglomerative import LINKAGES
from retrieval.errors import ConfigError
from retrieval.representatives import Representatives
from retrieval.retrievers.base import argmax_representative, max_cosine

GRID = (5, 6)
N = GRID[0] * GRID[1]

VARIANTS = [
    ("none", {}),
    ("kmeans", {"k": 5}),
    ("agglomerative", {"n_clusters": 6}),
    ("agglomerative", {"distance_threshold": 0.9}),
    ("agglomerative", {"n_clusters": 6, "linkage": "ward", "connectivity": True}),
    ("agglomerative", {"distance_threshold": 0.5, "linkage": "single", "connectivity": True}),
    ("prune", {"tau": 0.3}),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs this module on one torch thread: its tensors are tiny, and on a busy machine
    each small reduction with indices or matmul waits ~15 ms for the thread pool to wake.
    Clustering results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_embeddings(b: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, N, d, generator=generator, dtype=torch.float64), dim=2)


def random_masks(b: int, seed: int = 0) -> torch.Tensor:
    """Random masks, one image fully valid and one with a single valid cell."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, N, generator=generator) > 0.3
    mask[0] = True
    mask[-1] = False
    mask[-1, 5] = True
    return mask


def prefix_masks(counts: list[int]) -> torch.Tensor:
    """Masks keeping the first cells in raster order: their 4-neighbour graph is connected."""
    return torch.arange(N).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabels clusters by first appearance, so equal partitions give equal arrays."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def partition(reps: Representatives, image: int) -> np.ndarray:
    """Cluster index of each valid cell of one image, read from the member masks."""
    members = reps.extras["members"][image].numpy()
    valid = members.any(axis=0)
    return canonical(members.argmax(axis=0)[valid])


@pytest.mark.parametrize("linkage", ["average", "complete", "single", "ward"])
@pytest.mark.parametrize("connectivity", [False, True])
def test_agglomerative_n_clusters_matches_sklearn(linkage: str, connectivity: bool) -> None:
    """Same partition as sklearn AgglomerativeClustering (cosine; ward: euclidean on the
    normalised vectors; 4-neighbour grid_to_graph connectivity), per image of a batch."""
    x = random_embeddings(4, seed=1)
    mask = prefix_masks([N, 20, 11, 3]) if connectivity else random_masks(4, seed=1)
    reps = create_aggregator(
        "agglomerative", n_clusters=5, linkage=linkage, connectivity=connectivity
    )(x, mask, GRID)
    graph = grid_to_graph(*GRID).tocsr()
    for image in range(4):
        valid = mask[image].numpy()
        if valid.sum() < 2:  # sklearn refuses a single sample
            assert np.array_equal(partition(reps, image), [0])
            continue
        expected = AgglomerativeClustering(
            n_clusters=min(5, int(valid.sum())),
            metric="euclidean" if linkage == "ward" else "cosine",
            linkage=linkage,
            connectivity=graph[valid][:, valid] if connectivity else None,
        ).fit_predict(x[image, valid].numpy())
        assert np.array_equal(partition(reps, image), canonical(expected))


@pytest.mark.parametrize(
    ("linkage", "threshold"), [("average", 0.8), ("complete", 1.2), ("single", 0.3), ("ward", 1.0)]
)
@pytest.mark.parametrize("connectivity", [False, True])
def test_agglomerative_threshold_matches_sklearn(
    linkage: str, threshold: float, connectivity: bool
) -> None:
    """distance_threshold mode cuts the tree like sklearn (clusters = merges >= t + 1)."""
    x = random_embeddings(3, seed=2)
    mask = prefix_masks([N, 17, 7]) if connectivity else random_masks(3, seed=2)
    reps = create_aggregator(
        "agglomerative",
        distance_threshold=threshold,
        linkage=linkage,
        connectivity=connectivity,
    )(x, mask, GRID)
    graph = grid_to_graph(*GRID).tocsr()
    counts = []
    for image in range(3):
        valid = mask[image].numpy()
        if valid.sum() < 2:  # sklearn refuses a single sample
            assert np.array_equal(partition(reps, image), [0])
            continue
        expected = AgglomerativeClustering(
            n_clusters=None,
            distance_threshold=threshold,
            metric="euclidean" if linkage == "ward" else "cosine",
            linkage=linkage,
            connectivity=graph[valid][:, valid] if connectivity else None,
        ).fit_predict(x[image, valid].numpy())
        assert np.array_equal(partition(reps, image), canonical(expected))
        counts.append(len(set(expected)))
    assert 1 < max(counts) < N  # the threshold really cuts the tree


def scattered_objects(b: int, seed: int, objects: int = 4) -> tuple:
    """Well-separated blobs scattered over the grid: cells drawn around ``objects``
    far-apart directions, every object owning one of the first ``objects`` cells.

    Returns ``[B, N, 16]`` embeddings and the ``[B, N]`` object of each cell.
    """
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(
        torch.randn(b, objects, 16, generator=generator, dtype=torch.float64), dim=2
    )
    owner = torch.randint(0, objects, (b, N), generator=generator)
    owner[:, :objects] = torch.arange(objects)
    noise = 0.05 * torch.randn(b, N, 16, generator=generator, dtype=torch.float64)
    x = centers.gather(1, owner.unsqueeze(2).expand(-1, -1, 16)) + noise
    return F.normalize(x, dim=2), owner


def separated_clusters(b: int, k: int, seed: int) -> torch.Tensor:
    """Cells drawn around k far-apart directions: every sensible clustering agrees."""
    return scattered_objects(b, seed, k)[0]


def spatial_objects(b: int, seed: int, objects: int = 3, regions: int = 6) -> tuple:
    """Cells with spatial structure: the grid's Voronoi regions around ``regions`` random
    sites, region ``r`` showing object ``r % objects`` (a far-apart direction) plus noise,
    so one object can cover several regions that do not touch.

    Returns ``[B, N, 16]`` embeddings and the ``[B, N]`` object shown by each cell.
    """
    generator = torch.Generator().manual_seed(seed)
    h, w = GRID
    centers = F.normalize(
        torch.randn(b, objects, 16, generator=generator, dtype=torch.float64), dim=2
    )
    sites = torch.rand(b, regions, 2, generator=generator, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).double() + 0.5
    region = torch.cdist(cells.expand(b, -1, -1), sites * torch.tensor([h, w])).argmin(dim=2)
    owner = region.remainder(objects)
    noise = 0.05 * torch.randn(b, N, 16, generator=generator, dtype=torch.float64)
    x = centers.gather(1, owner.unsqueeze(2).expand(-1, -1, 16)) + noise
    return F.normalize(x, dim=2), owner


CLUSTERED = {"blobs": (scattered_objects, 4), "spatial": (spatial_objects, 3)}
# Linkage distances (1 - cos; ward: euclidean) in the gap between the merges inside an
# object and those across objects of this data (the test checks that the cut finds the
# objects), and well inside the objects' own merges.
GAP_THRESHOLD = {"average": 0.2, "complete": 0.2, "single": 0.2, "ward": 0.7}
INSIDE_THRESHOLD = {"average": 0.03, "complete": 0.04, "single": 0.02, "ward": 0.25}


def object_parts(owner: np.ndarray, valid: np.ndarray, connectivity: bool) -> np.ndarray:
    """The partition a gap cut must find: cells by object, and with ``connectivity`` split
    into the 4-neighbour-connected parts of each object (canonical, valid cells only)."""
    if not connectivity:
        return canonical(owner[valid])
    graph = grid_to_graph(*GRID).tocsr()[valid][:, valid].tocoo()
    same = owner[valid][graph.row] == owner[valid][graph.col]
    graph.data = same.astype(np.int8)
    graph.eliminate_zeros()
    return canonical(connected_components(graph, directed=False)[1])


@pytest.mark.parametrize("data", sorted(CLUSTERED))
@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("mode", ["n_clusters", "distance_threshold"])
def test_agglomerative_matches_sklearn_on_clustered_data(
    mode: str, linkage: str, data: str
) -> None:
    """Invariant: on clustered data (well-separated blobs scattered over the grid, and
    objects covering spatial regions of the grid) every image's partition equals sklearn
    AgglomerativeClustering's with the same linkage, metric and cluster count or
    threshold, with and without the grid connectivity; a threshold in the gap between
    within- and across-object merges recovers exactly the objects (with connectivity:
    each object's connected parts)."""
    make, objects = CLUSTERED[data]
    x, owner = make(3, seed=13)
    graph = grid_to_graph(*GRID).tocsr()
    if mode == "n_clusters":
        values = [objects, objects + 3]
    else:
        values = [GAP_THRESHOLD[linkage], INSIDE_THRESHOLD[linkage]]
    for connectivity in (False, True):
        mask = prefix_masks([N, 21, 12]) if connectivity else random_masks(3, seed=13)
        if not connectivity:
            mask[:, :objects] = True
        for value in values:
            options = (
                {"n_clusters": value}
                if mode == "n_clusters"
                else {"n_clusters": None, "distance_threshold": value}
            )
            reps = create_aggregator(
                "agglomerative", linkage=linkage, connectivity=connectivity, **options
            )(x, mask, GRID)
            for image in range(3):
                valid = mask[image].numpy()
                if mode == "n_clusters":
                    options["n_clusters"] = min(value, int(valid.sum()))
                expected = AgglomerativeClustering(
                    metric="euclidean" if linkage == "ward" else "cosine",
                    linkage=linkage,
                    connectivity=graph[valid][:, valid] if connectivity else None,
                    **options,
                ).fit_predict(x[image, valid].numpy())
                got = partition(reps, image)
                assert np.array_equal(got, canonical(expected)), (connectivity, value, image)
                if mode == "distance_threshold" and value == GAP_THRESHOLD[linkage]:
                    parts = object_parts(owner[image].numpy(), valid, connectivity)
                    assert np.array_equal(got, parts), (connectivity, image)
            if mode == "distance_threshold" and value == INSIDE_THRESHOLD[linkage]:
                assert int(reps.counts[0]) > objects + 3  # the cut splits the objects


def test_kmeans_matches_sklearn_on_separated_clusters() -> None:
    """Same partition as sklearn KMeans (adjusted Rand index 1) on well-separated clusters."""
    x = separated_clusters(4, 4, seed=3)
    mask = random_masks(4, seed=3)
    mask[:, :4] = True
    reps = create_aggregator("kmeans", k=4, seed=0)(x, mask, GRID)
    for image in range(4):
        valid = mask[image].numpy()
        expected = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(
            x[image, valid].numpy()
        )
        assert adjusted_rand_score(expected, partition(reps, image)) == 1.0


def test_kmeans_from_the_same_centres_matches_sklearn_lloyd() -> None:
    """Invariant: started from the same initial centres, our spherical k-means and sklearn
    KMeans(init=centres, n_init=1, algorithm="lloyd") end in the same partition with the
    same numbering (cluster j grows from centre j), on unit vectors in separated clusters.

    Why they agree there and not in general: for a unit vector x, ``|x - c|^2 = 1 - 2 x.c
    + |c|^2``, so euclidean k-means assigns x to the largest ``x.c - |c|^2 / 2`` over its
    un-normalised centroids (means of unit vectors, shorter the more spread a cluster is)
    while spherical k-means takes the largest ``x.c / |c|``. From the same unit centres
    the first assignment is identical; afterwards the rules differ only for points whose
    best and second-best cosines are closer than the centroid norms differ. In separated
    clusters (cosine > 0.9 to the own centroid, about 0 to the others) no point is that
    close (a centre started between two clusters takes a few cells of the neighbour
    first, still by a wide margin), so every Lloyd step assigns alike, each centroid pair
    is parallel and both stop at the same partition. Overlapping clusters can end in
    different partitions.
    """
    k = 4
    x = separated_clusters(4, k, seed=21)
    mask = random_masks(4, seed=21)
    mask[:, :k] = True  # the first k cells show the k clusters
    generator = torch.Generator().manual_seed(21)
    centres = torch.empty(4, k, x.shape[2], dtype=x.dtype)
    for image in range(4):
        # A random cell of each cluster (not its centre), the clusters in a random order,
        # and centre 0 pulled towards centre 1's cluster, so it first takes cells there
        # that Lloyd has to hand back: the partition moves before it converges.
        order = torch.randperm(k, generator=generator)
        for j, cluster in enumerate(order.tolist()):
            cells = torch.nonzero(mask[image] & (cluster_of(x[image], k) == cluster))[:, 0]
            pick = cells[torch.randint(len(cells), (1,), generator=generator)]
            centres[image, j] = x[image, pick]
        centres[image, 0] = F.normalize(centres[image, 0] + 2.5 * centres[image, 1], dim=0)
    labels = kmeans_labels(x, mask, k, init=centres)
    first = torch.where(mask, (x @ centres.transpose(1, 2)).argmax(dim=2), -1)
    assert not torch.equal(first, labels)  # not settled by the first assignment
    for image in range(4):
        valid = mask[image].numpy()
        expected = KMeans(
            n_clusters=k, init=centres[image].numpy(), n_init=1, algorithm="lloyd", tol=0
        ).fit_predict(x[image, valid].numpy())
        assert np.array_equal(labels[image].numpy()[valid], expected)
        assert (labels[image].numpy()[~valid] == -1).all()
    shared = kmeans_labels(x[:1], mask[:1], k, init=centres[0])  # [k, D]: every image
    assert torch.equal(shared, labels[:1])
    with pytest.raises(ValueError, match="kmeans init"):
        kmeans_labels(x, mask, k + 1, init=centres)


def cluster_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster of each cell of ``separated_clusters`` data: the first k cells are one per
    cluster, and every cell is far closer to its own cluster's cell than to the others."""
    return (x @ x[:k].T).argmax(dim=1)


def test_kmeans_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same labels; the labels are a function of (data, seed)."""
    x = random_embeddings(3, seed=4)
    mask = random_masks(3, seed=4)
    first = kmeans_labels(x, mask, k=5, seed=7)
    assert torch.equal(first, kmeans_labels(x, mask, k=5, seed=7))
    assert torch.equal(first, kmeans_labels(x.float(), mask, k=5, seed=7))


def test_kmeans_with_fewer_distinct_cells_than_k() -> None:
    """An image with fewer (distinct) valid cells than k gets one cluster per distinct cell."""
    x = random_embeddings(3, seed=5)
    mask = torch.zeros(3, N, dtype=torch.bool)
    mask[0, [3, 10, 20]] = True
    mask[1, :8] = True
    x[1, :8] = x[1, 0]  # eight copies of one vector
    reps = create_aggregator("kmeans", k=5)(x, mask, GRID)
    assert reps.counts.tolist() == [3, 1, 0]


def prune_reference(x: np.ndarray, tau: float) -> np.ndarray:
    """Plain loop: keep a cell unless it is > tau similar to a kept seed, then join the best."""
    seeds: list[int] = []
    labels = np.empty(len(x), dtype=np.int64)
    for cell, vector in enumerate(x):
        similarity = [float(x[seed] @ vector) for seed in seeds]
        if similarity and max(similarity) > tau:
            labels[cell] = seeds[int(np.argmax(similarity))]
        else:
            seeds.append(cell)
            labels[cell] = cell
    return labels


@pytest.mark.parametrize("tau", [-0.5, 0.2, 0.6])
def test_prune_matches_numpy_loop(tau: float) -> None:
    """Same seeds and memberships as a plain NumPy loop over each image's valid cells."""
    x = random_embeddings(3, seed=6)
    mask = random_masks(3, seed=6)
    labels = prune_labels(x, mask, tau)
    for image in range(3):
        valid = mask[image].numpy()
        cells = np.flatnonzero(valid)
        expected = cells[prune_reference(x[image, valid].numpy(), tau)]
        got = labels[image].numpy()
        assert np.array_equal(got[valid], expected)
        assert (got[~valid] == -1).all()


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_representatives_invariants(name: str, options: dict) -> None:
    """Members partition the valid cells exactly once, invalid cells are never members,
    each representative is the normalised mean of its members and boxes its cells."""
    x = random_embeddings(4, seed=7)
    mask = random_masks(4, seed=7)
    reps = create_aggregator(name, **options)(x, mask, GRID)
    members = reps.extras["members"]
    assert torch.equal(members.sum(dim=1), mask.long())
    assert torch.equal(reps.mask, members.any(dim=2))
    means = F.normalize(members.double() @ x, dim=2)
    assert torch.allclose(reps.embeddings[reps.mask], means[reps.mask])
    cells = grid_cell_boxes(GRID, dtype=torch.float64)
    for image, rep in reps.mask.nonzero().tolist():
        boxes = cells[members[image, rep]]
        box = torch.cat([boxes[:, :2].amin(dim=0), boxes[:, 2:].amax(dim=0)])
        assert torch.allclose(reps.boxes[image, rep].double(), box)


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_batch_equals_per_image(name: str, options: dict) -> None:
    """Clustering an image alone or inside a batch gives the same representatives."""
    x = random_embeddings(3, seed=8)
    mask = random_masks(3, seed=8)
    aggregator = create_aggregator(name, **options)
    batch = aggregator(x, mask, GRID)
    for image in range(3):
        alone = aggregator(x[image : image + 1], mask[image : image + 1], GRID)
        r = int(alone.counts[0])
        assert int(batch.counts[image]) == r
        assert torch.equal(batch.extras["members"][image, :r], alone.extras["members"][0, :r])
        assert torch.allclose(batch.embeddings[image, :r], alone.embeddings[0, :r])
        assert torch.equal(batch.boxes[image, :r], alone.boxes[0, :r])


def test_none_returns_input_unchanged() -> None:
    """Dense-CLIP: the embeddings and mask come back as given, one cell per representative."""
    x = random_embeddings(2, seed=9)
    mask = random_masks(2, seed=9)
    reps = create_aggregator("none")(x, mask, GRID)
    assert reps.embeddings is x
    assert torch.equal(reps.mask, mask)
    assert torch.equal(reps.boxes[1], grid_cell_boxes(GRID))


def test_grid_cell_boxes_and_half_precision() -> None:
    """Cell boxes tile the unit square; fp16 input is clustered in fp32 and stays fp16."""
    boxes = grid_cell_boxes(GRID)
    assert boxes[0].tolist() == pytest.approx([0, 0, 1 / 6, 1 / 5])
    assert boxes[-1].tolist() == pytest.approx([5 / 6, 4 / 5, 1, 1])
    x = random_embeddings(2, seed=10)
    reps = create_aggregator("agglomerative", n_clusters=4)(x.half(), None, GRID)
    assert reps.embeddings.dtype == torch.float16
    assert reps.counts.tolist() == [4, 4]


def test_create_aggregator_errors_name_the_fix() -> None:
    """Bad names and options from a config end in a message that names what is accepted."""
    assert list_aggregators() == ["agglomerative", "kmeans", "none", "prune"]
    with pytest.raises(ConfigError, match="Did you mean 'kmeans'"):
        create_aggregator("kmean")
    with pytest.raises(ConfigError, match="Options: k, iterations, seed"):
        create_aggregator("kmeans", clusters=3)
    with pytest.raises(ValueError, match="exactly one of n_clusters"):
        create_aggregator("agglomerative")
    with pytest.raises(ValueError, match="exactly one of n_clusters"):
        create_aggregator("agglomerative", n_clusters=5, distance_threshold=0.5)
    with pytest.raises(ValueError, match="unknown linkage"):
        create_aggregator("agglomerative", n_clusters=5, linkage="centroid")
    with pytest.raises(ValueError, match="grid 6x7"):
        create_aggregator("prune")(random_embeddings(1), None, (6, 7))


FAMILIES = {
    "none": st.just({}),
    "kmeans": st.fixed_dictionaries(
        {"k": st.integers(1, 8), "iterations": st.integers(1, 6), "seed": st.integers(0, 9)}
    ),
    "agglomerative": st.tuples(
        st.one_of(
            st.fixed_dictionaries({"n_clusters": st.integers(1, 8)}),
            st.fixed_dictionaries({"distance_threshold": st.floats(0.0, 2.5)}),
        ),
        st.fixed_dictionaries(
            {"linkage": st.sampled_from(LINKAGES), "connectivity": st.booleans()}
        ),
    ).map(lambda parts: {**parts[0], **parts[1]}),
    "prune": st.fixed_dictionaries({"tau": st.floats(-1.0, 1.0)}),
}


@st.composite
def dense_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A random batch: 1-4 images on a 1x1 to 5x5 grid, 1-8 dims, float32 or float64,
    few distinct vectors (ties) or many, each image's mask all valid, all padding or mixed."""
    b, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n, d = h * w, draw(st.integers(1, 8))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    pool = F.normalize(torch.randn(b, n, d, generator=generator, dtype=torch.float64), dim=2)
    pick = torch.randint(0, draw(st.integers(1, n)), (b, n), generator=generator)
    x = pool.gather(1, pick.unsqueeze(2).expand(-1, -1, d)).to(dtype)
    image_mask = st.one_of(
        st.just([True] * n), st.just([False] * n), st.lists(st.booleans(), min_size=n, max_size=n)
    )
    mask = torch.tensor(draw(st.lists(image_mask, min_size=b, max_size=b)))
    return x, mask, (h, w)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@settings(max_examples=25, deadline=None, database=None)
@given(data=st.data())
def test_representatives_properties(name: str, data: st.DataObject) -> None:
    """Property, for any batch size, grid, mask, dimension and options of every aggregator:
    an image has at most as many representatives as valid cells (so <= N), every valid
    cell belongs to exactly one valid representative and padding cells to none, and
    padding never scores: with padded representatives set to the queries themselves
    (cosine 1, the highest possible), max_cosine still gives each image the max over its
    valid representatives, -inf when it has none, and argmax_representative a valid one."""
    x, mask, grid = data.draw(dense_batches(), label="batch")
    options = data.draw(FAMILIES[name], label="options")
    reps = create_aggregator(name, **options)(x, mask, grid)
    b, n, d = x.shape
    valid_cells = mask.sum(dim=1)

    assert reps.embeddings.shape[0] == b
    assert 1 <= reps.embeddings.shape[1] <= n
    assert bool((reps.counts <= valid_cells).all())
    if name == "none":
        assert torch.equal(reps.counts, valid_cells)
    if name == "kmeans":
        assert bool((reps.counts <= options["k"]).all())
    if name == "agglomerative" and options.get("n_clusters") and not options["connectivity"]:
        assert torch.equal(reps.counts, valid_cells.clamp(max=options["n_clusters"]))
    members = reps.extras["members"]
    assert torch.equal(members.sum(dim=1), mask.long())  # valid: exactly one; padding: none
    assert torch.equal(members.any(dim=2), reps.mask)  # valid representatives have members

    text = F.normalize(torch.randn(3, d, dtype=torch.float64), dim=1)
    slots = torch.arange(reps.embeddings.shape[1])
    bait = text[(torch.arange(b).unsqueeze(1) + slots) % 3]  # [B, R, D] queries themselves
    poisoned = torch.where(reps.mask.unsqueeze(2), reps.embeddings.double(), bait)
    poisoned_reps = Representatives(poisoned, reps.mask, reps.boxes)
    scores = max_cosine(text, poisoned_reps)
    best = argmax_representative(text, poisoned_reps)
    assert torch.equal(scores, max_cosine(text, reps))
    for image in range(b):
        valid = reps.mask[image]
        if not bool(valid.any()):
            assert bool((scores[:, image] == -torch.inf).all())
            continue
        expected = (poisoned[image, valid] @ text.T).amax(dim=0)
        assert torch.allclose(scores[:, image], expected, rtol=0, atol=1e-12)
        assert bool(valid[best[:, image]].all())
