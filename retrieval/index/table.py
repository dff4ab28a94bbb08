"""The representative table every index shares: valid representatives, flat, on disk.

A run's shards pad every image to ``R`` slots; an index wants one row per valid
representative. The table keeps them as a raw fp16 ``[M, D]`` file (memory-mapped, so
exact search and re-ranking read it without loading it) plus, per row, its image (rows
of an image are contiguous), its slot in the run's padded layout (``rep_index``, what
``argmax_representative`` returns) and its box. Backends index the vectors; the table
turns any backend's matched rows back into image ids, slots and boxes.

An index grows and shrinks by generations (``retrieval index update``): new images'
rows are appended to ``vectors.f16`` (append-only: bytes past the rows a generation
records are ignored, they belong to an update that did not finish) and removed images
keep their rows but are marked in a tombstone mask (``removed``), which exact search,
re-ranking and every backend honour. Generation ``g``'s metadata is ``table.npz`` for
``g = 0`` and ``table.g.npz`` after, so a new generation never overwrites the files the
previous one is read from; ``index.json`` names the generation in use.
"""

from __future__ import annotations

import mmap
import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from retrieval.errors import IndexFileError
from retrieval.index.manifest import MANIFEST as MANIFEST
from retrieval.index.manifest import META, VECTORS, corrupt, generation_name
from retrieval.representatives import Representatives
from retrieval.store.atomic import replace_atomically as replace_atomically


class TableWriter:
    """Appends batches of images to a table folder, streaming vectors to disk.

    Args:
        folder: the table folder.
        dim: embedding size.
        base: an existing table to extend (an update): its rows stay, new rows are
            appended to its vectors file after them, and :meth:`close` writes generation
            ``generation``'s metadata beside the base's.
        generation: the generation :meth:`close` writes.
    """

    def __init__(
        self, folder: Path, dim: int, base: RepTable | None = None, generation: int = 0
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.base = base
        self.generation = generation
        self._vectors: BinaryIO
        if base is None:
            self._vectors = open(self.folder / VECTORS, "wb")  # noqa: SIM115 - closed in close()
        else:  # drop what an unfinished update appended, then append after the base rows
            self._vectors = open(self.folder / VECTORS, "r+b")  # noqa: SIM115 - closed in close()
            self._vectors.truncate(base.num_rows * dim * 2)
            self._vectors.seek(0, os.SEEK_END)
        self._ids: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._slots: list[np.ndarray] = []
        self._boxes: list[np.ndarray] = []
        self._has_boxes: bool | None = None if base is None else base.boxes is not None

    def append(self, image_ids: np.ndarray | torch.Tensor, reps: Representatives) -> None:
        """Adds a batch of images; only valid representatives are stored."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        if len(ids) != reps.batch_size:
            raise ValueError(f"{len(ids)} image ids for {reps.batch_size} images")
        if reps.embeddings.shape[2] != self.dim:
            raise IndexFileError(
                f"representatives have embedding size {reps.embeddings.shape[2]}, "
                f"this index holds {self.dim}: an index holds one retriever's embeddings"
            )
        mask = reps.mask.cpu().bool()
        vectors = reps.embeddings.cpu()[mask].to(torch.float16).numpy()
        self._vectors.write(np.ascontiguousarray(vectors).tobytes())
        self._ids.append(ids)
        self._counts.append(mask.sum(dim=1).numpy().astype(np.int64))
        self._slots.append(mask.nonzero()[:, 1].numpy().astype(np.int32))
        has_boxes = reps.boxes is not None
        if self._has_boxes is None:
            self._has_boxes = has_boxes
        self._has_boxes = self._has_boxes and has_boxes
        if reps.boxes is not None:
            self._boxes.append(reps.boxes.cpu()[mask].float().numpy())

    def close(self, removed: np.ndarray | None = None) -> RepTable:
        """Writes the per-row metadata and returns the table opened for reading.

        Args:
            removed: image positions (of the base table) to mark removed.
        """
        self._vectors.flush()
        os.fsync(self._vectors.fileno())
        self._vectors.close()
        base = self.base
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        counts = np.concatenate(self._counts) if self._counts else np.zeros(0, np.int64)
        slots = np.concatenate(self._slots) if self._slots else np.zeros(0, np.int32)
        gone = np.zeros(len(ids), bool)
        if base is not None:
            gone = np.concatenate([base.removed, gone])
            if removed is not None:
                gone[removed] = True
            ids = np.concatenate([base.image_ids, ids])
            counts = np.concatenate([np.diff(base.offsets), counts])
            slots = np.concatenate([base.slots, slots])
        live = ids[~gone]
        if len(np.unique(live)) != len(live):
            raise IndexFileError("an image id was added twice: each image is added once")
        meta: dict[str, np.ndarray] = {
            "image_ids": ids,
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "slots": slots,
        }
        if gone.any():
            meta["removed"] = gone
        if self._has_boxes:
            new = np.concatenate(self._boxes) if self._boxes else np.zeros((0, 4), np.float32)
            old = [] if base is None or base.boxes is None else [base.boxes]
            meta["boxes"] = np.concatenate([*old, new]).astype(np.float32)
        # numeric arrays only (np.load reads them without pickle); naming allow_pickle
        # also keeps mypy from matching **meta against that bool parameter
        path = self.folder / generation_name(META, self.generation)
        replace_atomically(path, lambda f: np.savez(f, allow_pickle=False, **meta))
        return RepTable.open(self.folder, self.dim, self.generation)


@dataclass
class RepTable:
    """Valid representatives of every indexed image, read back from a table folder.

    Attributes:
        vectors: ``[M, D]`` fp16, memory-mapped.
        image_ids: ``[N]`` int64, in the order images were added.
        offsets: ``[N + 1]``: rows ``offsets[i]:offsets[i + 1]`` belong to image ``i``.
        owner: ``[M]`` int64 image position of each row.
        slots: ``[M]`` the row's representative index in the run's padded layout.
        boxes: ``[M, 4]`` normalised ``xyxy``, or None when the retriever gives no boxes.
        removed: ``[N]`` bool, images removed by an update (their rows stay, unsearched).
        generation: the generation whose metadata this is.
    """

    folder: Path
    vectors: np.ndarray
    image_ids: np.ndarray
    offsets: np.ndarray
    owner: np.ndarray
    slots: np.ndarray
    boxes: np.ndarray | None
    removed: np.ndarray
    generation: int = 0

    @classmethod
    def open(cls, folder: Path, dim: int, generation: int = 0) -> RepTable:
        """Opens a table, checking its files agree with each other (else a clear error)."""
        folder = Path(folder)
        meta_path = folder / generation_name(META, generation)
        vec_path = folder / VECTORS
        for path in (meta_path, vec_path):
            if not path.exists():
                raise corrupt(path, "file missing")
        try:
            with np.load(meta_path) as meta:
                arrays = {k: meta[k] for k in meta.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise corrupt(meta_path, f"not a readable .npz: {err}") from None
        offsets = arrays.get("offsets")
        if offsets is None or "image_ids" not in arrays or "slots" not in arrays:
            raise corrupt(meta_path, "arrays missing")
        rows = int(offsets[-1])
        expected = rows * dim * 2
        if vec_path.stat().st_size < expected:  # more: an unfinished update's tail
            raise corrupt(
                vec_path, f"{vec_path.stat().st_size} bytes, expected {expected} for {rows} x {dim}"
            )
        vectors = (
            np.memmap(vec_path, dtype=np.float16, mode="r", shape=(rows, dim))
            if rows
            else np.zeros((0, dim), np.float16)
        )
        counts = np.diff(offsets)
        removed = arrays.get("removed", np.zeros(len(counts), bool)).astype(bool)
        if len(removed) != len(counts) or len(arrays["image_ids"]) != len(counts):
            raise corrupt(meta_path, "its arrays disagree in length")
        return cls(
            folder=folder,
            vectors=vectors,
            image_ids=arrays["image_ids"],
            offsets=offsets,
            owner=np.repeat(np.arange(len(counts)), counts),
            slots=arrays["slots"],
            boxes=arrays.get("boxes"),
            removed=removed,
            generation=generation,
        )

    @property
    def num_images(self) -> int:
        """Image positions in the table, removed ones included."""
        return len(self.image_ids)

    @cached_property  # read on every query by backends that probe until k images come
    def searchable_images(self) -> int:
        """Live images with at least one representative: the most a search can return."""
        return int(((np.diff(self.offsets) > 0) & ~self.removed).sum())

    @property
    def num_rows(self) -> int:
        """Rows in the table, removed images' rows included."""
        return len(self.owner)

    @property
    def has_removed(self) -> bool:
        return bool(self.removed.any())

    @property
    def live_images(self) -> np.ndarray:
        """Positions of the images not removed."""
        return np.flatnonzero(~self.removed)

    @property
    def live_image_ids(self) -> np.ndarray:
        """Ids of the images not removed, in table order."""
        return self.image_ids[~self.removed]

    @cached_property
    def live_rows(self) -> np.ndarray:
        """Rows of the images not removed, ascending."""
        if not self.has_removed:
            return np.arange(self.num_rows)
        return np.flatnonzero(~self.removed[self.owner])

    @property
    def num_live_rows(self) -> int:
        return len(self.live_rows)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows_of(self, images: np.ndarray) -> np.ndarray:
        """All table rows of the images at positions ``images``, image after image."""
        starts = self.offsets[images]
        counts = self.offsets[images + 1] - starts
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return np.arange(int(counts.sum())) - first + np.repeat(starts, counts)

    def float_rows(self, rows: np.ndarray | slice | int) -> torch.Tensor:
        """The table's ``rows`` as a float32 tensor. torch converts the fp16 values
        (numpy's ``astype`` converts half floats in software, an order of magnitude
        slower: the cost of every re-rank; results/bench/search_cpu.md)."""
        # a slice of the read-only map is copied (torch wants a writable array)
        return torch.from_numpy(np.require(self.vectors[rows], requirements=("C", "W"))).float()

    def files(self) -> list[Path]:
        return [self.folder / VECTORS, self.folder / generation_name(META, self.generation)]

    def advise_random(self) -> None:
        """Tells the kernel the vectors are read by scattered rows (an approximate
        engine's exact re-rank): otherwise each row read pulls a whole readahead window,
        and a few dozen queries page in most of the table."""
        handle = getattr(self.vectors, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_RANDOM"):
            handle.madvise(mmap.MADV_RANDOM)

    def meta_bytes(self) -> int:
        """Resident bytes of the per-row metadata (what every backend keeps in memory)."""
        arrays = [self.image_ids, self.offsets, self.owner, self.slots, self.removed]
        return sum(a.nbytes for a in arrays) + (0 if self.boxes is None else self.boxes.nbytes)
