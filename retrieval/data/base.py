"""What every dataset shares: items, batches and the bad-file policy.

An :class:`ImageDataset` gives the engine ``image_ids``, ``failures_at_start`` and
``image_path(id)``, which is all the embed phase needs (an unlabelled collection is one);
a :class:`RetrievalDataset` adds ``categories`` and ``ground_truth()`` for the score
phase. This base turns ids into DataLoader items and batches, so every dataset reads and
reports images the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from retrieval.data.ground_truth import GroundTruth
from retrieval.data.images import BadImageError, load_image, outside_root, to_rgb8
from retrieval.errors import ConfigError
from retrieval.registry import DATASETS

Transform = Callable[[Image.Image], torch.Tensor]
OnBadImage = Literal["error", "skip"]
F = TypeVar("F", bound=Callable[..., Any])


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` uint8, the exact pixels (what ``__getitem__`` gives without a transform)."""
    array = np.asarray(to_rgb8(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def file_identity(path: str | Path | None) -> dict[str, int] | None:
    """``dict(bytes, mtime_ns)`` of the file at ``path`` now, or None when there is none:
    recorded with each unreadable image, so a later run sees that it was replaced."""
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except (OSError, ValueError):
        return None
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class ImageDataset(Dataset):
    """Base of every dataset: images by id, validated common options, ``__getitem__``
    and ``collate``. Subclasses set :attr:`image_ids` and :attr:`failures_at_start` and
    implement :meth:`image_path`.

    Args:
        images: the image root (config ``data.images``).
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``error`` stops at a missing, truncated or corrupt file;
            ``skip`` leaves it out and reports it (config ``data.on_bad_image``).
        max_images: keep only the first N image ids (ascending), for quick runs.
    """

    image_ids: np.ndarray
    failures_at_start: list[dict[str, Any]]
    #: the folders every image path must resolve inside (after ``..`` and symlinks);
    #: ``(images,)`` unless a subclass declares others, None where any path may be read
    #: (a listing that follows the user's own symlinks). Checked at construction by the
    #: datasets and again before every read, so a path never leaves them.
    image_roots: tuple[Path, ...] | None
    #: constructor arguments filled from other config sections (a protocol option, the
    #: run folder), with their config keys; the factory passes those keys' values, so
    #: no dataset needs a special case there
    CONFIG_OPTIONS: ClassVar[dict[str, str]] = {}
    #: ``data.*`` options that change labels or which images take part, never what an
    #: image id's pixels are: left out of the embedding fingerprint, so changing them
    #: re-scores stored shards instead of refusing them
    LABEL_ONLY_OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"on_bad_image", "max_images", "query_names"}
    )

    def __init__(
        self,
        images: str | Path,
        transform: Transform | None,
        on_bad_image: OnBadImage,
        max_images: int | None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if max_images is not None and max_images < 1:
            raise ConfigError(
                f"data.max_images must be a positive integer or null, got {max_images}"
            )
        self.images_dir = Path(images)
        self.image_roots = (self.images_dir,)
        self.transform = transform
        self.on_bad_image = on_bad_image

    def image_path(self, image_id: int) -> Path:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``dict(image_id, pixels, error, path)``; under ``skip`` a bad file gives
        ``pixels=None``, the reason in ``error`` and, in ``file``, the file's identity as
        it was before the read (:func:`file_identity`: a file replaced during the read is
        retried by the next run, never wrongly taken as the broken one).

        Raises:
            BadImageError: the file is bad or resolves outside :attr:`image_roots`, and
                ``on_bad_image`` is ``error``.
        """
        image_id = int(self.image_ids[index])
        path = self.image_path(image_id)
        identity = file_identity(path)
        try:
            roots = getattr(self, "image_roots", None)
            reason = None if roots is None else outside_root(path, roots)
            if reason is not None:
                raise BadImageError(path, reason)
            image = load_image(path)
        except BadImageError as err:
            if self.on_bad_image == "error":
                raise
            return {
                "image_id": image_id,
                "pixels": None,
                "error": err.reason,
                "path": str(path),
                "file": identity,
            }
        pixels = self.transform(image) if self.transform is not None else pil_to_uint8_tensor(image)
        return {"image_id": image_id, "pixels": pixels, "error": None, "path": str(path)}

    @staticmethod
    def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Stacks the good items, reports the bad ones (the DataLoader's ``collate_fn``).

        Returns:
            ``pixels``: ``[b, 3, H, W]`` of the b good items, or None when every item
            failed; ``image_ids``: ``[b]`` int64; ``failures``: one
            ``dict(image_id, path, reason[, file])`` per failed item (``file``: its
            identity when the item gives one).
        """
        good = [item for item in batch if item["pixels"] is not None]
        failures = [
            {
                "image_id": item["image_id"],
                "path": item.get("path"),
                "reason": item["error"],
                **({"file": item["file"]} if "file" in item else {}),
            }
            for item in batch
            if item["pixels"] is None
        ]
        pixels = None
        if good:
            shapes = {tuple(item["pixels"].shape) for item in good}
            if len(shapes) > 1:
                raise ConfigError(
                    f"images of different sizes {sorted(shapes)} cannot be stacked into one "
                    "batch: give the dataset a transform that resizes (the retriever's "
                    "image_transform), or use loader.batch_size=1"
                )
            pixels = torch.stack([item["pixels"] for item in good])
        image_ids = torch.tensor([item["image_id"] for item in good], dtype=torch.int64)
        return {"pixels": pixels, "image_ids": image_ids, "failures": failures}


class RetrievalDataset(ImageDataset):
    """Base of the labelled datasets: an :class:`ImageDataset` with annotations, whose
    subclasses also set :attr:`categories` and implement :meth:`ground_truth`.

    Args:
        annotations: the annotation file or folder (config ``data.annotations``).
        images, transform, on_bad_image, max_images: as for :class:`ImageDataset`.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        transform: Transform | None,
        on_bad_image: OnBadImage,
        max_images: int | None,
    ) -> None:
        super().__init__(images, transform, on_bad_image, max_images)
        self.annotations_path = Path(annotations)

    def ground_truth(self) -> GroundTruth:
        raise NotImplementedError


def is_labelled(dataset_class: Any) -> bool:
    """Whether a dataset (class or instance) has ground truth to score against."""
    return callable(getattr(dataset_class, "ground_truth", None))


def register_dataset(name: str) -> Callable[[F], F]:
    """Decorator registering a dataset class or factory under ``name``."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    return DATASETS.names()


def create_dataset(name: str, **kwargs: Any) -> ImageDataset:
    """Builds the dataset registered under ``name``; an unknown option names the valid ones."""
    return DATASETS.create(name, **kwargs)
