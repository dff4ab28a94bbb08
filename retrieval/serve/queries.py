"""Query vectors beyond one text, and the batch function that answers them.

Every query becomes one unit vector ``q`` in the index's embedding space; an image's
score is then, as for a plain text query, the max cosine of ``q`` over its
representatives (so every backend answers it, exact or approximate):

- text ``t``: the run's prompt-ensembled text embedding (``SearchIndex.embed``);
- compound (``positive`` texts ``t_i`` with weights ``w_i``, ``negative`` texts ``n_j``,
  ``negative_weight`` λ): ``p = normalise(Σ_i w_i t_i)``, ``n = normalise(Σ_j n_j)``,
  ``q = normalise(p - λ n)`` (without negatives ``q = p``); see docs/serve.md;
- by example (``image_id``, ``rep_index``): the stored representative itself;
- by upload: not one vector but the picture's representatives ``Q`` as the run's
  retriever encodes it, answered by ``SearchIndex.search_multivector`` (MaxSim: the
  mean over ``q`` in ``Q`` of its max cosine over an image's representatives, so a
  picture finds itself first; :mod:`retrieval.index.multivector`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from retrieval.errors import RetrievalError
from retrieval.index import SearchIndex
from retrieval.index.base import Hit
from retrieval.index.compound import compound_vector
from retrieval.serve.errors import ApiError

NON_FINITE = (
    "the compound query's weighted sum is not a finite number (the weights overflow "
    "32-bit floats): give weights whose absolute values add up to less than 1e38, e.g. 1 "
    "and 0.5"
)


@dataclass
class Counters:
    """What the bench reads per index: model calls (text batches and image encodes),
    queries answered, and searches (one per batch and ``(top, where)`` group)."""

    model_calls: int = 0
    queries: int = 0
    searches: int = 0


@dataclass
class Job:
    """One request's query. ``texts`` are embedded with the batch's other texts and
    ``combine`` turns their ``[T, D]`` embeddings into the query vector ``[D]``; a job
    without texts brings its ``vector``. ``top=None`` asks for the vector alone."""

    texts: list[str] = field(default_factory=list)
    combine: Callable[[Tensor], Tensor] | None = None
    vector: Tensor | None = None
    top: int | None = None
    where: str | None = None


@dataclass
class Answer:
    vector: Tensor
    hits: list[Hit]


def first(embeddings: Tensor) -> Tensor:
    """A plain text query: its own embedding."""
    return embeddings[0]


def compound(
    positives: int, weights: list[float] | None = None, negative_weight: float | None = None
) -> Callable[[Tensor], Tensor]:
    """The combine function of a compound query whose texts are the ``positives``
    positive texts followed by the negative ones (the formula and its checks:
    :func:`retrieval.index.compound.compound_vector`, which the CLI uses too)."""

    def combine(embeddings: Tensor) -> Tensor:
        q = compound_vector(embeddings, positives, weights, negative_weight)
        if not bool(torch.isfinite(q).all()):
            raise ApiError(422, NON_FINITE)
        return q

    return combine


def answer_batch(index: SearchIndex, jobs: list[Job], counters: Counters) -> list[object]:
    """Answers a batch: all its texts in one ``index.embed`` call, then one
    ``search_vectors`` call per ``(top, where)`` group. A job's error (a query that
    cancels out or overflows, a filter that fails) is its result (its group's, for a
    filter); the other jobs still get answers."""
    texts = list(dict.fromkeys(t for job in jobs for t in job.texts))
    results: list[object] = [None] * len(jobs)
    vectors: dict[int, Tensor] = {}
    embedded: Tensor | None = None
    failed: RetrievalError | None = None
    if texts:
        try:
            embedded = index.embed(texts)
        except RetrievalError as err:
            failed = err
        counters.model_calls += 1
    position = {t: i for i, t in enumerate(texts)}
    for i, job in enumerate(jobs):
        try:
            if job.vector is not None:
                vectors[i] = job.vector
            elif failed is not None:
                raise failed
            else:
                assert embedded is not None
                assert job.combine is not None
                vectors[i] = job.combine(embedded[[position[t] for t in job.texts]])
        except Exception as err:  # this job's alone (a bad input: its 4xx; a bug: its 500)
            results[i] = err
    groups: dict[tuple[int | None, str | None, int | None], list[int]] = {}
    for i in vectors:
        picture = i if vectors[i].ndim == 2 else None  # [R, D]: its own MaxSim search
        groups.setdefault((jobs[i].top, jobs[i].where, picture), []).append(i)
    for (top, where, picture), members in groups.items():
        if top is None:
            for i in members:
                results[i] = Answer(vectors[i], [])
            continue
        counters.searches += 1
        try:
            if picture is not None:
                found = [index.search_multivector(vectors[picture], top, where)]
            else:
                found = index.search_vectors(torch.stack([vectors[i] for i in members]), top, where)
        except Exception as err:  # the group's filter (checked before the batch: a bug)
            for i in members:
                results[i] = err
            continue
        for i, hits in zip(members, found, strict=True):
            results[i] = Answer(vectors[i], hits)
    counters.queries += sum(job.top is not None for job in jobs)
    return results
