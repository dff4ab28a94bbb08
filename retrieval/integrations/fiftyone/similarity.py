"""A FiftyOne Brain similarity backend over an index of this project.

``dataset.sort_by_similarity("a stroller", k=50, brain_key=...)`` encodes the prompt
with the index's own text encoder (the run's retriever and prompt ensemble, as
``retrieval search`` does), asks the index for the top ``k`` images by their best
representative, and returns them in that order with only the matched representative
shown: the same images and order as ``retrieval search INDEX "a stroller" --top 50``.
In a patches view of the representatives, the matched patches come in that order.

The index follows its run, not FiftyOne: images are added and removed with
``retrieval embed`` + ``retrieval index update`` and another ``retrieval export``, so
``add_to_index`` and ``remove_from_index`` refuse raw vectors (a vector the run's
retriever did not make would be searched beside the run's, and the next index update
would drop it), saying so. ``reload()`` follows an update of the index folder.

Registered by passing :class:`RetrievalSimilarityConfig` as ``backend=`` (what
:func:`retrieval.integrations.fiftyone.register_index` does); FiftyOne stores the class
path with the brain run, so the App and later sessions load it from this package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from bson import ObjectId
from fiftyone.brain.similarity import Similarity, SimilarityConfig, SimilarityIndex

from retrieval.errors import ConfigError
from retrieval.index import open_index
from retrieval.index.search import SearchIndex
from retrieval.integrations.fiftyone.dataset import ID_FIELD, REPS_FIELD

UPDATE = (
    "this index follows its run: add or remove images with `retrieval embed` + "
    "`retrieval index update INDEX`, then `retrieval export RUN --format fiftyone "
    "--name NAME --index INDEX`"
)


class RetrievalSimilarityConfig(SimilarityConfig):
    """A brain run over a ``retrieval index build`` folder.

    Args:
        index: the index folder.
        device: where the text encoder and exact scoring run (``auto``, ``cpu``, ``cuda``).
        patches_field: the field of the representatives' boxes (``representatives``).
        **kwargs: :class:`SimilarityConfig`'s (prompts are always supported).
    """

    def __init__(
        self, index: str, device: str = "auto", patches_field: str = REPS_FIELD, **kwargs: Any
    ) -> None:
        kwargs.pop("supports_prompts", None)
        super().__init__(patches_field=patches_field, supports_prompts=True, **kwargs)
        self.index = index
        self.device = device

    @property
    def method(self) -> str:
        return "retrieval"

    @property
    def max_k(self) -> None:
        return None

    @property
    def supports_least_similarity(self) -> bool:
        return False

    @property
    def supported_aggregations(self) -> tuple[str, ...]:
        return ("mean",)


class RetrievalSimilarity(Similarity):
    """The brain method :class:`RetrievalSimilarityConfig` builds (FiftyOne finds it by
    the config's class name less ``Config``)."""

    def ensure_requirements(self) -> None:
        """Nothing to install: the index and its retriever are this package's."""

    def ensure_usage_requirements(self) -> None:
        """Nothing to install."""

    def initialize(self, samples: Any, brain_key: str) -> RetrievalSimilarityIndex:
        return RetrievalSimilarityIndex(samples, self.config, brain_key, backend=self)


class _PromptEncoder:
    """What FiftyOne asks ``get_model()`` for to embed prompts: the index's own encoder."""

    def __init__(self, index: SearchIndex) -> None:
        self.index = index

    def __enter__(self) -> _PromptEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        return self.index.embed(list(prompts)).numpy().astype(np.float32)


class _Labels:
    """The dataset's representatives: (image id, rep_index) -> (sample id, label id)."""

    def __init__(self, dataset: Any, field: str) -> None:
        self.of: dict[tuple[int, int], tuple[str, str]] = {}
        self.key_of: dict[str, tuple[int, int]] = {}  # label id -> (image id, rep_index)
        self.image_of_sample: dict[str, int] = {}
        self.sample_ids: list[str] = []
        self.label_ids: list[str] = []
        columns = (
            dataset.values(ID_FIELD),
            dataset.values("id"),
            dataset.values(f"{field}.detections.rep_index"),
            dataset.values(f"{field}.detections.id"),
        )
        for image_id, sample_id, slots, labels in zip(*columns, strict=True):
            self.image_of_sample[sample_id] = image_id
            for slot, label in zip(slots or [], labels or [], strict=True):
                self.of[(image_id, slot)] = (sample_id, label)
                self.key_of[label] = (image_id, slot)
                self.sample_ids.append(sample_id)
                self.label_ids.append(label)


class RetrievalSimilarityIndex(SimilarityIndex):
    """A brain run's view of the index: prompts and vectors in, images by best region out."""

    def __init__(
        self, samples: Any, config: RetrievalSimilarityConfig, brain_key: str, backend=None
    ):
        self._index = open_index(config.index, config.device)
        self._labels: _Labels | None = None
        super().__init__(samples, config, brain_key, backend=backend)

    @property
    def labels(self) -> _Labels:
        if self._labels is None:
            self._labels = _Labels(self._samples._root_dataset, self.config.patches_field)
        return self._labels

    @property
    def is_external(self) -> bool:
        return True

    @property
    def total_index_size(self) -> int:
        return len(self.labels.label_ids)

    @property
    def sample_ids(self) -> np.ndarray:
        return np.array(self.labels.sample_ids)

    @property
    def label_ids(self) -> np.ndarray:
        return np.array(self.labels.label_ids)

    @property
    def supports_prompts(self) -> bool:
        """Always: prompts go through the index's own text encoder."""
        return True

    def get_model(self) -> _PromptEncoder:
        return _PromptEncoder(self._index)

    def reload(self) -> None:
        """Follows ``retrieval index update`` and a re-export (labels re-read)."""
        self._index.refresh()
        self._labels = None
        super().reload()

    def cleanup(self) -> None:
        """Deleting the brain run leaves the index folder alone: it belongs to its run."""

    def add_to_index(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"add_to_index is not supported: {UPDATE}")

    def remove_from_index(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"remove_from_index is not supported: {UPDATE}")

    def get_embeddings(
        self,
        sample_ids: Any = None,
        label_ids: Any = None,
        allow_missing: bool = True,
        warn_missing: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The representatives' vectors (float32, from the index's table) of ``label_ids``,
        or of every representative of ``sample_ids``, or of all when neither is given."""
        labels = self.labels
        if label_ids is not None:
            wanted = [label_ids] if isinstance(label_ids, str) else list(label_ids)
        elif sample_ids is not None:
            samples = {sample_ids} if isinstance(sample_ids, str) else set(sample_ids)
            wanted = [
                lab
                for s, lab in zip(labels.sample_ids, labels.label_ids, strict=True)
                if s in samples
            ]
        else:
            wanted = list(labels.label_ids)
        found = [lab for lab in wanted if lab in labels.key_of]
        if len(found) < len(wanted) and not allow_missing:
            missing = next(lab for lab in wanted if lab not in labels.key_of)
            raise ValueError(f"label id {missing} is not a representative in this index")
        table = self._index.backend.require_table()
        vectors = np.zeros((len(found), self._index.embed_dim), np.float32)
        for k, label in enumerate(found):
            vectors[k] = _vector(table, *labels.key_of[label])
        owners = [labels.of[labels.key_of[label]][0] for label in found]
        return vectors, np.array(owners), np.array(found)

    def _kneighbors(
        self,
        query: Any = None,
        k: int | None = None,
        reverse: bool = False,
        aggregation: str | None = None,
        return_dists: bool = False,
    ) -> tuple[Any, ...]:
        """Top ``k`` images (all when None) of each query, each as its best representative
        (sample id, label id, cosine distance ``1 - score``), best first."""
        if query is None:
            raise ValueError("full-index neighbours are not supported: pass a query")
        if reverse:
            raise ValueError("least-similarity sorting is not supported by this index")
        if aggregation not in (None, "mean"):
            raise ValueError(f"aggregation {aggregation!r} is not supported (only 'mean')")
        vectors = self._query_vectors(query)
        if aggregation == "mean" and vectors.ndim == 2:
            vectors = vectors.mean(axis=0)
        single = vectors.ndim == 1
        vectors = vectors.reshape(-1, vectors.shape[-1])
        labels = self.labels
        index_ids = self._index.backend.require_table().live_image_ids
        if self.has_view:
            sample_ids = set(self.current_sample_ids)
            allowed = [i for s, i in labels.image_of_sample.items() if s in sample_ids]
        else:
            allowed = list(labels.image_of_sample.values())
        restrict = None if set(index_ids.tolist()) <= set(allowed) else np.array(allowed)
        top = self._index.capped_top(k or self._index.num_images)
        found = self._index.backend.search(vectors, top, restrict)
        sample_out: list[Any] = []
        label_out: list[Any] = []
        dists: list[Any] = []
        for hits in found:
            pairs = [(labels.of.get((h.image_id, h.rep_index)), h.score) for h in hits]
            kept = [(pair, score) for pair, score in pairs if pair is not None]
            sample_out.append([pair[0] for pair, _ in kept])
            label_out.append([pair[1] for pair, _ in kept])
            dists.append([1.0 - score for _, score in kept])
        if single:
            sample_out, label_out, dists = sample_out[0], label_out[0], dists[0]
        return (sample_out, label_out, dists) if return_dists else (sample_out, label_out)

    def _query_vectors(self, query: Any) -> np.ndarray:
        """Vectors as given, or the representatives' vectors of label ids (a region query);
        a sample id is refused (an image is many vectors: query one of its regions)."""
        if isinstance(query, np.ndarray) and np.issubdtype(query.dtype, np.number):
            return query.astype(np.float32)
        ids = [query] if isinstance(query, str) else list(query)
        if ids and all(ObjectId.is_valid(str(i)) for i in ids):
            if any(i in self.labels.image_of_sample for i in ids):
                raise ValueError(
                    "querying by a sample id is not supported: an image is several "
                    "representatives; query by one of its representatives' label ids"
                )
            vectors, _, found = self.get_embeddings(label_ids=ids)
            if not len(found):
                raise ValueError(f"query ids {ids} are not representatives in this index")
            return vectors[0] if isinstance(query, str) else vectors
        return np.asarray(query, dtype=np.float32)

    @classmethod
    def _from_dict(
        cls, d: Any, samples: Any, config: Any, brain_key: str
    ) -> RetrievalSimilarityIndex:
        return cls(samples, config, brain_key)


def _vector(table: Any, image_id: int, slot: int) -> np.ndarray:
    """The table's vector (float32) of a live image's representative ``slot``."""
    position = int(np.flatnonzero((table.image_ids == image_id) & ~table.removed)[0])
    rows = np.arange(table.offsets[position], table.offsets[position + 1])
    return np.asarray(table.vectors[rows[table.slots[rows] == slot][0]], dtype=np.float32)
