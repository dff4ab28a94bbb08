"""Cluster-CLIP and CLIP + Cluster-CLIP: Dense-CLIP's cells aggregated into a few representatives.

Dense-CLIP keeps one embedding per feature-map cell (196 for RN50x64 at 448), and most
neighbouring cells say the same thing. Cluster-CLIP partitions an image's cells and keeps
one representative per part, the normalised mean of its member cells, boxed by the
bounding box of their cells: 10 to 91 vectors per image instead of 196, at about
Dense-CLIP's accuracy (the paper's table). The clustering itself lives in
``retrieval.aggregate``; this module only wires it behind Dense-CLIP's features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.aggregate import Aggregator, create_aggregator, list_aggregators
from retrieval.errors import ConfigError, StoreError, did_you_mean
from retrieval.representatives import Representatives
from retrieval.retrievers.base import register_retriever
from retrieval.retrievers.clip import FULL_IMAGE_BOX
from retrieval.retrievers.dense_clip import DenseClipRetriever, DenseOutput
from retrieval.retrievers.dense_features import Grid
from retrieval.retrievers.vit_attention import DenseAttention

# The keys each method reads; any other key must stay null (see AggregateOptions).
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "kmeans": ("k", "iterations", "seed"),
    "agglomerative": ("n_clusters", "distance_threshold", "linkage", "connectivity"),
    "prune": ("tau",),
}
# The value the paper leaves out and only its representative count pins down.
CALIBRATED_KEY = {"agglomerative": "distance_threshold", "prune": "tau"}


@dataclass
class AggregateOptions:
    """How Cluster-CLIP aggregates an image's cells: the ``retriever.aggregate.*`` keys.

    One flat group, so a command line reads ``retriever.aggregate.method=kmeans
    retriever.aggregate.k=10``. A key left null takes its method's default (the
    aggregator's own); a key set for a method that does not read it is an error, since
    silently ignoring it would report a run that did not happen. Every check runs at
    construction, naming the key.

    Attributes:
        method: ``kmeans`` (the paper's K.M.), ``agglomerative`` (AG-F with
            ``n_clusters``, AG-T with ``distance_threshold``), ``prune`` (our reading of
            R.P.), or ``none`` (every cell is a representative: Dense-CLIP).
        k: kmeans: clusters per image (default 10, the K.M. row).
        iterations: kmeans: maximum Lloyd iterations (default 30).
        seed: kmeans: seed of the k-means++ initialisation (default 0).
        n_clusters: agglomerative: clusters per image (AG-F: 50).
        distance_threshold: agglomerative: stop merging at this linkage distance
            (``1 - cos`` for average / complete / single linkage; AG-T).
        linkage: agglomerative: ``average`` (default), ``complete``, ``single``, ``ward``.
        connectivity: agglomerative: merge only grid-adjacent clusters (default false).
        tau: prune: cosine above which a cell joins a kept representative (default 0.9).
        options: the keyword arguments of an aggregator registered by a plugin (any
            ``method`` beyond the four above), e.g. ``retriever.aggregate.options={cells: 2}``.
    """

    method: str = "kmeans"
    k: int | None = None
    iterations: int | None = None
    seed: int | None = None
    n_clusters: int | None = None
    distance_threshold: float | None = None
    linkage: str | None = None
    connectivity: bool | None = None
    tau: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.build()

    @classmethod
    def coerce(cls, value: AggregateOptions | Mapping[str, Any]) -> AggregateOptions:
        """A fresh copy of the options, or options from a mapping (a config section arrives
        as a dict); never the caller's object, so the shared default stays untouched."""
        if isinstance(value, cls):
            return dataclasses.replace(value)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"retriever.aggregate must be AggregateOptions or a mapping, got "
                f"{type(value).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in value if key not in known]
        if unknown:
            raise ConfigError(
                f"retriever.aggregate.{unknown[0]} is not an option; valid: {', '.join(known)}"
            )
        return cls(**value)

    def aggregator_options(self) -> dict[str, Any]:
        """The keyword arguments of ``create_aggregator(method, ...)``: the set keys (a
        plugin's: ``options``)."""
        if self.method not in METHOD_KEYS:
            return dict(self.options)
        keys = METHOD_KEYS[self.method]
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}

    def build(self) -> Aggregator:
        """The aggregator these options describe; raises ValueError naming a bad key."""
        registered = list_aggregators()
        if self.method not in registered:
            raise ConfigError(
                f"retriever.aggregate.method={self.method!r} is not one of "
                f"{', '.join(registered)}.{did_you_mean(self.method, registered)}"
            )
        if self.method in METHOD_KEYS and self.options:
            raise ConfigError(
                f"retriever.aggregate.options applies to plugin aggregators only; "
                f"method={self.method} reads the flat keys ({', '.join(METHOD_KEYS[self.method])})"
            )
        used = METHOD_KEYS.get(self.method, ())
        for method, keys in METHOD_KEYS.items():
            for key in keys:
                value = getattr(self, key)
                if key not in used and value is not None:
                    raise ConfigError(
                        f"retriever.aggregate.{key}={value!r} applies to method={method} only, "
                        f"not method={self.method} (which reads: {', '.join(used) or 'nothing'})."
                        f" Set retriever.aggregate.{key}=null, or swap the whole group "
                        f"(retriever=cluster_clip_..._rn50x64)."
                    )
        if self.method == "agglomerative" and (self.n_clusters is None) == (
            self.distance_threshold is None
        ):
            raise ConfigError(
                "method=agglomerative needs exactly one of retriever.aggregate.n_clusters "
                "(AG-F, the paper's 50) or retriever.aggregate.distance_threshold (AG-T), got "
                f"n_clusters={self.n_clusters}, distance_threshold={self.distance_threshold}"
            )
        try:
            return create_aggregator(self.method, **self.aggregator_options())
        except ValueError as err:
            raise ConfigError(f"retriever.aggregate: {err}") from None


DEFAULT_AGGREGATE = AggregateOptions()


def append_global(reps: Representatives, global_embedding: Tensor) -> Representatives:
    """The "CLIP + X" step: the global embedding as one more valid representative (whole box).

    It goes after the padded column block, so every image's clusters keep their index.
    Its ``members`` row (when kept) is empty: it is no mean of cells.
    """
    batch = reps.batch_size
    embeddings = torch.cat([reps.embeddings, global_embedding.unsqueeze(1)], dim=1)
    mask = torch.cat([reps.mask, reps.mask.new_ones(batch, 1)], dim=1)
    boxes = None
    if reps.boxes is not None:
        whole = reps.boxes.new_tensor(FULL_IMAGE_BOX).expand(batch, 1, 4)
        boxes = torch.cat([reps.boxes, whole], dim=1)
    extras = None
    if reps.extras is not None:
        extras = {
            key: torch.cat([value, value.new_zeros(batch, 1, *value.shape[2:])], dim=1)
            for key, value in reps.extras.items()
        }
    return Representatives(embeddings, mask, boxes, extras)


@register_retriever("cluster_clip")
class ClusterClipRetriever(DenseClipRetriever):
    """Cluster-CLIP: Dense-CLIP cells aggregated per image (+ the global one: CLIP + Cluster-CLIP).

    Each representative is the L2-normalised mean of its member cells' Dense-CLIP
    embeddings, with the bounding box of those cells as its box. The paper's rows
    (RN50x64 at 448, 196 cells): K.M. = ``kmeans`` with ``k=10``; AG-T =
    ``agglomerative`` with a ``distance_threshold`` (about 10 per image); AG-F =
    ``agglomerative`` with ``n_clusters=50``; R.P. = ``prune`` (about 91 per image).

    Args:
        backbone, pretrained, resolution, cache_dir, positional, with_global,
            global_pass, dense_attention: as ``dense_clip`` (the features being
            clustered, and the appended global embedding). The aggregators only see
            cell embeddings, so every backbone and attention variant clusters alike.
        aggregate: the aggregation (:class:`AggregateOptions`, or a mapping of its keys).
        keep_members: also store ``extras["members"]``, the ``[B, R, N]`` bool mask of
            each representative's cells (the global one has none), for visualising
            clusters. Costs ``R x N`` bytes per image (``R`` padded to the batch's largest
            count), ``N / 2D`` of the fp16 embeddings (RN50x64: 196 / 2048, about +10%);
            off by default because scoring never reads it.
    """

    def __init__(
        self,
        backbone: str = "RN50",
        pretrained: str | None = "openai",
        resolution: int | None = None,
        cache_dir: str | None = None,
        positional: bool = False,
        with_global: bool = False,
        global_pass: str = "same",
        aggregate: AggregateOptions = DEFAULT_AGGREGATE,
        keep_members: bool = False,
        dense_attention: DenseAttention = "maskclip",
    ) -> None:
        options = AggregateOptions.coerce(aggregate)  # fail before the slow model load
        aggregator = options.build()
        super().__init__(
            backbone,
            pretrained,
            resolution,
            cache_dir,
            positional,
            with_global,
            global_pass,
            dense_attention,
        )
        self.aggregate = options
        self.aggregator = aggregator
        self.keep_members = keep_members
        self.config.update(
            aggregate=dataclasses.asdict(options),
            # report.compare reads the method under "aggregator"; the options in force
            # (defaults filled) make a changed default re-embed instead of reusing shards.
            aggregator=options.method,
            aggregator_options=dict(vars(aggregator)),
            keep_members=keep_members,
        )

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Representatives:
        return self.aggregate_dense(self.encode_dense(pixels))

    def aggregate_dense(self, out: DenseOutput) -> Representatives:
        """Dense-CLIP output -> this retriever's representatives (no backbone involved)."""
        reps = self.aggregator(out.embeddings, out.mask, out.grid, out.boxes)
        if reps.boxes is None:
            raise TypeError(f"{self.aggregator!r} returned representatives without boxes")
        members = None
        if self.keep_members:
            if reps.extras is None:
                raise TypeError(f"{self.aggregator!r} returned representatives without extras")
            members = reps.extras["members"]
        reps = Representatives(
            reps.embeddings,
            reps.mask,
            reps.boxes.contiguous(),
            None if members is None else {"members": members},
        )
        if out.global_embedding is not None:
            reps = append_global(reps, out.global_embedding)
        return reps

    def from_dense(self, stored: Representatives, dense_config: dict[str, Any]) -> Representatives:
        """Re-aggregates a ``dense_clip`` run's stored representatives (cells in raster
        order, then the global one when that run had ``with_global``)."""
        if stored.boxes is None:
            raise StoreError("stored Dense-CLIP shards have no cell boxes")
        cells = stored.embeddings.shape[1] - int(bool(dense_config.get("with_global")))
        boxes = stored.boxes[0, :cells].float()
        grid = (len(torch.unique(boxes[:, 1])), len(torch.unique(boxes[:, 0])))
        global_embedding = None
        if self.with_global:
            global_embedding = F.normalize(stored.embeddings[:, cells].float(), dim=-1)
        out = DenseOutput(
            F.normalize(stored.embeddings[:, :cells].float(), dim=-1),
            stored.mask[:, :cells],
            grid,
            boxes,
            global_embedding,
        )
        return self.aggregate_dense(out)


def calibrate(
    embeddings: Tensor,
    mask: Tensor | None,
    grid: Grid,
    options: AggregateOptions,
    target: float,
    bounds: tuple[float, float],
    steps: int = 30,
) -> tuple[AggregateOptions, float]:
    """Bisects AG-T's ``distance_threshold`` or R.P.'s ``tau`` to a mean count per image.

    The paper gives the counts (about 10 for AG-T, 91 for R.P. on RN50x64 at 448), not
    the values, so they are found on real features: pass ``encode_dense`` embeddings of
    a sample of the dataset. The count is monotone in the value (falling with the
    threshold, rising with ``tau``); the direction is read off the bounds.

    Args:
        embeddings: ``[B, N, D]`` L2-normalised dense embeddings.
        mask: ``[B, N]`` valid cells, or None for all.
        grid: ``(h, w)`` of the cells.
        options: ``agglomerative`` with a ``distance_threshold`` (any value), or ``prune``.
        target: wanted mean number of representatives per image.
        bounds: ``(low, high)`` interval searched.
        steps: bisection steps.

    Returns:
        The options with the calibrated value, and the mean count they give.
    """
    key = CALIBRATED_KEY.get(options.method)
    if key is None or (options.method == "agglomerative" and options.n_clusters is not None):
        raise ConfigError(
            "calibrate tunes agglomerative distance_threshold (AG-T) or prune tau (R.P.), "
            f"got {options}"
        )

    def calibrated(value: float) -> AggregateOptions:
        changes: dict[str, Any] = {key: value}
        return dataclasses.replace(options, **changes)

    def mean_count(value: float) -> float:
        aggregator = calibrated(value).build()
        return float(aggregator(embeddings, mask, grid).counts.double().mean())

    low, high = bounds
    rising = mean_count(high) > mean_count(low)
    for _ in range(steps):
        middle = (low + high) / 2
        if (mean_count(middle) < target) == rising:
            low = middle
        else:
            high = middle
    value = (low + high) / 2
    return calibrated(value), mean_count(value)
