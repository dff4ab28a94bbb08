"""The retriever interface: images -> representatives, text -> query vectors, and a score."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from PIL import Image
from torch import Tensor, nn

from retrieval.errors import ConfigError
from retrieval.registry import RETRIEVERS
from retrieval.representatives import Representatives

NEG_INF = float("-inf")
F = TypeVar("F", bound=Callable[..., Any])


def similarities(text: Tensor, reps: Representatives) -> Tensor:
    """``[Q, B, R]`` cosine of every query with every representative; invalid ones -inf.

    One matrix product per image (``bmm``), so an image's similarities do not depend on
    which other images share its chunk: scores are bit-identical however the images are
    split across shards, chunks and processes.
    """
    emb = reps.embeddings.to(text.dtype)
    b, _, d = emb.shape
    sims = torch.bmm(emb, text.T.unsqueeze(0).expand(b, d, text.shape[0]))  # [B, R, Q]
    sims = sims.masked_fill(~reps.mask.unsqueeze(-1), NEG_INF)
    return sims.permute(2, 0, 1)


def max_cosine(text: Tensor, reps: Representatives) -> Tensor:
    """Score of each image for each query: the max cosine over its valid representatives.

    Args:
        text: ``[Q, D]`` L2-normalised query embeddings.
        reps: a batch of ``B`` images.

    Returns:
        ``[Q, B]`` scores; an image with no valid representative scores ``-inf``.
    """
    return similarities(text, reps).amax(dim=2)


def argmax_representative(text: Tensor, reps: Representatives) -> Tensor:
    """``[Q, B]`` index of the representative that gives each image its score."""
    return similarities(text, reps).argmax(dim=2)


@runtime_checkable
class DenseSource(Protocol):
    """A retriever whose representatives can be derived from a ``dense_clip`` run's
    stored cells (``store.dense_from``): Cluster-CLIP re-aggregates them, Dense-CLIP takes
    them, CLIP at its native size takes the global embedding. Both hooks or neither:
    :func:`check_contract` refuses a retriever with one alone."""

    def check_dense_source(self, dense_config: dict[str, Any]) -> None:
        """Raises (a ``ValueError``) unless the stored cells were made with this
        retriever's feature settings; ``dense_config`` is their retriever description."""

    def from_dense(self, stored: Representatives, dense_config: dict[str, Any]) -> Representatives:
        """This retriever's representatives of images whose Dense-CLIP ones are stored."""


DENSE_HOOKS = ("check_dense_source", "from_dense")


class Retriever(nn.Module, ABC):
    """Base class of every retriever.

    A retriever owns its model, its image preprocessing and its scoring rule, so the
    engine never needs to know which family it runs. Subclasses call
    ``super().__init__()``, set :attr:`embed_dim` and :attr:`image_transform`, and
    implement :meth:`encode_images` and :meth:`encode_text`; :meth:`score` defaults to
    the max cosine over an image's representatives. :func:`check_contract` (run by
    ``create_retriever``) refuses one that misses a required attribute.

    Attributes:
        image_transform: PIL image -> ``[3, H, W]`` tensor, the retriever's own
            preprocessing (the data loader applies it). Required.
        embed_dim: dimension ``D`` of representatives and queries (a positive int).
            Required: the index and the query side are sized by it.
        random_weights: True when the model was built without pretrained weights; the
            engine then warns that metrics are meaningless.
    """

    image_transform: Callable[[Image.Image], Tensor]
    embed_dim: int
    random_weights: bool = False

    @property
    def device(self) -> torch.device:
        """Where the retriever computes: its first parameter's (or buffer's) device; the
        CPU for a retriever without either (nothing of it moves with ``.to()``)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @abstractmethod
    def encode_images(self, pixels: Tensor) -> Representatives:
        """Embeds a batch ``[B, 3, H, W]`` into its representatives."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> Tensor:
        """Embeds ``Q`` texts into ``[Q, D]`` L2-normalised vectors."""

    def score(self, text: Tensor, reps: Representatives) -> Tensor:
        """``[Q, B]`` score of each image for each query (higher is better, any sign)."""
        return max_cosine(text, reps)

    def describe(self) -> dict[str, Any]:
        """What determines this retriever's image embeddings (stored with the shards and
        compared when an index is queried): its options that change the embeddings.
        A retriever with such options overrides this; the default is none."""
        return {}


def check_contract(retriever: object) -> Retriever:
    """``retriever``, checked when it is built (not when a search first needs the
    missing part): a :class:`Retriever` with a positive int ``embed_dim``, an
    ``image_transform``, and both dense-source hooks (:class:`DenseSource`) or neither.

    Raises:
        ConfigError: naming the class and each missing part.
    """
    cls = type(retriever)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(retriever, Retriever):
        raise ConfigError(f"{name} is not a Retriever: subclass retrieval.Retriever")
    missing = []
    dim = getattr(retriever, "embed_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        got = "not set" if dim is None else f"{dim!r}"
        missing.append(f"embed_dim (a positive int, the embedding size D; {got})")
    if not callable(getattr(retriever, "image_transform", None)):
        missing.append("image_transform (PIL image -> [3, H, W] tensor)")
    hooks = [hook for hook in DENSE_HOOKS if callable(getattr(retriever, hook, None))]
    if len(hooks) == 1:
        other = next(hook for hook in DENSE_HOOKS if hook not in hooks)
        missing.append(f"{other} (it has {hooks[0]}: a dense source needs both)")
    if missing:
        raise ConfigError(
            f"retriever {name} is incomplete: it lacks {'; '.join(missing)}. Set attributes "
            f"in its __init__ after super().__init__(), define methods on the class "
            f"(docs/architecture.md, 'Adding a retriever')"
        )
    return retriever


def register_retriever(name: str) -> Callable[[F], F]:
    """Decorator registering a retriever class or factory under ``name``."""
    return RETRIEVERS.register(name)


def list_retrievers() -> list[str]:
    """Names of every registered retriever, built-in and from plugins."""
    return RETRIEVERS.names()


def create_retriever(name: str, **kwargs: Any) -> Retriever:
    """Builds the retriever registered under ``name`` (usable from a notebook).

    Raises:
        ConfigError: it is not a complete retriever (:func:`check_contract`: no
            ``embed_dim``, one dense-source hook without the other, ...), named with
            its class, before anything is embedded with it.
    """
    return check_contract(RETRIEVERS.create(name, **kwargs))
