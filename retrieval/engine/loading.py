"""The embed phase's DataLoader: the images still to embed, with the retriever's
transform applied by the loader, and the dataset's bad-image policy set aside while it
runs.

The dataset is built without a transform and never patched: its items carry an image's
exact pixels (``[3, H, W]`` uint8, :func:`~retrieval.data.base.pil_to_uint8_tensor`), and
the loader's view of it (:class:`TransformedItems`, :class:`TransformedStream`) turns
each item back into the same 8-bit RGB picture and applies the retriever's
``image_transform`` in the DataLoader's worker, item by item, where the dataset's
``__getitem__`` would have (so a batch never holds full-size pictures).
Lightning-free (the sweep's estimate uses it too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from contextlib import contextmanager
from typing import Any, Protocol, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from retrieval.data.base import ImageDataset, Transform


class StreamedDataset(Protocol):
    """What the embed phase asks of an ``IterableDataset`` (webdataset shards): it is
    told the ids to embed and yields its own share of them on each rank and worker."""

    def restrict(self, image_ids: np.ndarray) -> None: ...


def uint8_to_pil(pixels: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` uint8 back to the 8-bit RGB picture it was read from (the inverse of
    :func:`~retrieval.data.base.pil_to_uint8_tensor`, pixel for pixel)."""
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))


def transformed(item: dict[str, Any], transform: Transform) -> dict[str, Any]:
    """``item`` with its pixels through ``transform`` (a bad image's ``None`` kept)."""
    if item["pixels"] is None:
        return item
    return {**item, "pixels": transform(uint8_to_pil(item["pixels"]))}


class TransformedItems(Dataset):
    """A map-style dataset's items, each through ``transform`` as it is read."""

    def __init__(self, items: Dataset, transform: Transform) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(cast(Sized, self.items))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return transformed(self.items[index], self.transform)


class TransformedStream(IterableDataset):
    """A streamed dataset's items (its own share on each rank and worker), each through
    ``transform`` as it is read."""

    def __init__(self, items: IterableDataset, transform: Transform) -> None:
        self.items = items
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (transformed(item, self.transform) for item in self.items)


def embed_loader(
    dataset: ImageDataset,
    transform: Transform,
    image_ids: np.ndarray,
    batch_size: int,
    num_workers: int,
) -> DataLoader:
    """A DataLoader over ``image_ids`` of ``dataset`` that applies ``transform``.

    A map-style dataset is read through a ``Subset`` of those ids; a streamed one is
    told them (``restrict``) and skips the rest. A dataset built with a transform of its
    own (a notebook's) keeps it: its items are transformed already.
    """
    items: Dataset
    own = getattr(dataset, "transform", None) is not None
    if isinstance(dataset, IterableDataset):
        cast(StreamedDataset, dataset).restrict(image_ids)
        items = dataset if own else TransformedStream(dataset, transform)
    else:
        position = {int(i): k for k, i in enumerate(dataset.image_ids)}
        items = Subset(dataset, [position[int(i)] for i in image_ids])
        items = items if own else TransformedItems(items, transform)
    return DataLoader(
        items, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate
    )


@contextmanager
def bad_images_passed_on(dataset: ImageDataset) -> Iterator[str]:
    """Sets ``dataset.on_bad_image`` to ``skip`` for the block and yields the policy it
    had, restored on the way out whatever happens: the embed module applies that policy
    in the main process, where an error can name the file."""
    policy = dataset.on_bad_image
    dataset.on_bad_image = "skip"
    try:
        yield policy
    finally:
        dataset.on_bad_image = policy
